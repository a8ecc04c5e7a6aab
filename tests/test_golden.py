"""Golden loss files: short GPT-2 runs whose every logged loss must not change when the code is reshaped.

tests/data/golden/<case>.json holds each train and eval record's losses and gradient norm as
exact floats (float.hex), recorded before a refactor. On the machine kind that recorded them (the
same torch version and CPU kernels) a refactor that keeps the math must match them bit for bit;
elsewhere they are compared within 1e-5. Re-record on purpose only, when the math changes:

    GPTFORGE_RECORD_GOLDEN=1 python -m pytest -q -m "not slow" tests/test_golden.py
"""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig

GOLDEN = Path(__file__).parent / "data" / "golden"
RECORD = os.environ.get("GPTFORGE_RECORD_GOLDEN") == "1"
KEYS = ("train_loss", "val_loss", "grad_norm")


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def records(run_dir: Path) -> list[dict]:
    out = []
    for r in map(json.loads, open(run_dir / ckpt.METRICS)):
        if r["event"] in ("train", "eval"):
            out.append({"event": r["event"], "step": r["step"], "tokens": r["tokens"],
                        **{k: float(r[k]).hex() for k in KEYS if k in r}})
    return out


def check(case: str, run_dir: Path) -> None:
    got = records(run_dir)
    path = GOLDEN / f"{case}.json"
    if RECORD:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine(), "records": got}, indent=0) + "\n")
        return
    golden = json.loads(path.read_text())
    want = golden["records"]
    assert [(r["event"], r["step"], r["tokens"]) for r in got] == [(r["event"], r["step"], r["tokens"]) for r in want]
    exact = golden["machine"] == machine()
    for g, w in zip(got, want):
        for k in KEYS:
            if k in w:
                a, b = float.fromhex(g[k]), float.fromhex(w[k])
                assert a == b if exact else abs(a - b) <= 1e-5 * max(1.0, abs(b)), (case, g["step"], k, a, b)


def config(text_file: Path, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=8, eval_every=4, eval_batches=2, log_every=1, sample_tokens=0, lr=2e-3,
             warmup_steps=2, seed=5, device="cpu", progress=False, save_every=2, keep_last=0)
    t.update(train_kw)
    return RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1),
                     data=DataConfig(val_fraction=0.1), train=TrainConfig(**t), inputs=[str(text_file)])


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The same text as conftest's text_file, under a fixed name (the config records it)."""
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    return path


def test_golden_plain(corpus, tmp_path):
    train(config(corpus), tmp_path / "run", log=lambda *_: None)
    check("plain", tmp_path / "run")


def test_golden_grad_accumulation(corpus, tmp_path):
    train(config(corpus, batch_size=2, grad_accum=2), tmp_path / "run", log=lambda *_: None)
    check("grad-accum", tmp_path / "run")


def test_golden_resumed(corpus, tmp_path):
    run = tmp_path / "run"
    train(config(corpus), run, log=lambda *_: None)
    for d in ckpt.checkpoint_dirs(run):
        if int(d.name[5:]) > 4:
            shutil.rmtree(d)
    train(config(corpus), run, resume=True, log=lambda *_: None)
    check("resumed", run)


@pytest.mark.multiprocess
def test_golden_two_process_ddp(corpus, tmp_path):
    run = tmp_path / "run"
    args = [str(corpus), "--out", str(run), "--context-length", "32", "--emb-dim", "32", "--n-heads", "2",
            "--n-layers", "2", "--drop-rate", "0.1", "--val-fraction", "0.1", "--batch-size", "2", "--max-steps", "8",
            "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--sample-tokens", "0", "--lr", "2e-3",
            "--warmup-steps", "2", "--seed", "5", "--device", "cpu", "--no-progress", "--save-every", "4",
            "--nproc", "2"]
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check("ddp-2", run)


def test_golden_modern_recipe(corpus, tmp_path, capsys):
    """The default recipe, modern: the llama family with QK-norm, Muon for the hidden matrices, warmup-stable-decay,
    attention kept inside documents and a byte-level BPE trained on the text (a small shape, the same settings)."""
    from clirun import run as cli

    args = ["train", str(corpus), "--recipe", "modern", "--out", str(tmp_path / "run"), "--context-length", "32",
            "--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--head-dim", "16",
            "--intermediate-size", "64", "--tokenizer-vocab", "512", "--batch-size", "4", "--max-steps", "8",
            "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--sample-tokens", "0", "--seed", "5",
            "--device", "cpu", "--no-progress", "--save-every", "4"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    check("modern", tmp_path / "run")
