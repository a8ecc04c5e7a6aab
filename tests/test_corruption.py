"""Corruption campaign on a run directory, and the mistakes that must never cost a user a run.

Each case damages one file of a finished run cut back to step 4 (as if killed there) and resumes
it through the CLI. The run either continues from the last intact state with a one-line warning
(and then ends exactly where the undamaged run ended), or stops with one line naming the file and
leaves every byte of the run directory as it was. Never a silent restart, never lost history.
"""

import json
import os
import shutil

import pytest
import torch
from clirun import run as cli

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A 6-step run with a checkpoint after every step, all kept."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corruption")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    cfg = RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1),
                    data=DataConfig(val_fraction=0.1), inputs=[str(text)],
                    train=TrainConfig(batch_size=4, max_steps=6, eval_every=3, eval_batches=2, log_every=1,
                                      sample_tokens=3, save_every=1, keep_last=0, seed=5, device="cpu",
                                      progress=False))
    train(cfg, d / "full", log=lambda *_: None)
    return d / "full"


@pytest.fixture
def cut(full_run, tmp_path):
    """The full run as it stood when killed after step 4's checkpoint (its log runs one step further)."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    for d in ckpt.checkpoint_dirs(run):
        if int(d.name[5:]) > 4:
            shutil.rmtree(d)
    lines = (run / ckpt.METRICS).read_text().splitlines(keepends=True)
    (run / ckpt.METRICS).write_text("".join(r for r in lines if json.loads(r)["step"] <= 5))
    return run


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def log(run_dir):
    keep = ("event", "step", "tokens", "train_loss", "val_loss", "grad_norm", "sample")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(run_dir / ckpt.METRICS))]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def newest(run):
    return ckpt.checkpoint_dirs(run)[-1]


CONTINUES = {  # damage -> the run resumes from step 3 with a warning naming the damage
    "weights truncated": lambda run: truncate(newest(run) / ckpt.WEIGHTS),
    "weights flipped byte": lambda run: flip(newest(run) / ckpt.WEIGHTS, 0.9),
    "state truncated": lambda run: truncate(newest(run) / ckpt.STATE),
    "state flipped byte": lambda run: flip(newest(run) / ckpt.STATE, 0.7),
    "checksums truncated": lambda run: truncate(newest(run) / ckpt.CHECKSUMS),
    "checksums flipped byte": lambda run: flip(newest(run) / ckpt.CHECKSUMS, 0.5),
    "checksums missing": lambda run: (newest(run) / ckpt.CHECKSUMS).unlink(),
}


@pytest.mark.parametrize("damage", sorted(CONTINUES))
def test_damaged_newest_checkpoint_resumes_from_the_one_before(damage, cut, full_run, capsys):
    CONTINUES[damage](cut)
    code, out, err = cli(["train", "--resume", str(cut)], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert "step-00000004" in warnings[0] and "damaged" in warnings[0]
    assert "resuming" in out and "from step 3" in out
    assert log(cut) == log(full_run)  # nothing lost: the log reads as the uninterrupted run's
    assert all(torch.equal(v, final_weights(full_run)[k]) for k, v in final_weights(cut).items())
    assert (cut / "checkpoints" / "damaged-step-00000004").is_dir()  # set aside, kept for inspection


def test_torn_last_metrics_line_is_dropped_with_a_warning(cut, full_run, capsys):
    with open(cut / ckpt.METRICS, "a") as f:
        f.write('{"event": "train", "step": 6, "tok')  # the process died in the middle of this line
    code, out, err = cli(["train", "--resume", str(cut)], capsys)
    assert code == 0, err
    assert "cut-off last line" in err and err.count("\n") == 1
    assert log(cut) == log(full_run)


def test_damaged_metrics_line_is_reported_and_the_original_kept(cut, capsys):
    path = cut / ckpt.METRICS
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "#" + lines[2][1:]  # not JSON any more
    path.write_text("".join(lines))
    before = path.read_bytes()
    code, out, err = cli(["train", "--resume", str(cut)], capsys)
    assert code == 0, err
    assert "line(s) 3 are not JSON records" in err
    assert (cut / "metrics.jsonl.damaged").read_bytes() == before  # no history lost


def test_unreadable_config_is_restored_from_the_checkpoint(cut, full_run, capsys):
    truncate(cut / ckpt.CONFIG)
    (cut / ckpt.CONFIG).write_bytes((cut / ckpt.CONFIG).read_bytes() + b"= [")
    code, out, err = cli(["train", "--resume", str(cut)], capsys)
    assert code == 0, err
    assert "config.toml: not valid TOML" in err and "using the copy saved in checkpoint step-00000004" in err
    def settings(run_dir):
        from gptforge.config import tomllib

        cfg = tomllib.loads((run_dir / ckpt.CONFIG).read_text())
        cfg["train"].pop("out", None)  # the resumed run records where it is
        return cfg

    assert settings(cut) == settings(full_run)  # config.toml restored
    assert log(cut) == log(full_run)


def stops(run, capsys, *args):
    """Resume (or run the command) and expect one error line, a non-zero exit and an untouched directory."""
    before = snapshot(run)
    code, out, err = cli(list(args) or ["train", "--resume", str(run)], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("gptforge: error:") and "Traceback" not in err, err
    assert len([line for line in lines if "error" in line]) == 1
    assert snapshot(run) == before
    return lines[-1]


def test_config_changed_in_a_model_setting_stops(cut, capsys):
    path = cut / ckpt.CONFIG
    path.write_text(path.read_text().replace("emb_dim = 32", "emb_dim = 33"))
    line = stops(cut, capsys)
    assert "config.toml: emb_dim is 33, but checkpoint step-00000004 was trained with 32" in line


def test_every_checkpoint_damaged_stops_and_changes_nothing(cut, capsys):
    for d in ckpt.checkpoint_dirs(cut):
        flip(d / ckpt.WEIGHTS, 0.8)
    line = stops(cut, capsys)
    assert "every checkpoint is damaged" in line and "nothing was changed" in line


class NotAState:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless here; a real attack would run a command


def test_state_that_is_a_pickled_program_is_refused(cut, capsys):
    d = newest(cut)
    torch.save({"step": NotAState()}, d / ckpt.STATE)
    sums = json.loads((d / ckpt.CHECKSUMS).read_text())
    sums[ckpt.STATE] = ckpt.file_sha256(d / ckpt.STATE)  # the attacker also fixed the checksum
    (d / ckpt.CHECKSUMS).write_text(json.dumps(sums))
    line = stops(cut, capsys)
    assert "state.pt: holds Python objects other than tensors" in line and "weights_only=False" not in line


def test_disk_full_at_a_later_checkpoint_is_one_line_and_leaves_no_temporary_files(cut, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # torch.save reports a full disk as RuntimeError
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, out, err = cli(["train", "--resume", str(cut)], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("gptforge: error: could not write the checkpoint for step 6")
    assert "step-00000005 is intact" in err
    assert not list((cut / "checkpoints").glob(".tmp*"))
    assert newest(cut).name == "step-00000005"


@pytest.mark.parametrize("held", ["checkpoints", "metrics.jsonl", "notes.txt"])
def test_new_run_never_writes_into_a_directory_holding_other_files(held, full_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    source = full_run / held
    if source.is_dir():
        shutil.copytree(source, other / held)
    else:
        (other / held).write_bytes(source.read_bytes() if source.exists() else b"the user's notes\n")
    line = stops(other, capsys, "train", str(full_run.parent / "corpus.txt"), "--out", str(other), "--preset", "tiny")
    assert f"--out {other}: the directory is not empty (it holds {held})" in line


def test_out_that_is_a_file(full_run, tmp_path, capsys):
    target = tmp_path / "run.txt"
    target.write_text("keep me\n")
    line = stops(tmp_path, capsys, "train", str(full_run.parent / "corpus.txt"), "--out", str(target))
    assert f"--out {target}: is a file, not a directory" in line


def test_out_and_resume_in_a_read_only_place(read_only_dir, full_run, capsys):
    line = stops(read_only_dir, capsys, "train", str(full_run.parent / "corpus.txt"), "--out",
                 str(read_only_dir / "run"))
    assert f"cannot write in {read_only_dir}" in line
    shutil.copytree(full_run, read_only_dir.parent / "ro-run")
    ro_run = read_only_dir.parent / "ro-run"
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(ro_run)], check=True)
    else:
        ro_run.chmod(0o555)
    try:
        line = stops(ro_run, capsys, "train", "--resume", str(ro_run), "--max-steps", "8")
        assert f"--resume {ro_run}: cannot write in {ro_run}" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro_run)], check=True)
        else:
            ro_run.chmod(0o755)


@pytest.mark.parametrize("command", ["eval", "generate", "convert", "init-from"])
def test_a_damaged_weights_file_given_as_source_is_refused_by_name(cut, full_run, tmp_path, capsys, command):
    weights = newest(cut) / ckpt.WEIGHTS
    flip(weights, at=0.9)  # inside the tensors: the header still parses, a weight is wrong
    text = str(full_run.parent / "corpus.txt")
    args = {"eval": ["eval", str(weights), text],
            "generate": ["generate", str(weights), "--prompt", "The", "--max-new-tokens", "2"],
            "convert": ["convert", str(weights), "--to", "hf", str(tmp_path / "hf")],
            "init-from": ["train", text, "--init-from", str(weights), "--out", str(tmp_path / "new"),
                          "--max-steps", "1"]}[command]
    line = stops(cut, capsys, *args)
    assert f"{weights}: checksum mismatch with {newest(cut) / ckpt.CHECKSUMS}" in line
    assert not (tmp_path / "hf").exists() and not (tmp_path / "new").exists()
