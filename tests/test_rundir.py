"""One training process per run directory (RUN_DIR/run.lock), and branches (`--resume RUN --out NEW`).

Moments are chosen by progress: the first process stops itself (SIGSTOP, armed through GPTFORGE_FAULT) in the middle
of a given step, and the test goes on when waitpid reports that stop; nothing waits on a clock.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from clirun import run
from rundirs import cut_after
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt
from gptforge.runs import rundir
from gptforge.runs.rundir import LOCK, RunLock, in_use, read_holder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("rundir")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:4]), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "gptforge", "tokenizer", "train", str(text), "--vocab-size", "300",
                    "--out", str(d / "tok")], check=True, capture_output=True, timeout=300)
    return d, text


def train_args(corpus, steps, *extra):
    d, text = corpus
    return [str(text), "--tokenizer", str(d / "tok"), "--preset", "tiny", "--context-length", "32",
            "--batch-size", "4", "--max-steps", str(steps), "--eval-every", "2", "--eval-batches", "1",
            "--save-every", "2", "--keep-last", "2", "--sample-tokens", "0", "--device", "cpu", "--no-progress",
            "--seed", "7", "--log-every", "1", *map(str, extra)]


def gptforge(*args, fault=None, popen=False):
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_FAULT"}
    if fault:
        env["GPTFORGE_FAULT"] = fault
    cmd = [sys.executable, "-m", "gptforge", "train", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def wait_stopped(proc) -> None:
    """Until the process stops itself at its armed step: waitpid reports the stop (no polling, no clock)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"the run ended (exit {proc.returncode}) instead of stopping: "
                             f"{proc.stderr.read()[-2000:]}")


def one_line_error(code, err, *needles):
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("gptforge: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def tree(run_dir) -> dict[str, str]:
    """Every file of a run directory and its digest: to see that nothing in it changed."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP and waitpid are POSIX")
def test_a_second_training_process_is_refused_while_readers_are_not(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = gptforge(*train_args(corpus, 8), "--out", run_dir, fault="step-mid:6:SIGSTOP", popen=True)
    try:
        wait_stopped(first)
        holder = read_holder(run_dir)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = tree(run_dir)
        code, _, err = run(["train", "--resume", str(run_dir), "--max-steps", "10"], capsys)
        one_line_error(code, err, f"in use by PID {first.pid}", "--out NEW")
        code, _, err = run(["train", *train_args(corpus, 8), "--out", str(run_dir)], capsys)
        one_line_error(code, err, f"in use by PID {first.pid}", "choose another --out")
        code, out, err = run(["eval", str(run_dir), str(corpus[1]), "--json"], capsys)  # a reader: not blocked
        assert code == 0 and "step-00000004" in err, err
        assert tree(run_dir) == before  # the refused ones wrote nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert not (run_dir / LOCK).exists() and in_use(run_dir) is None
    done = gptforge("--resume", run_dir, "--max-steps", "10")
    assert done.returncode == 0 and "done: step 10" in done.stdout, done.stderr[-2000:]


def test_a_killed_run_frees_its_lock_at_once(corpus, tmp_path):
    run_dir = tmp_path / "run"
    killed = gptforge(*train_args(corpus, 8), "--out", run_dir, fault="step-mid:5")
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / LOCK).exists() and in_use(run_dir) is None  # the file stays, the kernel dropped the lock
    done = gptforge("--resume", run_dir)
    assert done.returncode == 0 and "done: step 8" in done.stdout, done.stderr[-2000:]
    assert not (run_dir / LOCK).exists()


def test_one_process_cannot_take_a_run_twice(tmp_path):
    with RunLock(tmp_path / "run", command="gptforge train test"):
        with pytest.raises(ckpt.CheckpointError, match=f"in use by PID {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
        assert f"PID {os.getpid()}" in in_use(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # the lock made the directory, nothing else filled it: gone again


def test_without_filesystem_locks_the_file_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_lockable", lambda fd: None)  # as on a filesystem without flock
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert in_use(run_dir) is None  # its process has ended on this host: stale
    with RunLock(run_dir):
        assert read_holder(run_dir)["pid"] == os.getpid()
    (run_dir / LOCK).write_text(json.dumps({"pid": 1, "host": "another-host", "since": "then"}))
    assert "delete" in in_use(run_dir) and "another-host" in in_use(run_dir)
    with pytest.raises(ckpt.CheckpointError, match="another-host"):
        RunLock(run_dir).acquire()


# ----------------------------------------------------------------------------- branches


def same_state(a_run, b_run):
    """The newest checkpoints' weights, optimizer state, RNG and position, and the loss logs: equal bit for bit."""
    a, b = ckpt.latest_checkpoint(a_run), ckpt.latest_checkpoint(b_run)
    assert a.name == b.name
    wa, wb = load_file(str(a / ckpt.WEIGHTS)), load_file(str(b / ckpt.WEIGHTS))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    sa, sb = ckpt.load_state(a), ckpt.load_state(b)
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert all(torch.equal(x, y) for x, y in zip(sa["rng"][0]["torch"], sb["rng"][0]["torch"]))
    assert {k: sa[k] for k in ("step", "tokens", "epoch", "batch", "best")} == \
        {k: sb[k] for k in ("step", "tokens", "epoch", "batch", "best")}

    def log(run_dir):
        keep = ("event", "step", "tokens", "lr", "train_loss", "val_loss", "grad_norm")
        return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(run_dir / ckpt.METRICS))]

    assert log(a_run) == log(b_run)
    assert json.loads((a_run / ckpt.BEST).read_text()) == json.loads((b_run / ckpt.BEST).read_text())


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("branch") / "source"
    proc = gptforge(*train_args(corpus, 8), "--out", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("start", [None, 6])
def test_a_branch_equals_its_source_continued_and_leaves_the_source_alone(corpus, source, tmp_path, start):
    before = tree(source)
    branch = tmp_path / "branch"
    extra = ["--checkpoint", str(start)] if start else []
    proc = gptforge("--resume", source, "--out", branch, "--max-steps", "12", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"branch: {branch} starts from" in proc.stdout and "done: step 12" in proc.stdout
    assert tree(source) == before  # the source run is only read
    continued = cut_after(source, tmp_path / "continued", start or 8)  # the source itself, continued in place
    proc = gptforge("--resume", continued, "--max-steps", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    same_state(continued, branch)
    saved = ckpt.saved_run_config(branch)[0]
    assert saved["train"]["out"] == str(branch)


def test_branch_mistakes_are_one_line_and_write_nothing(corpus, source, tmp_path, capsys):
    before = tree(source)
    code, _, err = run(["train", "--resume", str(source), "--checkpoint", "4", "--max-steps", "12"], capsys)
    one_line_error(code, err, "--checkpoint 4 chooses where a branch starts")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = run(["train", "--resume", str(source), "--out", str(taken), "--max-steps", "12"], capsys)
    one_line_error(code, err, "not empty")
    code, _, err = run(["train", "--resume", str(source), "--out", str(tmp_path / "b"), "--checkpoint", "3",
                        "--max-steps", "12"], capsys)
    one_line_error(code, err, "no checkpoint of step 3")
    assert not (tmp_path / "b" / ckpt.CONFIG).exists()
    assert tree(source) == before and (taken / "notes.txt").read_text() == "mine"


def test_checkpoint_files_follow_the_umask(source):
    mask = os.umask(0o022)
    os.umask(mask)
    files = [p for d in ckpt.checkpoint_dirs(source) for p in d.iterdir()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
