"""What a run shows and leaves behind: metrics.jsonl, loss.png (and tasks.png), the progress bar and log lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tqdm import tqdm

from .. import faults
from ..checkpoint import atomic_write_bytes
from ..evaluate import perplexity
from ..perf import mfu


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl.

    When a run resumes from step N, events logged after N by the interrupted run are dropped
    first, so the file reads as if the run had never stopped (-1 drops everything).
    """

    def __init__(self, path: Path | None, resume_step: int = -1, warn=None):
        """path None keeps the records in memory only (the ranks of a torchrun launch other than 0)."""
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        if self.path is not None and self.path.exists():
            self.records = self._read(warn or (lambda message: None))
            self.records = [r for r in self.records if r.get("step", 0) <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write_bytes(self.path, text.encode())

    def _read(self, warn) -> list[dict]:
        """The file's records; a torn last line (a crash mid-write) is dropped, damaged lines kept in a copy."""
        data = self.path.read_bytes()
        lines = data.decode("utf-8", errors="replace").splitlines()
        records, bad = [], []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(i)
        if bad == [len(lines)] and not data.endswith(b"\n"):
            warn(f"gptforge: warning: {self.path}: dropped the cut-off last line {bad[0]} (written when the run "
                 "was killed)")
        elif bad:
            copy = self.path.with_name(self.path.name + ".damaged")
            n = 1
            while copy.exists():
                copy, n = self.path.with_name(f"{self.path.name}.damaged-{n}"), n + 1
            copy.write_bytes(data)
            warn(f"gptforge: warning: {self.path}: line(s) {', '.join(map(str, bad[:5]))} are not JSON records "
                 f"and were left out; the file as it was is kept in {copy}")
        return records

    def log(self, **record) -> None:
        record = {k: v for k, v in record.items() if v is not None}
        self.records.append(record)
        if self.path is not None:
            line = json.dumps(record) + "\n"
            with open(self.path, "a") as f:
                if faults.hit("metrics-line"):  # a test's kill in the middle of writing a line
                    f.write(line[: len(line) // 2])
                    f.flush()
                    faults.kill("metrics-line")
                f.write(line)



def best_eval(records: list[dict]) -> dict | None:
    """The evaluation with the lowest val loss after step 0 (the first such), as the training loop keeps its best;
    None without val losses."""
    evals = [r for r in records if r.get("event") == "eval" and r.get("step", 0) > 0 and "val_loss" in r]
    return min(evals, key=lambda r: r["val_loss"]) if evals else None


def plot_losses(records: list[dict], path: Path) -> None:
    """loss.png: train and val loss of each evaluation against steps, tokens seen on the top axis, the best
    evaluation (lowest val loss) marked; a second panel with train and val bits per byte when the records have them
    (older runs: one panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("event") == "eval"]
    with_bpb = any("train_bpb" in r or "val_bpb" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if with_bpb else 1, figsize=(12 if with_bpb else 7, 4), dpi=100, squeeze=False)
    panels = [("loss", "_loss"), ("bits per byte", "_bpb")][: axes.shape[1]]
    steps = [r for r in evals if r["step"] > 0]
    tokens_per_step = steps[-1]["tokens"] / steps[-1]["step"] if steps else None
    best = best_eval(evals)
    for ax, (ylabel, suffix) in zip(axes[0], panels):
        for split in ("train", "val"):
            pts = [(r["step"], r[split + suffix]) for r in evals if split + suffix in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=split)
        if best is not None and "val" + suffix in best:
            ax.axvline(best["step"], color="0.5", linestyle=":", linewidth=1)
            ax.plot([best["step"]], [best["val" + suffix]], marker="*", markersize=12, color="tab:red", linestyle="",
                    label=f"best: step {best['step']}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if evals:
            ax.legend()
        if tokens_per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
            top.set_xlabel("tokens seen")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def task_keys(records: list[dict]) -> tuple[list[str], list[str]]:
    """The task/NAME/METRIC keys (and `core`) of the evaluation records: (accuracies, perplexities), in order of
    appearance."""
    keys = list(dict.fromkeys(k for r in records if r.get("event") == "eval" for k in r
                              if k.startswith("task/") or k == "core"))
    return [k for k in keys if not k.endswith("/perplexity")], [k for k in keys if k.endswith("/perplexity")]


def plot_tasks(records: list[dict], path: Path) -> None:
    """tasks.png: each --eval-task's acc and acc_norm against steps; a second panel for perplexities (LAMBADA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(keys, label) for keys, label in zip(task_keys(records), ("accuracy", "perplexity")) if keys]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 4), dpi=100, squeeze=False)
    for ax, (keys, ylabel) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get("event") == "eval" and key in r]
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key.removeprefix("task/"))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if ylabel == "perplexity" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"


class Progress:
    """A progress bar with step, loss, tokens/s and ETA; log lines print above it."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, quiet: bool = False,
                 flops_per_token: float = 0.0, peak_flops: float | None = None):
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not enabled,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )
        self.enabled = enabled
        self.quiet = quiet  # print nothing at all (ranks other than 0)
        self.rate: float | None = None
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # for MFU; no peak: not shown

    def step(self, loss: float, tokens: int, seconds: float, lr: float) -> float:
        """Advance one step that trained `tokens` tokens in `seconds`; returns the smoothed tokens/s."""
        tok_s = tokens / max(seconds, 1e-9)
        self.rate = tok_s if self.rate is None else 0.9 * self.rate + 0.1 * tok_s
        m = mfu(self.flops_per_token, self.rate, self.peak_flops)
        shown = f", MFU {m:.2f}" if m is not None else ""
        self.bar.set_postfix_str(f"loss {loss:.3f}, {human(self.rate)} tok/s{shown}, lr {lr:.2e}", refresh=False)
        self.bar.update(1)
        return self.rate

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line)
        elif not self.quiet:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


def format_eval(step: int, tokens: int, scores: dict) -> str:
    """The log line of an evaluation from its train_loss / val_loss (and train_bpb / val_bpb when known)."""
    parts = [f"step {step}", f"tokens {human(tokens)}"]
    for name in ("train", "val"):
        loss, bpb = scores.get(f"{name}_loss"), scores.get(f"{name}_bpb")
        if loss is None:
            continue
        extra = [f"ppl {perplexity(loss):.1f}"] if name == "val" else []
        extra += [f"bpb {bpb:.3f}"] if bpb is not None else []
        parts.append(f"{name} loss {loss:.3f}" + (f" ({', '.join(extra)})" if extra else ""))
    return " | ".join(parts)
