"""Named points where a test can kill the process: fault injection chosen by progress, never by a clock.

The environment variable ``GPTFORGE_FAULT`` arms points; each is ``NAME`` or ``NAME:N`` (the N-th
time this process passes it, default the first), optionally ``@R`` for one rank of a torchrun
launch, several separated by commas::

    GPTFORGE_FAULT=ckpt-before-rename:3 gptforge train ...      dies inside the third checkpoint write
    GPTFORGE_FAULT=step-mid:5@1 gptforge train --nproc 2 ...   rank 1 dies in the middle of step 5

The process dies by SIGKILL, as from the kernel's OOM killer or a pulled plug: no handler, no
cleanup runs. ``NAME:N:SIGTERM`` (any signal name) sends that signal instead, at that moment, e.g.
to test what the handlers of SIGTERM and SIGINT do. With the variable unset, `point` is one
dictionary lookup. Points are armed in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0):
workers that `--max-restarts` starts again after the kill run on.

Points (where they sit is what a kill there leaves behind):

    step-mid               after the backward pass of a step, before the optimizer update
    ckpt-after-weights     a checkpoint's model.safetensors written, state.pt not yet
    ckpt-after-state       model.safetensors (a sharded checkpoint: meta.json) and state.pt written, no
                           checksums.json yet
    ckpt-after-shards      a sharded checkpoint: this rank's shards written, the checkpoint not yet sealed
    ckpt-before-rename     the temporary checkpoint directory complete and fsynced, not yet renamed
    ckpt-before-prune      the new checkpoint renamed into place, older ones not yet deleted
    metrics-line           half of a metrics.jsonl line written (a torn last line)
    write-<file name>      an atomic write's temporary file complete, not yet renamed (e.g. write-loss.png)
    prepare-inside-shard   `prepare` has written part of a shard's tokens
    prepare-between-shards `prepare` has finished one shard and recorded its state, the next not begun
"""

from __future__ import annotations

import os
import signal

ENV = "GPTFORGE_FAULT"


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    rank = os.environ.get("RANK", "0")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return {}
    armed: dict[str, tuple[int, signal.Signals]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, only_rank = item.partition("@")
        if only_rank and only_rank != rank:
            continue
        name, _, rest = item.partition(":")
        count, _, sig = rest.partition(":")
        armed[name] = (int(count or 1), signal.Signals[sig or "SIGKILL"])
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))
_passed: dict[str, int] = {}


def hit(name: str) -> bool:
    """Count one pass of the point `name`; True when this is the pass a test armed it for."""
    if not _ARMED or name not in _ARMED:
        return False
    _passed[name] = _passed.get(name, 0) + 1
    return _passed[name] == _ARMED[name][0]


def kill(name: str | None = None) -> None:
    """Die at once, as a SIGKILL from outside would make the process die (or send the signal `name` was armed with)."""
    os.kill(os.getpid(), _ARMED[name][1] if name in _ARMED else signal.SIGKILL)


def point(name: str) -> None:
    """Die here (or receive the armed signal) if a test armed this point for this pass."""
    if hit(name):
        kill(name)
