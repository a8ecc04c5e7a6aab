import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig


def tiny_run(text_file, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=8, eval_every=4, eval_batches=2, log_every=1, sample_tokens=4,
             lr=2e-3, warmup_steps=2, seed=5, device="cpu", progress=False)
    t.update(train_kw)
    return RunConfig(
        model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1),
        data=DataConfig(val_fraction=0.1),
        train=TrainConfig(**t),
        inputs=[str(text_file)],
    )


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if r["event"] == "train"}


def png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk: width, then height


def weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS))


def test_run_dir_contents_and_learning(text_file, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_run(text_file, max_steps=12, eval_every=6, lr=1e-2), run, log=lambda *_: None)
    assert (run / "config.toml").is_file() and (run / "loss.png").stat().st_size > 1000
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step-00000012"
    state = ckpt.load_state(last)
    assert state["step"] == 12 and state["tokens"] == 12 * 4 * 32
    assert {"optimizer", "rng", "epoch", "batch"} <= set(state)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in records:
        assert {"step", "tokens", "lr"} <= set(r) and ("train_loss" in r or "val_loss" in r)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # it learns
    assert abs(evals[0]["val_loss"] - math.log(50257)) < 0.5  # and starts near ln(vocab)
    assert evals[-1]["sample"].startswith("Every effort moves you")
    assert summary["steps"] == 12 and summary["val_loss"] == evals[-1]["val_loss"]
    # bits per byte next to each loss: the same scored tokens and bytes each time, so bpb / loss is a constant
    # (tokens / (ln 2 * bytes)), and English in GPT-2 tokens is about 4 bytes per token
    for split in ("train", "val"):
        ratios = [r[f"{split}_bpb"] / r[f"{split}_loss"] for r in evals]
        assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-9)
        assert 1 / (4.8 * math.log(2)) < ratios[0] < 1 / (3.5 * math.log(2))
    assert summary["val_bpb"] == evals[-1]["val_bpb"] and summary["train_bpb"] == evals[-1]["train_bpb"]
    assert png_width(run / "loss.png") == 1200  # a loss panel and a bits-per-byte panel


def test_same_seed_repeats_exactly(text_file, tmp_path):
    train(tiny_run(text_file, max_steps=4), tmp_path / "a", log=lambda *_: None)
    train(tiny_run(text_file, max_steps=4), tmp_path / "b", log=lambda *_: None)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for k, v in weights(tmp_path / "a").items():
        assert torch.equal(v, weights(tmp_path / "b")[k])


def test_resumed_run_equals_uninterrupted_run(text_file, tmp_path):
    """Stop after step 4 (as a kill right after that checkpoint would), resume, compare bit for bit."""
    cfg = tiny_run(text_file, max_steps=10, save_every=2, keep_last=0, grad_accum=2)
    full = tmp_path / "full"
    train(cfg, full, log=lambda *_: None)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    train(cfg, cut, resume=True, log=lambda *_: None)
    assert losses(cut) == losses(full)
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = ckpt.load_state(ckpt.latest_checkpoint(full))["optimizer"]["state"]
    opt_b = ckpt.load_state(ckpt.latest_checkpoint(cut))["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def test_resume_across_an_epoch_boundary(text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(text_file.read_text()[:5000])  # ~1.2K tokens: 4 batches of 8 windows per epoch
    cfg = tiny_run(short, batch_size=8, max_steps=None, epochs=3, save_every=5, keep_last=0, eval_every=100,
                   sample_tokens=0)
    full = tmp_path / "full"
    summary = train(cfg, full, log=lambda *_: None)
    assert summary["steps"] == 12  # 3 epochs of 4 steps
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name[5:]) > 5:
            shutil.rmtree(d)
    state = ckpt.load_state(ckpt.latest_checkpoint(cut))
    assert (state["epoch"], state["batch"]) == (1, 1)  # resumes inside epoch 1, crosses into epoch 2
    train(cfg, cut, resume=True, log=lambda *_: None)
    assert losses(cut) == losses(full)


