"""A run directory's life: one training process at a time (RUN_DIR/run.lock), and branches (`--resume RUN --out NEW`).

The lock is a file the training process holds an exclusive `flock` on while it runs (rank 0 under torchrun): the
kernel drops it when the process ends however it ends, so a killed run leaves no lock to clean by hand; the file
names the holder (PID, host, start, command) for the message a second process gets. Where the filesystem has no
locks (`flock` fails with ENOLCK or EOPNOTSUPP), the file alone decides: a holder on this host whose PID has ended
is stale and replaced; one on another host is refused with the way to remove it.

`eval`, `generate`, `serve` and `convert` never take the lock: they read sealed checkpoints (each written whole
beside the others, then renamed into place), so they use a run that is training without waiting for it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file alone decides
    fcntl = None

from ..checkpoint import (
    CHECKPOINTS,
    CONFIG,
    METRICS,
    RUN_TOKENIZER,
    CheckpointError,
    checkpoint_dirs,
    latest_checkpoint,
)
from .choose import choose_checkpoint

LOCK = "run.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def read_holder(run_dir: Path) -> dict | None:
    """What run.lock says of its holder ({} when unreadable), or None when there is no lock file."""
    try:
        holder = json.loads((Path(run_dir) / LOCK).read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def describe_holder(run_dir: Path, holder: dict) -> str:
    if not holder:
        return f"{run_dir} is in use by another training process ({LOCK} is held)"
    return (f"{run_dir} is in use by PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command', 'gptforge train')})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lockable(fd: int) -> bool | None:
    """Take the exclusive lock on fd: True when taken, False when another process holds it, None when the
    filesystem has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_LOCKS:
            return None
        raise


def in_use(run_dir: Path) -> str | None:
    """Why run_dir cannot be trained now (another process holds its lock), or None. Takes nothing."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or no directory, or a file in its place: the other checks say so)
        return None
    try:
        taken = _lockable(fd)
    finally:
        os.close(fd)  # closing drops a lock taken just to look
    holder = read_holder(run_dir) or {}
    if taken is None:  # no locks here: the file decides
        return None if _stale(holder) else _without_locks(run_dir, holder)
    return None if taken else describe_holder(run_dir, holder)


def _stale(holder: dict) -> bool:
    """A holder recorded on this host whose process has ended."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def _without_locks(run_dir: Path, holder: dict) -> str:
    return (describe_holder(run_dir, holder) + f"; this filesystem has no locks, so if no such process runs, "
            f"delete {Path(run_dir) / LOCK}")


class RunLock:
    """The lock of one run directory, held from `acquire` to `release` (use as a context manager)."""

    def __init__(self, run_dir: Path, command: str | None = None):
        self.run_dir, self.command = Path(run_dir), command or "gptforge " + " ".join(sys.argv[1:])
        self.fd: int | None = None
        self.made_dir = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Hold the lock, or raise CheckpointError naming the process that does."""
        self.made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        for _ in range(5):  # the file can be replaced between opening and locking it: then again
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            taken = _lockable(fd)
            if taken is None:
                holder = read_holder(self.run_dir) or {}
                if holder and not _stale(holder) and holder.get("pid") != os.getpid():
                    os.close(fd)
                    raise CheckpointError(_without_locks(self.run_dir, holder))
            elif not taken:
                os.close(fd)
                self._undo_dir()
                raise CheckpointError(describe_holder(self.run_dir, read_holder(self.run_dir) or {}) +
                                      "; wait for it to end or stop it (a killed run frees it at once)")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it as we opened it: lock the file that is there now
                os.close(fd)
                continue
            self.fd = fd
            self._write_holder()
            return
        raise CheckpointError(f"{path}: could not take the run's lock (it kept changing); try again")

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}
        data = json.dumps(holder).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Remove the lock file and let go of it; a directory the lock made and nothing else filled goes too."""
        if self.fd is None:
            return
        try:
            (self.run_dir / LOCK).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        self._undo_dir()

    def _undo_dir(self) -> None:
        if self.made_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run that wrote anything keeps its directory
            except OSError:
                pass


# ----------------------------------------------------------------------------- branches


def _link_or_copy(src: str, dst: str) -> None:
    """A checkpoint file into a branch: a hard link where the filesystem allows (checkpoint files are never changed
    in place, only replaced whole), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def branch_point(source: Path, which: str | None, note=None, warn=None) -> Path:
    """The checkpoint of `source` a branch starts from: its newest intact one, or --checkpoint's choice."""
    if which is not None:
        return choose_checkpoint(source, which, note, warn)
    latest = latest_checkpoint(source, warn)
    if latest is None:
        raise CheckpointError(f"--resume {source}: the run has no intact checkpoint to branch from")
    return latest


def branch_run(source: Path, target: Path, start: Path, log=print) -> None:
    """Make `target` a copy of `source`'s history up to checkpoint `start`: its checkpoints up to that step (hard
    links), metrics.jsonl (the resume drops the records after it), tokenizer and config; `source` is only read.
    On a failure (a full disk) what was made in `target` is removed again."""
    source, target = Path(source), Path(target)
    made: list[Path] = []
    try:
        for d in checkpoint_dirs(source):
            if d.name <= start.name:
                made.append(target / CHECKPOINTS / d.name)
                shutil.copytree(d, made[-1], copy_function=_link_or_copy)
        for name in (RUN_TOKENIZER, METRICS, CONFIG):  # config.toml last: it marks a run directory
            if (source / name).is_file():
                made.append(target / name)
                shutil.copy2(source / name, made[-1])
    except BaseException:
        for p in reversed(made):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if (target / CHECKPOINTS).is_dir() and not any((target / CHECKPOINTS).iterdir()):
            (target / CHECKPOINTS).rmdir()
        raise
    log(f"branch: {target} starts from {start} (step {int(start.name[5:])}); {source} is left as it is")
