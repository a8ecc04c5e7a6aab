"""A full disk, for real: each command that writes, pointed at a 16 KB tmpfs, ends with one line naming where it
could not write, a non-zero exit, no traceback and no partial file (skipped where mounting is not allowed)."""

import contextlib
import subprocess
import uuid
from pathlib import Path

import pytest
from clirun import run

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    disk = where / f"disk-{uuid.uuid4().hex[:6]}"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or a user namespace)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 16 KB tmpfs: room for a config file, not for a model, a tokenizer or a report."""
    with tmpfs(tmp_path, "16k") as disk:
        yield disk


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("full-disk")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    cfg = RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1),
                    data=DataConfig(val_fraction=0.1), inputs=[str(text)],
                    train=TrainConfig(batch_size=4, max_steps=2, eval_every=2, eval_batches=1, sample_tokens=0,
                                      seed=5, device="cpu", progress=False))
    train(cfg, d / "run", log=lambda *_: None)
    return d / "run", text


def commands(run_dir, text, disk):
    return {
        "convert-hf": ["convert", str(run_dir), "--to", "hf", str(disk / "hf")],
        "convert-gptforge": ["convert", str(run_dir), "--to", "gptforge", str(disk / "gf")],
        "convert-gguf": ["convert", str(run_dir), "--to", "gguf", str(disk / "m.gguf")],
        "train": ["train", str(text), "--out", str(disk / "run"), "--preset", "tiny", "--max-steps", "2",
                  "--context-length", "32", "--batch-size", "4", "--sample-tokens", "0", "--no-progress"],
        "report": ["report", str(run_dir), "--out", str(disk / "report.html")],
        "tokenizer": ["tokenizer", "train", str(text), "--vocab-size", "1000", "--out", str(disk / "tok")],
        "prepare": ["prepare", str(text), "--out", str(disk / "data")],
    }


@pytest.mark.parametrize("precheck", ["precheck", "writer"])
@pytest.mark.parametrize("command", ["convert-hf", "convert-gptforge", "convert-gguf", "train", "report",
                                     "tokenizer", "prepare"])
def test_a_full_disk_is_one_line_naming_the_place_and_leaves_no_partial_file(small_run, full_disk, capsys,
                                                                              monkeypatch, command, precheck):
    """Refused before writing where the bytes are known (precheck), and, with that check off, the writer's own
    ENOSPC (writer) still becomes the same kind of line."""
    if command == "convert-gguf":
        pytest.importorskip("gguf")
    if precheck == "writer":
        monkeypatch.setattr(ckpt, "check_free_space", lambda *args: None)
    code, out, err = run(commands(*small_run, full_disk)[command], capsys)
    assert code != 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("gptforge: error:")]
    assert len(errors) == 1, err
    assert str(full_disk) in errors[0] and "No space left on device" in errors[0], errors[0]
    left = [p for p in full_disk.rglob("*") if p.is_file()]
    assert not [p for p in left if ".tmp" in p.name or p.name.startswith(".")], left  # no temporary files
    big = {ckpt.WEIGHTS, "model.safetensors", "m.gguf", "report.html", "tokenizer.json"}
    assert not [p for p in left if p.name in big], left  # nothing partial under the names that mean "done"


def test_a_checkpoint_that_will_not_fit_is_refused_before_writing_and_the_last_one_stays(small_run, tmp_path, capsys):
    """A disk with room for one checkpoint and a half: the second save is refused before it writes (it needs as much
    as the first), naming the place and the checkpoint that is intact; resuming elsewhere goes on from it."""
    run_dir, text = small_run
    size = ckpt.checkpoint_bytes(ckpt.latest_checkpoint(run_dir))
    args = ["train", str(text), "--context-length", "32", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1",
            "--batch-size", "4", "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-batches", "1",
            "--sample-tokens", "0", "--seed", "5", "--device", "cpu", "--no-progress", "--keep-last", "1"]
    with tmpfs(tmp_path, str(int(size * 1.6) + 64 * 1024)) as disk:
        code, out, err = run(args + ["--out", str(disk / "run")], capsys)
        assert code == 1 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("gptforge: error:")]
        assert len(errors) == 1 and "not enough free space: the checkpoint of step 4" in errors[0], err
        assert "step-00000002 is intact: continue with --resume" in errors[0] and str(disk) in errors[0]
        assert [d.name for d in ckpt.checkpoint_dirs(disk / "run")] == ["step-00000002"]
        assert not list((disk / "run" / ckpt.CHECKPOINTS).glob(".tmp-*"))


def test_train_refuses_a_disk_without_room_for_one_checkpoint(tmp_path, capsys, monkeypatch):
    """The first checkpoint's bytes (weights and one optimizer moment a parameter, float32) against the disk's free
    space, before the tokenizer, the data or the model (no tmpfs needed: the free space is what disk_usage says)."""
    import shutil

    (tmp_path / "t.txt").write_text("Every effort moves you. " * 200)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000_000))
    code, _, err = run(["train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                        "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err
    assert ("not enough free space: a checkpoint (3,320,256 parameters: weights and optimizer state) needs about "
            "26.6 MB") in err
    assert "and 10 MB is free there" in err and not (tmp_path / "run").exists()
