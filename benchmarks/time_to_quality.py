"""Benchmark: the book, nanogpt and modern recipes side by side, the same minutes each, in held-out bpb.

For each corpus (the built-in one for --minutes, and --corpus for --corpus-minutes: by default the
Vim 9.0 documentation, 151 files / 9.5 MB, where installed) the recipes run in turn (`gptforge
bench quality`, one process each, alternating over --repeats), on the same text, held-out part,
transformer-block parameters and minutes. Then, per corpus: each recipe's final held-out bits per
byte and its best along the curve (a run that memorises its text is best before its end), modern's against
nanogpt's on both (target: at least 10% lower), and how long modern took to reach
nanogpt's final bpb (read off its curve of checkpoints, linearly between them) as a share of
nanogpt's time (target: at most 60%). Last line JSON.

    python benchmarks/time_to_quality.py [--minutes 1] [--corpus-minutes 3] [--repeats 1] [--corpus PATH ...]
                                         [--points 10] [--quick]

The built-in corpus is small (~130K tokens with a 4096-id tokenizer): runs longer than a minute or
two train many epochs over it and the held-out bpb rises again, which is why it gets fewer minutes.
--quick: tiny shapes and a few seconds per recipe, built-in corpus only (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RECIPES = ("nanogpt", "modern", "book")
VIM_DOCS = Path("/usr/share/vim/vim90/doc")
QUICK = ["--emb-dim", "32", "--n-layers", "1", "--head-dim", "16", "--context-length", "32", "--batch-size", "2",
         "--points", "2", "--tokenizer-vocab", "300", "--holdout", "0.005"]


def run_recipe(recipe: str, corpus: list[str], minutes: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "gptforge", "bench", "quality", *corpus, "--recipe", recipe, "--minutes",
           str(minutes), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_to_reach(curve: list[dict], bpb: float) -> float | None:
    """Training seconds at which the curve first reaches bpb (linear between points); None if it never does."""
    prev = dict(seconds=0.0, val_bpb=None)
    for point in curve:
        if point["val_bpb"] <= bpb:
            if prev["val_bpb"] is None:
                return point["seconds"]
            frac = (prev["val_bpb"] - bpb) / (prev["val_bpb"] - point["val_bpb"])
            return prev["seconds"] + frac * (point["seconds"] - prev["seconds"])
        prev = point
    return None


def summarise(name: str, results: dict[str, list[dict]]) -> dict:
    final = {r: statistics.median(x["val_bpb"] for x in runs) for r, runs in results.items()}
    best = {r: statistics.median(x["best_val_bpb"] for x in runs) for r, runs in results.items()}
    print(f"\n{name}: {'recipe':<8} {'steps':>6} {'tokens':>9} {'minutes':>7} {'final bpb':>9} {'best bpb':>8} "
          f"{'at s':>6} {'block params':>12}")
    for r, runs in results.items():
        x = runs[-1]
        print(f"{'':<{len(name) + 2}}{r:<8} {x['steps']:>6} {x['tokens']:>9} {x['minutes']:>7.2f} {final[r]:>9.4f} "
              f"{best[r]:>8.4f} {x['best_seconds']:>6.1f} {x['block_params']:>12,}")
    out = {"corpus": name, "final_bpb": final, "best_bpb": best}
    if "modern" in final and "nanogpt" in final:
        out["modern_vs_nanogpt_bpb"] = round(final["modern"] / final["nanogpt"], 4)
        out["modern_vs_nanogpt_best_bpb"] = round(best["modern"] / best["nanogpt"], 4)
        nano = results["nanogpt"][-1]
        reach = [time_to_reach(x["curve"], final["nanogpt"]) for x in results["modern"]]
        nano_seconds = nano["minutes"] * 60
        shares = [t / nano_seconds for t in reach if t is not None]
        out["modern_time_to_nanogpt_bpb"] = round(statistics.median(shares), 4) if len(shares) == len(reach) else None
        print(f"modern / nanogpt final bpb: {out['modern_vs_nanogpt_bpb']:.3f}, best bpb: "
              f"{out['modern_vs_nanogpt_best_bpb']:.3f} (target <= 0.90); time to nanogpt's final bpb: "
              f"{out['modern_time_to_nanogpt_bpb']} of nanogpt's time (target <= 0.60)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="per recipe on the built-in corpus")
    parser.add_argument("--corpus-minutes", type=float, default=3.0, help="per recipe on the second corpus")
    parser.add_argument("--corpus-holdout", type=float, default=0.02, help="held-out share of the second corpus")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--corpus", nargs="*", default=None, help="the second corpus (files or directories)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    points = ["--points", str(args.points)]
    corpora = {"built-in": ([], QUICK if args.quick else points, 0.02 if args.quick else args.minutes)}
    if not args.quick:
        second = args.corpus if args.corpus is not None else (
            [str(VIM_DOCS)] if VIM_DOCS.is_dir() else [])  # train reads a directory's *.txt, sorted
        if second:
            corpora["vim-docs" if args.corpus is None else "corpus"] = (
                second, [*points, "--holdout", str(args.corpus_holdout)], args.corpus_minutes)
    results = {name: {r: [] for r in args.recipes} for name in corpora}
    for _ in range(args.repeats):
        for name, (corpus, extra, minutes) in corpora.items():
            for recipe in args.recipes:
                results[name][recipe].append(run_recipe(recipe, corpus, minutes, extra))
    summary = [dict(summarise(name, res), minutes=corpora[name][2]) for name, res in results.items()]
    print(json.dumps({"repeats": args.repeats, "corpora": summary}))


if __name__ == "__main__":
    main()
