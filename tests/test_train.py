import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.model import GPTConfig
from gptforge.train import RunConfig, TrainConfig, train


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
    assert all(0 < r["mfu"] < 1 for r in records if r["event"] == "train")


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
