"""The errors a user can fix, one family: `cli.main` turns any `UserError` into one line, `gptforge: error: ...`, and
exit code 1. Each message names the flag (or the TOML key, the file, the line) and what to change.

Invariants of our own code are `assert`s, not these: a UserError always means the input, never a bug.
"""


class UserError(ValueError):
    """Something the user gave (a flag, a file, a run directory) that cannot be used as it is."""


class ConfigError(UserError):
    """A setting a user must fix; the message names the file, key or flag."""


class DataError(UserError):
    """Training or evaluation data that cannot be used as given; the message says what to change."""


class CheckpointError(UserError):
    """A model source or checkpoint that cannot be used; the message says why."""


class WeightsError(CheckpointError):
    """A model source that cannot be read; the message names the file, the tensor and the shapes."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and what to change."""
