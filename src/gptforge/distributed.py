"""Rank helpers: which process this is in a torchrun launch. The rest of gptforge asks these.

torchrun sets RANK and WORLD_SIZE for every process it starts; a plain `python` or `gptforge` run has
neither and is rank 0 of 1.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes in the run (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0."""
    return rank() == 0
