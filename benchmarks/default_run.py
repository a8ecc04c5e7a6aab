"""Benchmark: `gptforge train` with no DATA (the built-in corpus), timed end to end.

Prints a table of the evaluations and, as its last line, JSON:
{"minutes", "val_loss_start", "val_loss_end", "val_bpb_start", "val_bpb_end", "train_loss_end", "train_tokens_per_s",
"steps", "tokens", "recipe", "params", "sample"}.

    python benchmarks/default_run.py [--quick] [--out DIR]

--quick trains 6 steps (to prove the script works); the full run is what README figures come from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gptforge.training import train
from gptforge.training.config import DEFAULT_CORPUS_RUN, resolve_train_config
from gptforge.weights import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 steps only")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="gptforge-bench-")) / "run"
    flags = {"out": str(out), "progress": False}
    if args.quick:
        flags.update(max_steps=6, eval_every=3, eval_batches=2)
    assert DEFAULT_CORPUS_RUN  # the recipe this benchmark measures
    cfg, run_dir = resolve_train_config((), None, None, None, flags)
    start = time.perf_counter()
    summary = train(cfg, run_dir, log=print)
    minutes = (time.perf_counter() - start) / 60
    evals = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == "eval"]
    print(f"{'step':>6} {'tokens':>9} {'train':>7} {'val':>7} {'val bpb':>8}")
    for r in evals:
        print(f"{r['step']:>6} {r['tokens']:>9} {r['train_loss']:>7.3f} {r['val_loss']:>7.3f} {r['val_bpb']:>8.3f}")
    print(json.dumps({
        "minutes": round(minutes, 2),
        "val_loss_start": round(evals[0]["val_loss"], 4),
        "val_loss_end": round(evals[-1]["val_loss"], 4),
        "val_bpb_start": round(evals[0]["val_bpb"], 4),
        "val_bpb_end": round(evals[-1]["val_bpb"], 4),
        "train_loss_end": round(evals[-1]["train_loss"], 4),
        "train_tokens_per_s": round(summary["tokens_per_s"], 1),
        "steps": summary["steps"],
        "tokens": evals[-1]["tokens"],
        "recipe": cfg.recipe,
        "params": load_model(run_dir)[0].num_params(),
        "sample": evals[-1].get("sample", ""),
    }))


if __name__ == "__main__":
    main()
