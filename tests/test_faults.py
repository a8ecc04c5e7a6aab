"""Fault injection: kill a training run at named points (chosen by progress, never by a clock), resume, compare.

Each kill is armed through GPTFORGE_FAULT (see gptforge/faults.py): the process SIGKILLs itself the
N-th time it passes a point, so the same kills land on any machine, fast or slow, quiet or busy.
After every campaign the resumed run must equal the uninterrupted one bit for bit: weights,
optimizer state, RNG states, the loss log and the files in the run directory.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt

TRAIN_POINTS = ["step-mid", "ckpt-after-weights", "ckpt-after-state", "ckpt-before-rename", "ckpt-before-prune",
                "metrics-line", "write-loss.png", "write-config.toml", "write-metrics.jsonl"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text and a small tokenizer trained on it (small vocab: checkpoints of a few hundred KB)."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("faults")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "gptforge", "tokenizer", "train", str(text), "--vocab-size", "320",
                    "--out", str(d / "tok")], check=True, capture_output=True, timeout=300)
    return d, text


def train_args(d, text, steps):
    return [str(text), "--tokenizer", str(d / "tok"), "--preset", "tiny", "--context-length", "32",
            "--batch-size", "4", "--max-steps", str(steps), "--eval-every", "4", "--eval-batches", "2",
            "--save-every", "1", "--keep-last", "2", "--sample-tokens", "3", "--device", "cpu", "--no-progress",
            "--seed", "7", "--log-every", "1"]


def gptforge(*args, fault=None, nproc=None):
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_FAULT"}
    if fault:
        env["GPTFORGE_FAULT"] = fault
    extra = ["--nproc", str(nproc)] if nproc else []
    return subprocess.run([sys.executable, "-m", "gptforge", "train", *map(str, args), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def killed(proc) -> bool:
    return proc.returncode == -signal.SIGKILL


def run_files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != "loss.png")


def assert_same_run(ref, run):
    """Weights, optimizer and RNG state, checkpoints kept, loss log: as if the run was never killed."""
    a, b = ckpt.latest_checkpoint(ref), ckpt.latest_checkpoint(run)
    assert a.name == b.name
    wa, wb = load_file(str(a / ckpt.WEIGHTS)), load_file(str(b / ckpt.WEIGHTS))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    sa, sb = ckpt.load_state(a), ckpt.load_state(b)
    for group_a, group_b in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)
    assert all(torch.equal(x, y) for x, y in zip(sa["rng"][0]["torch"], sb["rng"][0]["torch"]))
    assert {k: sa[k] for k in ("step", "tokens", "epoch", "batch")} == {k: sb[k] for k in ("step", "tokens",
                                                                                          "epoch", "batch")}

    def log(run_dir):
        keep = ("event", "step", "tokens", "lr", "train_loss", "val_loss", "grad_norm", "sample")
        return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(run_dir / ckpt.METRICS))]

    assert log(ref) == log(run)
    assert run_files(ref) == run_files(run)  # no temporary files or stray checkpoints left behind


ONCE_PER_PROCESS = ("write-config.toml", "write-metrics.jsonl")  # config written and log rewritten at start


def campaign(d, text, run, steps, kills):
    """A new run killed at each (point, pass) in turn, resumed after each, then finished; returns the kills."""
    landed = []
    args = [*train_args(d, text, steps), "--out", run]
    for point, n in kills:
        if point in ONCE_PER_PROCESS:
            n = 1
        proc = gptforge(*args, fault=f"{point}:{n}")
        assert killed(proc), f"{point}:{n} did not kill the run (exit {proc.returncode}): {proc.stderr[-2000:]}"
        landed.append(f"{point}:{n}")
        args = ["--resume", run]
        if point == "metrics-line":  # the torn line is reported when the run resumes (and killed again)
            proc = gptforge(*args, fault="step-mid:1")
            assert killed(proc) and "cut-off last line" in proc.stderr, proc.stderr[-2000:]
            landed.append("step-mid:1")
    done = gptforge(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: step {steps}" in done.stdout
    return landed


@pytest.fixture(scope="module")
def reference(corpus):
    d, text = corpus
    runs = {}

    def get(steps):
        if steps not in runs:
            out = d / f"ref-{steps}"
            proc = gptforge(*train_args(d, text, steps), "--out", out)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[steps] = out
        return runs[steps]

    return get


@pytest.mark.multiprocess
def test_quick_campaign_one_kill_at_every_point(corpus, reference, tmp_path):
    d, text = corpus
    run = tmp_path / "killed"
    points = [p for p in TRAIN_POINTS if p != "write-metrics.jsonl"] + ["write-metrics.jsonl"]  # needs a log
    landed = campaign(d, text, run, 12, [(point, 2) for point in points])
    print(f"quick campaign: {len(landed)} kills ({', '.join(landed)}), 0 mismatches")
    assert len(landed) >= 8
    assert_same_run(reference(12), run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_full_campaign_every_point_several_times(corpus, reference, tmp_path):
    d, text = corpus
    run = tmp_path / "killed"
    points = [p for p in TRAIN_POINTS if p != "write-metrics.jsonl"] + ["write-metrics.jsonl"]
    landed = campaign(d, text, run, 100, [(point, n) for n in (1, 3, 2, 4) for point in points])
    print(f"full campaign: {len(landed)} kills, 0 mismatches")
    assert len(landed) >= 30
    assert_same_run(reference(100), run)


@pytest.mark.multiprocess
def test_one_rank_of_two_killed_mid_step_then_resume_is_exact(corpus, tmp_path):
    d, text = corpus
    args = [*train_args(d, text, 6), "--batch-size", "2", "--drop-rate", "0"]
    ref = tmp_path / "ref"
    assert gptforge(*args, "--out", ref, nproc=2).returncode == 0
    run = tmp_path / "killed"
    proc = gptforge(*args, "--out", run, nproc=2, fault="step-mid:4@1")  # rank 1 only, in step 4
    assert proc.returncode != 0
    assert ckpt.latest_checkpoint(run).name == "step-00000003"
    done = gptforge("--resume", run, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(ref, run)
