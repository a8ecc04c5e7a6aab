"""Training: a run's settings and their layering (config.py), the optimizer and schedule (optim.py), the
run's data, position and checkpoints (state.py), one optimizer step (step.py) and the loop (loop.py)."""

from .config import RunConfig, TrainConfig, resolve_train_config
from .loop import train
from .step import TrainingError

__all__ = ["RunConfig", "TrainConfig", "TrainingError", "resolve_train_config", "train"]