def test_keep_last_and_atomic_checkpoints(text_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_run(text_file, max_steps=6, save_every=1, keep_last=2), run, log=lambda *_: None)
    assert [d.name for d in ckpt.checkpoint_dirs(run)] == ["step-00000005", "step-00000006"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_damaged_newest_checkpoint_falls_back_to_previous(text_file, tmp_path):
    cfg = tiny_run(text_file, max_steps=6, save_every=2, keep_last=0, eval_every=100, sample_tokens=0)
    full = tmp_path / "full"
    train(cfg, full, log=lambda *_: None)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name[5:]) > 4:
            shutil.rmtree(d)
    newest = ckpt.checkpoint_dirs(cut)[-1]
    weights_file = newest / ckpt.WEIGHTS
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])  # truncated
    messages = []
    assert ckpt.latest_checkpoint(cut, warn=messages.append).name == "step-00000002"
    assert "checksum mismatch" in messages[0] and "step-00000004" in messages[0]
    train(cfg, cut, resume=True, log=messages.append)  # resumes from step 2, ends where the full run ended
    assert losses(cut) == losses(full)
    assert all(torch.equal(v, weights(full)[k]) for k, v in weights(cut).items())


def test_nonfinite_loss_stops_without_a_nan_checkpoint(text_file, tmp_path, monkeypatch):
    import importlib

    import pytest

    from gptforge.training import TrainingError

    train_mod = importlib.import_module("gptforge.training.step")  # where the step computes its loss

    real = train_mod.loss_batch
    calls = []

    def poisoned(model, x, y, *args):
        calls.append(1)
        loss = real(model, x, y, *args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "loss_batch", poisoned)
    run = tmp_path / "run"
    cfg = tiny_run(text_file, max_steps=6, save_every=1, keep_last=0, eval_every=100, sample_tokens=0)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 3"):
        train(cfg, run, log=lambda *_: None)
    assert ckpt.latest_checkpoint(run).name == "step-00000002"
    assert all(torch.isfinite(v).all() for v in weights(run).values())

    calls.clear()
    skip = tmp_path / "skip"
    summary = train(tiny_run(text_file, max_steps=6, eval_every=100, sample_tokens=0, skip_nonfinite=True), skip,
                    log=lambda *_: None)
    assert summary["steps"] == 6
    events = [json.loads(line) for line in open(skip / "metrics.jsonl")]
    assert [e["step"] for e in events if e["event"] == "skipped"] == [3]
    assert all(torch.isfinite(v).all() for v in weights(skip).values())


