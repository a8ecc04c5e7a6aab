"""A full disk, for real: each command that writes, pointed at a 16 KB tmpfs, ends with one line naming where it
could not write, a non-zero exit, no traceback and no partial file (skipped where mounting is not allowed)."""

import subprocess
import uuid

import pytest
from clirun import run

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig


@pytest.fixture
def full_disk(tmp_path):
    """A 16 KB tmpfs: room for a config file, not for a model, a tokenizer or a report."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or a user namespace)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


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


@pytest.mark.parametrize("command", ["convert-hf", "convert-gptforge", "convert-gguf", "train", "report",
                                     "tokenizer", "prepare"])
def test_a_full_disk_is_one_line_naming_the_place_and_leaves_no_partial_file(small_run, full_disk, capsys,
                                                                              command):
    if command == "convert-gguf":
        pytest.importorskip("gguf")
    code, out, err = run(commands(*small_run, full_disk)[command], capsys)
    assert code != 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("gptforge: error:")]
    assert len(errors) == 1, err
    assert str(full_disk) in errors[0] and "No space left on device" in errors[0], errors[0]
    left = [p for p in full_disk.rglob("*") if p.is_file()]
    assert not [p for p in left if ".tmp" in p.name or p.name.startswith(".")], left  # no temporary files
    big = {ckpt.WEIGHTS, "model.safetensors", "m.gguf", "report.html", "tokenizer.json"}
    assert not [p for p in left if p.name in big], left  # nothing partial under the names that mean "done"
