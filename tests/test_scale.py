"""Eight gloo processes on one machine (a tiny model): DDP and FSDP2 equal one process with the same global batch,
sharded checkpoints hold 1/8 of the state per rank, a run resharded 4 -> 2 -> 1 -> 3 processes follows the
uninterrupted run, a killed rank ends the whole job and --resume continues exactly, and torchrun's --max-restarts
picks a crashed run up without a human. Moments are chosen by progress (GPTFORGE_FAULT), never by a clock."""

import json
import os
import subprocess
import sys

import pytest
from rundirs import cut_after

from gptforge import checkpoint as ckpt

pytestmark = pytest.mark.multiprocess

COMMON = ["--preset", "tiny", "--tokenizer-vocab", "320", "--context-length", "32", "--drop-rate", "0",
          "--max-steps", "6", "--eval-every", "2", "--save-every", "2", "--keep-last", "0", "--eval-batches", "2",
          "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--log-every", "1", "--seed", "3"]


def env_without_fault(fault=None):
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_FAULT"}
    env["OMP_NUM_THREADS"] = "1"  # eight processes on two cores
    if fault:
        env["GPTFORGE_FAULT"] = fault
    return env


def gptforge(*args, fault=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env=env_without_fault(fault))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def records(run_dir, event="train"):
    keys = ("train_loss", "grad_norm") if event == "train" else ("train_loss", "val_loss")
    return [(r["step"], r["tokens"], *(r[k] for k in keys)) for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if r["event"] == event]


def assert_close_runs(a, b, tol):
    for event in ("train", "eval"):
        ra, rb = records(a, event), records(b, event)
        assert [r[:2] for r in ra] == [r[:2] for r in rb], event
        for x, y in zip(ra, rb):
            assert all(abs(u - v) <= tol for u, v in zip(x[2:], y[2:])), (event, x, y)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("scale")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:8]), encoding="utf-8")
    gptforge(text, "--out", d / "one", "--batch-size", "8", *COMMON)
    return d, text


@pytest.fixture(scope="module")
def fsdp8(corpus):
    d, text = corpus
    run = d / "fsdp8"
    out = gptforge(text, "--out", run, "--batch-size", "1", "--nproc", "8", "--parallel", "fsdp", *COMMON).stdout
    assert "8 processes x 1, fsdp" in out and out.count("done: step 6") == 1  # only rank 0 prints
    return run


def test_eight_ranks_fsdp_equal_one_and_shard_the_checkpoint(corpus, fsdp8):
    d, _ = corpus
    assert_close_runs(d / "one", fsdp8, tol=2e-5)
    newest = ckpt.checkpoint_dirs(fsdp8)[-1]
    assert ckpt.is_sharded(newest)
    per_rank = [sum(f.stat().st_size for f in (newest / ckpt.SHARDS).glob(f"__{r}_*.distcp")) for r in range(8)]
    total = sum(per_rank)
    assert all(0.8 * total / 8 <= b <= 1.2 * total / 8 for b in per_rank), per_rank  # each rank: ~1/8 of the state
    # and the state is all there: the weights equal the one-process run's within the same tolerance
    from gptforge.weights import load_any

    a, b = load_any(d / "one", "cpu")[0].state_dict(), load_any(fsdp8, "cpu")[0].state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_eight_ranks_ddp_equal_one(corpus):
    d, text = corpus
    run = d / "ddp8"
    gptforge(text, "--out", run, "--batch-size", "1", "--nproc", "8", "--parallel", "ddp", *COMMON)
    assert_close_runs(d / "one", run, tol=2e-5)
    assert not ckpt.is_sharded(ckpt.checkpoint_dirs(run)[-1])  # DDP: the single-file format by default


def test_resharded_resume_4_2_1_3(corpus, tmp_path):
    """Global batch 12 throughout: 4 x 3 (FSDP, sharded), resumed as 2 x 6 at step 2, as 1 x 12 at step 4 (one
    process reads the shards; it writes sharded too) and as 3 x 4 at step 6 (FSDP), to step 8."""
    d, text = corpus
    common = [*COMMON[:COMMON.index("--max-steps")], "--max-steps", "8", *COMMON[COMMON.index("--max-steps") + 2:]]
    gptforge(text, "--out", tmp_path / "one", "--batch-size", "12", *common)
    gptforge(text, "--out", tmp_path / "w4", "--batch-size", "3", "--nproc", "4", "--parallel", "fsdp", *common)
    run = cut_after(tmp_path / "w4", tmp_path / "w2", 2)
    out = gptforge("--resume", run, "--batch-size", "6", "--nproc", "2").stdout
    assert "resuming with 2 process(es) x batch 6 (was 4 x 3)" in out
    run = cut_after(run, tmp_path / "w1", 4)
    out = gptforge("--resume", run, "--batch-size", "12", "--checkpoint-format", "sharded").stdout
    assert "resuming with 1 process(es) x batch 12 (was 2 x 6)" in out
    run = cut_after(run, tmp_path / "w3", 6)
    out = gptforge("--resume", run, "--batch-size", "4", "--nproc", "3").stdout
    assert "resuming with 3 process(es) x batch 4 (was 1 x 12)" in out
    assert all(ckpt.is_sharded(c) for c in ckpt.checkpoint_dirs(run))
    assert_close_runs(tmp_path / "one", run, tol=2e-5)


