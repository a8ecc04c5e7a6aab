"""Experiment trackers: TensorBoard, SwanLab, Weights & Biases, behind one small interface.

metrics.jsonl (report.MetricsLog) is always written; trackers chosen with ``--logger`` receive the
same records. Each tracker is an optional extra (``pip install 'gptforge[tensorboard]'``);
`check_loggers` runs before training starts, so a missing package is a one-line error and never
a crash mid-run. Only rank 0 logs (``RANK`` from torchrun).
"""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..distributed import is_main

LOGGERS = ("tensorboard", "swanlab", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb"}  # tracker -> import name

# metrics.jsonl keys -> tracker tags; a key with a slash (task/hellaswag/acc) is its own tag; any other number
# in a record is logged as "<event>/<key>"
TAGS = {
    ("train", "train_loss"): "train/loss",
    ("train", "lr"): "train/lr",
    ("train", "grad_norm"): "train/grad_norm",
    ("train", "tokens_per_s"): "train/tokens_per_s",
    ("train", "tokens"): "train/tokens_seen",
    ("eval", "train_loss"): "eval/train_loss",
    ("eval", "val_loss"): "eval/val_loss",
    ("eval", "val_perplexity"): "eval/val_perplexity",
    ("eval", "train_bpb"): "eval/train_bpb",
    ("eval", "val_bpb"): "eval/val_bpb",
    ("eval", "tokens"): "eval/tokens_seen",
}
SKIP = {"event", "step", "sample"}


def check_loggers(names: list[str]) -> None:
    """Fail before training if a chosen tracker is unknown or its package is not installed."""
    if isinstance(names, str):
        raise ConfigError(f"logger must be a list of tracker names, e.g. [{names!r}], got {names!r}")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"unknown --logger {name!r}; choose from {', '.join(LOGGERS)} "
                              "(metrics.jsonl is always written)")
        if importlib.util.find_spec(PACKAGE[name]) is None:
            raise ConfigError(f"--logger {name} needs the {PACKAGE[name]} package: "
                              f"pip install 'gptforge[{name}]'")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record under tracker tags: {"train/loss": 4.2, ...}."""
    event = record.get("event", "train")
    out = {f"{event}/expert_load/layer{i}/expert{e}": float(share)  # a mixture of experts' load, per layer
           for i, row in enumerate(record.get("expert_load", ())) for e, share in enumerate(row)}
    for key, value in record.items():
        if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[key if "/" in key else TAGS.get((event, key), f"{event}/{key}")] = float(value)  # task/NAME/acc as it is
    if event == "train":
        out.update(memory_stats())
    return out


def memory_stats() -> dict[str, float]:
    """Peak memory: CUDA's allocator when it is in use, else the process's peak resident size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"system/cuda_peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"system/peak_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists become strings (hparams want scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Tracker:
    """What a tracker does: take a record, take a config once, close."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """Event files in the run directory itself: `tensorboard --logdir runs/` shows one run per directory."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run hides the events an interrupted run wrote after its checkpoint
        self.writer = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            hp = flat_config(config)
            for summary in hparams(hp, {"eval/val_loss": 0.0, "eval/train_loss": 0.0, "eval/val_bpb": 0.0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in hp.items()), 0)

    def log(self, record: dict) -> None:
        step = record["step"]
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if "sample" in record:
            self.writer.add_text("samples", "    " + record["sample"].replace("\n", "\n    "), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class SwanLabTracker(Tracker):
    """SwanLab, in offline mode (records under RUN_DIR/swanlog) unless SWANLAB_MODE or a login says otherwise."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import swanlab

        mode = None if os.environ.get("SWANLAB_MODE") or os.environ.get("SWANLAB_API_KEY") else "offline"
        self.swanlab = swanlab
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "gptforge"), name=run_dir.name,
                                log_dir=str(run_dir / "swanlog"), mode=mode, config=config, reinit=True)

    def log(self, record: dict) -> None:
        data: dict[str, Any] = dict(scalars(record))
        if "sample" in record:
            data["samples"] = self.swanlab.Text(record["sample"])
        self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class WandbTracker(Tracker):
    """Weights & Biases, offline (records under RUN_DIR/wandb) unless WANDB_MODE or WANDB_API_KEY is set."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb = wandb
        self.samples: list[list] = []
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptforge"), name=run_dir.name,
                              dir=str(run_dir), mode=mode, config=config, reinit="finish_previous")

    def log(self, record: dict) -> None:
        data: dict[str, Any] = dict(scalars(record))
        if "sample" in record:
            self.samples.append([record["step"], record["sample"]])
            data["samples"] = self.wandb.Table(columns=["step", "sample"], data=list(self.samples))
        self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "swanlab": SwanLabTracker, "wandb": WandbTracker}


class Trackers:
    """All chosen trackers as one: the training loop calls log(record) and close()."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(names: list[str], run_dir: Path, config: dict, resume_step: int | None = None) -> Trackers:
    """Start the chosen trackers for a run (none on ranks other than 0)."""
    check_loggers(names)
    if not is_main():
        return Trackers([])
    return Trackers([TRACKERS[name](Path(run_dir), config, resume_step) for name in dict.fromkeys(names)])
