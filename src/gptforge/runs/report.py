"""`gptforge report`: one self-contained HTML file that shows and compares runs.

It reads each run's metrics.jsonl and config.toml and writes plots (matplotlib, embedded as base64
PNG), the configs side by side with differing rows highlighted, the samples of each evaluation and
the final losses and bits per byte (runs written before bpb existed show none), and the downstream
tasks' scores (--eval-task) with their curves. The file needs no
network and no other file to be viewed or shared.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoint import CONFIG, METRICS, atomic_write_bytes, check_writable
from ..config import ConfigError, tomllib
from .choose import read_best
from .metrics import best_eval, task_keys
from .trackers import flat_config

REPORT_MARK = b"<title>gptforge report"  # in the head of every report: only those are replaced


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    config: dict  # flat: {"train.lr": 0.001, ...}
    best: dict | None = None  # best.json: the best evaluation and its checkpoint (None: no val split, older runs)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "eval"]

    @property
    def trains(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "train"]


def load_run(path: str | Path) -> Run:
    """A run directory's metrics and config; a directory without metrics.jsonl is a user error."""
    path = Path(path)
    metrics = path / METRICS
    if not metrics.is_file():
        raise ConfigError(f"{path}: no {METRICS}; is this a gptforge run directory?")
    records, skipped = [], []
    lines = metrics.read_bytes().decode("utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip() and i < len(lines):  # the last line may be cut off by a crash: not worth a word
            skipped.append(i)
    if skipped:
        where = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        print(f"gptforge: warning: {metrics}: skipped {len(skipped)} damaged line(s) ({where})", file=sys.stderr)
    config: dict = {}
    if (path / CONFIG).is_file():
        try:
            config = flat_config(tomllib.loads((path / CONFIG).read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path / CONFIG}: not valid TOML ({e})") from None
    return Run(path.resolve().name, path, records, config, read_best(path))


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same directory name are told apart by their path
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


# ----------------------------------------------------------------------------- plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot(runs: list[Run], series: list[tuple[str, str, str]], x: str, ylabel: str, log_y: bool = False) -> str | None:
    """One figure, base64 PNG: for each run and each (event, key, label) series, key against x.

    Returns None when no run has any of the series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for i, run in enumerate(runs):
        for j, (event, key, label) in enumerate(series):
            pts = [(r[x], r[key]) for r in run.records
                   if r.get("event") == event and key in r and x in r and _finite(r[key])]
            if not pts:
                continue
            name = run.name if len(series) == 1 else f"{run.name} {label}"
            ax.plot(*zip(*pts), color=colors[i % len(colors)], linestyle=styles[j % len(styles)],
                    marker="o" if event == "eval" else None, markersize=3, label=name)
            drawn += 1
            best = best_eval(run.records) if event == "eval" and key.startswith("val_") else None
            if best is not None and _finite(best.get(key)):  # the best evaluation: the checkpoint the run keeps
                ax.plot([best[x]], [best[key]], marker="*", markersize=11, color=colors[i % len(colors)],
                        linestyle="")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel({"step": "step", "tokens": "tokens seen"}[x])
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.diff td { background: #fff3c4; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; }
.muted { color: #777; }
"""


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _figure(png: str | None, caption: str) -> str:
    if png is None:
        return ""
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def summary_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        last_eval = run.evals[-1] if run.evals else {}
        last = run.records[-1] if run.records else {}
        speeds = [r["tokens_per_s"] for r in run.trains if "tokens_per_s" in r]
        best = best_eval(run.records) or {}
        cells = [last.get("step"), last.get("tokens"), last_eval.get("train_loss"), last_eval.get("val_loss"),
                 last_eval.get("val_perplexity"), last_eval.get("val_bpb"),
                 sum(speeds) / len(speeds) if speeds else None, best.get("step"), best.get("val_loss"),
                 best.get("val_bpb")]
        kept = run.best["checkpoint"] if run.best and run.best.get("step") == best.get("step") else None
        rows.append(f"<tr><td>{html.escape(run.name)}</td>"
                    + "".join(f'<td class="num">{_fmt(c)}</td>' for c in cells)
                    + f"<td>{html.escape(_fmt(kept))}</td></tr>")
    head = ("<tr><th>run</th><th>steps</th><th>tokens seen</th><th>train loss</th><th>val loss</th>"
            "<th>val perplexity</th><th>val bpb</th><th>mean tokens/s</th><th>best step</th><th>best val loss</th>"
            "<th>best val bpb</th><th>best checkpoint</th></tr>")
    return f'<table id="summary">{head}{"".join(rows)}</table>'


def tasks_table(runs: list[Run]) -> str:
    """The downstream tasks' scores (--eval-task) at each run's last evaluation; "" when no run has any."""
    keys = [k for group in task_keys([r for run in runs for r in run.evals]) for k in group]
    if not keys:
        return ""
    rows = []
    for run in runs:
        last = next((r for r in reversed(run.evals) if any(k in r for k in keys)), {})
        rows.append(f"<tr><td>{html.escape(run.name)}</td><td class=\"num\">{_fmt(last.get('step'))}</td>"
                    + "".join(f'<td class="num">{_fmt(last.get(k))}</td>' for k in keys) + "</tr>")
    head = "<tr><th>run</th><th>step</th>" + "".join(f"<th>{html.escape(k[5:])}</th>" for k in keys) + "</tr>"
    return f'<h2>Downstream tasks</h2><table id="tasks">{head}{"".join(rows)}</table>'


def task_figures(runs: list[Run]) -> list[str]:
    """Accuracy (and perplexity) of each --eval-task against steps."""
    accuracies, perplexities = task_keys([r for run in runs for r in run.evals])
    accuracy = [("eval", k, k[5:]) for k in accuracies]
    ppl = [("eval", k, k[5:]) for k in perplexities]
    return [_figure(plot(runs, accuracy, "step", "accuracy") if accuracy else None,
                    "Downstream tasks (--eval-task): accuracy against steps"),
            _figure(plot(runs, ppl, "step", "perplexity", log_y=True) if ppl else None,
                    "Downstream tasks: perplexity against steps")]


def expert_figures(runs: list[Run]) -> list[str]:
    """A mixture of experts' routing (none for dense runs): each layer's busiest expert's share of the routed slots
    (1 / experts when balanced), and the load-balancing loss."""
    layers = max((len(r["expert_load"]) for run in runs for r in run.trains if "expert_load" in r), default=0)
    if not layers:
        return []
    busiest = [Run(run.name, run.path, [{**r, **{f"busiest/{i}": max(row) for i, row in enumerate(r["expert_load"])}}
                                        for r in run.trains if "expert_load" in r], run.config) for run in runs]
    series = [("train", f"busiest/{i}", f"layer {i}") for i in range(layers)]
    return [_figure(plot(busiest, series, "step", "busiest expert's share"),
                    "Mixture of experts: each layer's busiest expert's share of the routed tokens (expert_load)"),
            _figure(plot(runs, [("train", "aux_loss", "aux")], "step", "load-balancing loss"),
                    "Mixture of experts: the load-balancing loss added to the training loss (aux_loss)")]


def config_table(runs: list[Run]) -> str:
    """Every config key as a row, one column per run; rows whose values differ get class "diff"."""
    keys = sorted({k for run in runs for k in run.config})
    if not keys:
        return '<p class="muted">No config.toml found.</p>'
    rows = []
    for key in keys:
        values = [run.config.get(key) for run in runs]
        differs = len(runs) > 1 and any(v != values[0] for v in values)
        rows.append(f'<tr{" class=diff" if differs else ""}><td>{html.escape(key)}</td>'
                    + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in values) + "</tr>")
    head = "<tr><th>setting</th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"
    return f'<table id="config">{head}{"".join(rows)}</table>'


def samples_table(run: Run) -> str:
    evals = [r for r in run.evals if "sample" in r]
    if not evals:
        return '<p class="muted">No samples (sample_tokens = 0).</p>'
    rows = "".join(f'<tr><td class="num">{_fmt(r["step"])}</td><td class="num">{_fmt(r.get("val_loss"))}</td>'
                   f'<td><pre>{html.escape(r["sample"])}</pre></td></tr>' for r in evals)
    return f'<table class="samples"><tr><th>step</th><th>val loss</th><th>sample</th></tr>{rows}</table>'


def render(runs: list[Run]) -> str:
    """The whole report as one HTML string."""
    losses = [("eval", "train_loss", "train"), ("eval", "val_loss", "val")]
    figures = [
        _figure(plot(runs, losses, "step", "loss"), "Loss against steps (solid: train, dashed: val)"),
        _figure(plot(runs, losses, "tokens", "loss"), "Loss against tokens seen"),
        _figure(plot(runs, [("eval", "train_bpb", "train"), ("eval", "val_bpb", "val")], "step", "bits per byte"),
                "Bits per byte against steps (solid: train, dashed: val; tokenizer-independent)"),
        _figure(plot(runs, [("train", "train_loss", "train")], "step", "loss"), "Training loss of each logged step"),
        _figure(plot(runs, [("train", "lr", "lr")], "step", "learning rate"), "Learning-rate schedule"),
        _figure(plot(runs, [("train", "tokens_per_s", "tokens/s")], "step", "tokens/s"), "Throughput"),
        _figure(plot(runs, [("train", "grad_norm", "grad norm")], "step", "grad norm", log_y=True),
                "Gradient norm before clipping"),
        *task_figures(runs),
        *expert_figures(runs),
    ]
    names = ", ".join(html.escape(r.name) for r in runs)
    samples = "".join(f"<h3>{html.escape(r.name)}</h3>{samples_table(r)}" for r in runs)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gptforge report: {names}</title>
<style>{STYLE}</style></head>
<body>
<h1>gptforge report</h1>
<p class="muted">{len(runs)} run{"s" if len(runs) > 1 else ""}: {names} · written {made}</p>
<h2>Final results</h2>
<p class="muted">Best: each run's evaluation with the lowest val loss (★ on the curves), whose checkpoint the run
keeps (best.json) and eval, generate, serve and convert use.</p>
{summary_table(runs)}
{tasks_table(runs)}
<h2>Curves</h2>
<div class="plots">{"".join(figures)}</div>
<h2>Configuration</h2>
<p class="muted">Highlighted rows differ between the runs.</p>
{config_table(runs)}
<h2>Samples at each evaluation</h2>
{samples}
</body></html>
"""


def check_target(out: str | Path) -> Path:
    """The report's file, checked before any run is read: a new file, or a gptforge report to replace.

    Anything else at that path (a directory, the user's own file) is refused, as is a place that
    cannot be written.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give the name of the HTML file to write")
    if out.exists():
        try:
            with open(out, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot read the file already there ({e.strerror})") from None
        if REPORT_MARK not in head:
            raise ConfigError(f"--out {out}: exists and is not a gptforge report; remove it or choose another --out")
    check_writable(out.parent, "--out")
    return out


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Render the runs in run_dirs into the HTML file out (see check_target); returns its path."""
    seen: dict[Path, Path] = {}
    for d in map(Path, run_dirs):  # what was named first: a text file given as a run says so, not "--out"
        if d.is_file():
            raise ConfigError(f"{d}: is a file; report takes run directories (those `gptforge train` writes)")
        if (same := seen.setdefault(d.resolve(), d)) is not d:
            alias = f" ({same} and {d} are the same run)" if str(same) != str(d) else ""
            raise ConfigError(f"{d}: given twice{alias}; name each run once")
    out = check_target(out)
    runs = load_runs(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, render(runs).encode())
    return out