def test_killed_rank_ends_the_job_then_resume_is_exact(corpus, fsdp8, tmp_path):
    d, text = corpus
    run = tmp_path / "killed"
    proc = gptforge(text, "--out", run, "--batch-size", "1", "--nproc", "8", "--parallel", "fsdp", *COMMON,
                    fault="step-mid:3@5", check=False)  # rank 5 dies inside step 3; torchrun ends the others
    assert proc.returncode != 0
    assert [c.name for c in ckpt.checkpoint_dirs(run)] == ["step-00000002"]
    gptforge("--resume", run, "--nproc", "8")
    assert records(run) == records(fsdp8) and records(run, "eval") == records(fsdp8, "eval")  # bit for bit


def test_torchrun_max_restarts_continues_the_run(corpus, fsdp8, tmp_path):
    """torchrun --max-restarts 1 with a rank killed in step 5: the restarted job continues the run in --out
    from its step-4 checkpoint (distributed.restarted) and ends where the uninterrupted run ended."""
    d, text = corpus
    run = tmp_path / "restarted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "--max-restarts=1",
           "-m", "gptforge", "train", str(text), "--out", str(run), "--batch-size", "1", "--parallel", "fsdp",
           *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env_without_fault("step-mid:5@2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"resuming {run} from step 4" in proc.stdout
    assert records(run) == records(fsdp8) and records(run, "eval") == records(fsdp8, "eval")


def test_sharded_evaluation_and_tasks_equal_one_process(corpus, tmp_path):
    """3 FSDP ranks (shares of uneven size: some ranks run a forward only for the others' sake) score the
    evaluation batches and a task's items as one process does."""
    d, text = corpus
    task = tmp_path / "choice.jsonl"
    words = [w for w in text.read_text().split() if w.isalpha() and len(w) <= 5]
    task.write_text("".join(json.dumps({"context": " ".join(words[i:i + 6]), "choices": [
        " " + words[i + 6 + k] for k in range(3)], "label": i % 3}) + "\n" for i in range(0, 7 * 40, 40)))
    args = [*COMMON, "--eval-task", f"choice={task}", "--eval-batches", "3"]
    gptforge(text, "--out", tmp_path / "one", "--batch-size", "6", *args)
    gptforge(text, "--out", tmp_path / "w3", "--batch-size", "2", "--nproc", "3", "--parallel", "fsdp", *args)
    assert_close_runs(tmp_path / "one", tmp_path / "w3", tol=2e-5)
    evals = [[r for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == "eval"]
             for run in (tmp_path / "one", tmp_path / "w3")]
    for a, b in zip(*evals):
        assert a["task/choice/acc"] == b["task/choice/acc"] and a["task/choice/acc_norm"] == b["task/choice/acc_norm"]


def test_async_checkpoints_under_fsdp(corpus, tmp_path):
    """--async-checkpoint with 2 FSDP ranks: the background writes (their own gloo group, beside the training
    step's collectives) give the checkpoints a synchronous run writes: the same losses, an exact resume."""
    d, text = corpus
    args = [text, "--batch-size", "4", "--nproc", "2", "--parallel", "fsdp", *COMMON]
    gptforge(*args, "--out", tmp_path / "sync")
    gptforge(*args, "--out", tmp_path / "async", "--async-checkpoint")
    assert records(tmp_path / "async") == records(tmp_path / "sync")
    assert [c.name for c in ckpt.checkpoint_dirs(tmp_path / "async")] == [f"step-{s:08d}" for s in (2, 4, 6)]
    cut = cut_after(tmp_path / "async", tmp_path / "cut", 2)
    gptforge("--resume", cut, "--nproc", "2")
    assert records(cut) == records(tmp_path / "sync") and records(cut, "eval") == records(tmp_path / "sync", "eval")
