"""The best evaluation of a run, and what the loop says and does when val loss stops improving.

`Best` follows the run's evaluations: a new lowest val loss (after step 0) is a new best, whose checkpoint
the loop saves and never prunes (RUN_DIR/best.json names it). When val loss has not improved for
`PATIENCE` evaluations in a row while the train loss did, the model is memorising its text: one line says
so, once per episode (until the next best). `--early-stop N` ends the run after N evaluations without a
new best. Its state travels in every checkpoint's state.pt, so a resumed run goes on as if never stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PATIENCE = 2  # evaluations without a new best (while train loss falls) before the overfitting line
DIVERGED = 1.5  # a train loss this many times that of guessing every token alike (ln V) means the run diverged


def diverging(loss: float, step: int, vocab_size: int, lr: float) -> str | None:
    """The line to print when a step's train loss is far above an untrained model's (ln V nats, uniform guessing):
    the updates are making the model worse than knowing nothing, nearly always a learning rate too high."""
    uniform = math.log(vocab_size)
    if not math.isfinite(loss) or loss <= DIVERGED * uniform:
        return None
    return (f"gptforge: warning: diverging: train loss {loss:.4g} at step {step} is above {DIVERGED:g} x "
            f"{uniform:.2f} (ln {vocab_size:,}, what guessing every token alike scores); the learning rate {lr:.3g} "
            "is likely too high: lower --lr (e.g. ten times), add --warmup-steps or keep --grad-clip on")


@dataclass
class Verdict:
    """What one evaluation means for the run: a new best (save it), a line to print, or the end of the run."""

    new_best: bool = False
    message: str | None = None
    stop: str | None = None  # why the run ends early (--early-stop), or None


@dataclass
class Best:
    step: int | None = None  # the best evaluation's step; None before the first
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens: int | None = None
    train_loss: float | None = None  # the train loss the evaluation scored at the best step
    stale: int = 0  # evaluations since the best without a new one
    warned: bool = False  # the overfitting line of this episode was printed

    def observe(self, record: dict, epochs: float, early_stop: int | None) -> Verdict:
        """Take an evaluation record (step, tokens, val_loss, train_loss, val_bpb); `epochs`: passes over the
        training text so far."""
        val, step = record.get("val_loss"), record["step"]
        if val is None or step == 0 or not math.isfinite(val):  # no val split; step 0: the untrained model
            return Verdict()
        if self.val_loss is None or val < self.val_loss:
            self.step, self.val_loss, self.val_bpb = step, val, record.get("val_bpb")
            self.tokens, self.train_loss, self.stale, self.warned = record["tokens"], record.get("train_loss"), 0, False
            return Verdict(new_best=True)
        self.stale += 1
        verdict = Verdict()
        train = record.get("train_loss")
        if self.stale >= PATIENCE and not self.warned and epochs > 1 and train is not None \
                and self.train_loss is not None and train < self.train_loss:  # memorising takes more than one pass
            self.warned = True
            verdict.message = (
                f"overfitting: val loss {val:.4f} has not improved on its best {self.val_loss:.4f} (step {self.step}) "
                f"for {self.stale} evaluations while train loss fell {self.train_loss:.4f} -> {train:.4f}; "
                f"{epochs:.1f} epochs over the training text so far. More text, a smaller model or fewer steps help; "
                f"--early-stop N ends a run after N evaluations without a new best. The best checkpoint is kept")
        if early_stop and self.stale >= early_stop:
            verdict.stop = self.stopped_because(early_stop)
        return verdict

    def stopped_because(self, early_stop: int) -> str:
        return (f"--early-stop {early_stop}: val loss has not improved for {self.stale} evaluations "
                f"(best {self.val_loss:.4f} at step {self.step})")

    def record(self) -> dict:
        """What best.json holds (checkpoint.write_best adds the checkpoint's directory)."""
        return dict(step=self.step, val_loss=self.val_loss, val_bpb=self.val_bpb, tokens=self.tokens)

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
