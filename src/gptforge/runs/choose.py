"""Which checkpoint a SOURCE means: the run's best (RUN_DIR/best.json), its newest, or a step; and a weights file
given directly, checked against the checksums.json beside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint import (
    BEST,
    CHECKPOINTS,
    CHECKSUMS,
    WEIGHTS,
    atomic_write_bytes,
    checkpoint_dirs,
    checkpoint_weights,
    file_sha256,
    is_sharded,
    latest_checkpoint,
    step_name,
    verify_checkpoint,
)
from ..errors import CheckpointError

CHECKPOINT_CHOICES = "best, latest or a step number"


def write_best(run_dir: Path, best: dict) -> None:
    """best.json: the run's best evaluation (step, val_loss, val_bpb where known, tokens) and the directory of its
    checkpoint relative to the run; written after that checkpoint is committed."""
    record = {k: best[k] for k in ("step", "val_loss", "val_bpb", "tokens") if best.get(k) is not None}
    record["checkpoint"] = f"{CHECKPOINTS}/{step_name(best['step'])}"
    atomic_write_bytes(Path(run_dir) / BEST, (json.dumps(record, indent=1) + "\n").encode())


def read_best(run_dir: Path, warn=None) -> dict | None:
    """best.json's record, or None when the run has none (no val split, or written before gptforge kept the best);
    an unreadable one is reported through warn and treated as none."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        best = None
    if not isinstance(best, dict) or not isinstance(best.get("step"), int) or \
            not isinstance(best.get("val_loss"), (int, float)):
        if warn is not None:
            warn(f"{path} is unreadable (not a best.json gptforge wrote); ignoring it")
        return None
    return best


def choose_checkpoint(run_dir: Path, which: str = "best", note=None, warn=None) -> Path:
    """The checkpoint of a run that a SOURCE run directory means: its best (best.json) by default, else its newest
    intact one; `which` = latest (the newest) or a step number chooses another. `note` gets one line saying which
    checkpoint and why; `warn` a best checkpoint that is missing or damaged (the newest is used then)."""
    run_dir, say = Path(run_dir), note or (lambda message: None)
    best = read_best(run_dir, warn)
    dirs = checkpoint_dirs(run_dir)
    newest = f"newest is step {int(dirs[-1].name[5:])}" if dirs else "no checkpoint"
    about_best = f"best val loss {best['val_loss']:.4f} at step {best['step']}" if best else None

    def intact_newest() -> Path:  # verified only when it is the one used: a checkpoint can be gigabytes
        latest = latest_checkpoint(run_dir, warn)
        if latest is None:
            raise CheckpointError(f"{run_dir}: every checkpoint is damaged (checksum mismatch)")
        return latest

    if which == "latest":
        latest = intact_newest()
        say(f"using {latest}: the newest checkpoint (--checkpoint latest)" + (f"; {about_best}" if best else ""))
        return latest
    if which != "best":
        if not which.isdigit():
            raise CheckpointError(f"--checkpoint {which!r}: choose {CHECKPOINT_CHOICES}")
        chosen = run_dir / CHECKPOINTS / step_name(int(which))
        if not chosen.is_dir():
            steps = ", ".join(str(int(d.name[5:])) for d in checkpoint_dirs(run_dir))
            raise CheckpointError(f"--checkpoint {which}: {run_dir} has no checkpoint of step {int(which)} "
                                  f"(it has steps {steps}); choose one of those, best or latest")
        verify_checkpoint(chosen)
        say(f"using {chosen}: step {int(which)} (--checkpoint {which}); {newest}"
            + (f", {about_best}" if best else ""))
        return chosen
    if best is None:
        latest = intact_newest()
        say(f"using {latest}: the newest checkpoint (the run has no {BEST}: no val split, or an earlier release)")
        return latest
    chosen = run_dir / CHECKPOINTS / step_name(best["step"])
    try:
        if not chosen.is_dir():
            raise CheckpointError(f"{chosen} is missing")
        verify_checkpoint(chosen)
    except CheckpointError as e:
        latest = intact_newest()
        if warn is not None:
            warn(f"the best checkpoint is unusable ({e}); using the newest, {latest}")
        return latest
    say(f"using {chosen}: {about_best}; {newest}")
    return chosen


def is_run_dir(path: Path) -> bool:
    """A run directory with checkpoints (not a checkpoint directory itself)."""
    path = Path(path)
    return path.is_dir() and not ((path / WEIGHTS).is_file() or is_sharded(path)) and bool(checkpoint_dirs(path))


def source_checkpoint(source: str, which: str | None, note, warn=None) -> str:
    """SOURCE as the commands take it: a run directory becomes its chosen checkpoint (choose_checkpoint, `which`
    default best); anything else stays itself, and --checkpoint with it is a mistake."""
    if is_run_dir(Path(source)):
        return str(choose_checkpoint(Path(source), which or "best", note, warn))
    if which is not None:
        raise CheckpointError(f"--checkpoint {which}: chooses among a run directory's checkpoints, and {source} is "
                              "not a run directory with checkpoints; leave --checkpoint out")
    return source


def verify_listed(path: Path) -> None:
    """A checkpoint's file given by itself (its model.safetensors as SOURCE): checked against the checksums.json
    beside it when that lists it, as its whole checkpoint directory would be."""
    sums = Path(path).parent / CHECKSUMS
    if not sums.is_file():
        return
    try:
        digest = json.loads(sums.read_text()).get(Path(path).name)
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{sums}: unreadable (not the checksums.json gptforge wrote), so {path} cannot be "
                              "checked; restore it or move the file elsewhere") from None
    if digest is not None and file_sha256(path) != digest:
        raise CheckpointError(f"{path}: checksum mismatch with {sums} (the file is damaged or incomplete); use "
                              "another checkpoint of the run")


def resolve_weights(source: str | Path, verify: bool = True) -> Path:
    """A run dir (its best checkpoint, else its newest), a checkpoint dir or a .safetensors file -> the weights
    file to load (for a sharded checkpoint: its directory, `checkpoint_weights`). A file or checkpoint directory is
    checked against its checksums.json (`verify`: unless the caller just did)."""
    p = Path(source)
    if p.is_file():
        if verify:
            verify_listed(p)
        return p
    if p.is_dir():
        if (p / WEIGHTS).is_file() or is_sharded(p):
            if verify and (p / CHECKSUMS).is_file():
                verify_checkpoint(p)
            return checkpoint_weights(p)
        if checkpoint_dirs(p):
            return checkpoint_weights(choose_checkpoint(
                p, warn=lambda msg: print(f"gptforge: warning: {msg}", file=sys.stderr)))
        raise CheckpointError(f"{p}: neither a run directory with checkpoints nor a checkpoint directory")
    raise CheckpointError(f"{p}: no such file or directory")