def test_sigterm_saves_a_resumable_checkpoint_and_exits_0(text_file, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [sys.executable, "-m", "gptforge", "train", str(text_file), "--out", str(run), "--preset", "tiny",
            "--context-length", "32", "--batch-size", "4", "--max-steps", "100000", "--eval-every", "100000",
            "--save-every", "100000", "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--log-every", "1"]
    # SIGTERM arrives in the middle of step 4 (chosen by progress, not by a clock): the step finishes and is saved
    env = dict(os.environ, GPTFORGE_FAULT="step-mid:4:SIGTERM")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stopped by SIGTERM" in proc.stdout
    last = ckpt.latest_checkpoint(run)
    assert last is not None and ckpt.load_state(last)["step"] >= 3
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", "--resume", str(run), "--max-steps",
                           str(ckpt.load_state(last)["step"] + 2)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout


def test_full_disk_while_saving_keeps_the_previous_checkpoint(text_file, tmp_path, monkeypatch):
    import errno

    import pytest

    from gptforge.checkpoint import CheckpointError

    run = tmp_path / "run"
    cfg = tiny_run(text_file, max_steps=4, save_every=2, keep_last=1, eval_every=100, sample_tokens=0)
    train(cfg, run, log=lambda *_: None)
    before = weights(run)

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    cfg.train.max_steps = 6
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-00000004 is intact"):
        train(cfg, run, resume=True, log=lambda *_: None)
    assert [d.name for d in ckpt.checkpoint_dirs(run)] == ["step-00000004"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_out_of_memory_suggests_smaller_micro_batch(text_file, tmp_path, monkeypatch):
    import importlib

    import pytest

    from gptforge.training import TrainingError

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(importlib.import_module("gptforge.training.step"), "loss_batch", oom)
    with pytest.raises(TrainingError, match="--batch-size 2 --grad-accum 2"):
        train(tiny_run(text_file, eval_every=100, sample_tokens=0), tmp_path / "run", log=lambda *_: None)


def test_save_every_minutes(text_file, tmp_path, monkeypatch):
    import importlib

    train_mod = importlib.import_module("gptforge.training.loop")
    clock = iter(range(0, 10_000, 40))  # every call to the clock: 40 more seconds

    class FakeTime:
        perf_counter = staticmethod(__import__("time").perf_counter)

        @staticmethod
        def monotonic():
            return float(next(clock))

    monkeypatch.setattr(train_mod, "time", FakeTime)
    run = tmp_path / "run"
    train(tiny_run(text_file, max_steps=5, save_every=100, save_every_minutes=1.0, keep_last=0, eval_every=100,
                   sample_tokens=0), run, log=lambda *_: None)
    # clock reads: 0 at start, then 40 s per step check; a save resets the reference
    assert [d.name for d in ckpt.checkpoint_dirs(run)] == ["step-00000002", "step-00000004", "step-00000005"]
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(text_file, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with a GradScaler whose state goes into the checkpoint."""
    run = tmp_path / precision
    cfg = tiny_run(text_file, max_steps=4, eval_every=4, precision=precision, lr=1e-2, sample_tokens=0)
    train(cfg, run, log=lambda *_: None)
    record = losses(run)
    assert len(record) == 4 and all(math.isfinite(v) for v in record.values())
    train(tiny_run(text_file, max_steps=4, eval_every=4, lr=1e-2, sample_tokens=0), tmp_path / "fp32",
          log=lambda *_: None)
    fp32 = losses(tmp_path / "fp32")
    assert abs(record[1] - fp32[1]) < 0.1 and record != fp32  # the same model, another number format
    state = ckpt.load_state(ckpt.latest_checkpoint(run))
    assert ("scaler" in state) == (precision == "fp16")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0
        train(tiny_run(text_file, max_steps=6, eval_every=4, precision=precision, lr=1e-2, sample_tokens=0), run,
              resume=True, log=lambda *_: None)
        assert len(losses(run)) == 6


def test_train_progress_records_mfu(text_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_run(text_file, max_steps=2, sample_tokens=0), run, log=lambda *_: None)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    mfu = {r["step"]: r.get("mfu") for r in records if r["event"] == "train"}
    assert list(mfu) == [1, 2]  # log_every=1: one record per step, each with its MFU
    assert all(isinstance(v, float) and 0 < v < 1 for v in mfu.values()), mfu


@pytest.mark.slow
def test_compiled_losses_equal_eager(text_file, tmp_path):
    """torch.compile gives the same losses (to float tolerance) and plain checkpoint keys.

    Without dropout: compiled dropout draws its masks from another random generator.
    """
    base = dict(max_steps=3, eval_every=3, sample_tokens=0)
    for name, compile in (("eager", False), ("compiled", True)):
        cfg = tiny_run(text_file, compile=compile, **base)
        cfg.model.drop_rate = 0.0
        train(cfg, tmp_path / name, log=lambda *_: None)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)
    keys = weights(tmp_path / "compiled").keys()
    assert keys == weights(tmp_path / "eager").keys() and not any("_orig_mod" in k for k in keys)
