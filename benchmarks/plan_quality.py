"""Benchmark: does `gptforge train DATA --minutes M` (the plan's model, batch, context and learning rate) do as well
as the best of a grid of fixed shapes given the same minutes, in held-out bits per byte?

For each corpus and each budget (--minutes, default 1 and 3), the text is cut once (`quality.split_holdout`:
whole documents from the end, --holdout of the characters) and, one process each, on the rest:

- plan: `gptforge train TRAIN --minutes M` (nothing else: the plan chooses the modern recipe's shape, batch,
  context, learning rate and a 4,096-id tokenizer, and times its own steps for the length);
- grid: the same recipe and tokenizer with each of GRID's fixed shapes (the plan's ladder rungs, llama-mini's
  4 x 128 among them), `--minutes M` with the shape flags (only the length planned: batch and context the recipe's);

each scored with `gptforge eval RUN HELDOUT` at its best checkpoint (`--checkpoint best`, the lowest val loss, where
this gptforge has it; else the newest). Per corpus and budget: the plan's held-out bpb, the grid's best and which
shape, their ratio (target: at most 1.03), and the llama-mini shape's final-checkpoint bpb (the default model; target:
the plan lower). Last line JSON, with the machine, commit and command.

Corpora: the built-in one (pydoc's topics, ~430 KB); Python's standard-library docstrings (module, class and
function docstrings of every stdlib module outside the tests, idlelib, lib2to3 and site-packages, one document
per module with at least 200 characters of them: 388 modules, 1.6 MB on CPython 3.11.7); the Vim 9.0
documentation (/usr/share/vim/vim90/doc/*.txt, 151 files, 9.5 MB) where installed; Debian's fortune cookies
(/usr/share/games/fortunes, `apt-get install fortunes`: quotations, jokes and verse, 2.6 MB) where installed.

    python benchmarks/plan_quality.py [--minutes 1 3] [--corpora built-in docstrings vim-docs fortunes] [--quick]

The full run trains 8 runs per corpus and budget, 8 x (1 + 3) = 32 minutes of training per corpus (with start-up
and scoring, well over an hour in all); --quick: the built-in corpus, a 300-id tokenizer, three tiny shapes and
about a second of training each (what tests/test_plan.py runs).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from gptforge.data import default_documents, read_texts
from gptforge.perf import device_name
from gptforge.quality import split_holdout, write_documents
from gptforge.training.ladder import LADDER, ladder_shape

VIM_DOCS = Path("/usr/share/vim/vim90/doc")
FORTUNES = Path("/usr/share/games/fortunes")  # Debian's fortunes and fortunes-min packages
FORTUNES_PER_DOCUMENT = 20
GRID = LADDER[:7]  # (n_layers, emb_dim): 1 x 32 to 8 x 256, llama-mini's 4 x 128 among them
DEFAULT_SHAPE = (4, 128)  # llama-mini, the modern recipe's preset
COMMON = ["--no-progress", "--sample-tokens", "0", "--keep-last", "1"]
QUICK_GRID = ((1, 32), (2, 64), DEFAULT_SHAPE)
QUICK = ["--tokenizer-vocab", "300", "--eval-every", "20", "--eval-batches", "2"]


def stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its module, class and function docstrings (at least 200 chars)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("test", "idlelib", "lib2to3", "site-packages") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        text = "\n\n".join(d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node)))
        if len(text) >= 200:
            docs.append(text)
    return docs


def fortunes() -> list[str]:
    """Debian's fortune cookies (quotations, jokes, verse: 44 files, 2.6 MB), FORTUNES_PER_DOCUMENT consecutive
    ones of a file per document, the documents in a fixed shuffled order (so the held-out end is all categories)."""
    docs = []
    for path in sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix):
        items = [c.strip("\n") for c in path.read_text(encoding="utf-8").split("\n%\n") if c.strip()]
        docs += ["\n%\n".join(items[i:i + FORTUNES_PER_DOCUMENT]) for i in range(0, len(items), FORTUNES_PER_DOCUMENT)]
    random.Random(0).shuffle(docs)
    return docs


AVAILABLE = {"built-in": True, "docstrings": True, "vim-docs": VIM_DOCS.is_dir(), "fortunes": FORTUNES.is_dir()}


def corpus_documents(name: str) -> list[str]:
    if name == "built-in":
        return default_documents()
    if name == "docstrings":
        return stdlib_docstrings()
    if name == "vim-docs":
        return read_texts([str(VIM_DOCS)])
    if name == "fortunes":
        return fortunes()
    raise SystemExit(f"unknown corpus {name!r}; choose one of {', '.join(AVAILABLE)}")


def gptforge(*args: str) -> str:
    cmd = [sys.executable, "-m", "gptforge", *args]
    print("$ gptforge", " ".join(args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: gptforge {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def has_best_checkpoint() -> bool:
    """Whether this gptforge's eval takes --checkpoint best|latest (else it scores a run's newest checkpoint)."""
    return "--checkpoint" in gptforge("eval", "--help")


def held_out_bpb(run_dir: Path, heldout: str, which: str, selectable: bool) -> float:
    extra = ["--checkpoint", which] if selectable else []
    return json.loads(gptforge("eval", str(run_dir), heldout, "--json", *extra).strip().splitlines()[-1])["bpb"]


def shape_flags(n_layers: int, emb_dim: int) -> list[str]:
    shape = ladder_shape("llama", n_layers, emb_dim)
    return [s for k, v in shape.items() for s in (f"--{k.replace('_', '-')}", str(v))]


class Cache:
    """Each run's scores by (corpus, minutes, run) in OUT/runs.json, so a benchmark cut short (or the grid, which
    does not depend on the plan's rules) is not trained again with --out: delete the file to start afresh."""

    def __init__(self, path: Path | None):
        self.path = path
        self.runs = json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def get(self, key: str, make) -> dict:
        if key not in self.runs:
            self.runs[key] = make()
            if self.path is not None:
                self.path.write_text(json.dumps(self.runs, indent=1))
        return self.runs[key]


def scored_run(train: str, heldout: str, run_dir: Path, args: list[str], selectable: bool) -> dict:
    """Train one run and score its best and newest checkpoints on the held-out text (a run directory left by a
    benchmark cut short is trained again)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log = gptforge("train", train, *args, "--out", str(run_dir), *COMMON)
    chosen = next((line for line in log.splitlines() if line.startswith("plan: ") and "parameters" in line), "")
    timed = next((line for line in log.splitlines() if line.startswith("minutes: ")), "")
    best_json = run_dir / "best.json"
    return {"steps": int(timed.split(" -> ")[1].split()[0].replace(",", "")) if " -> " in timed else None,
            "ms_per_step": float(timed.split()[1]) if timed else None,
            "best_step": json.loads(best_json.read_text())["step"] if best_json.is_file() else None,
            "best": held_out_bpb(run_dir, heldout, "best", selectable),
            "latest": held_out_bpb(run_dir, heldout, "latest", selectable),
            "plan": chosen.removeprefix("plan: ").split(",")[0], "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime())}


def compare(name: str, minutes: float, work: Path, grid, extra: list[str], selectable: bool, cache: Cache,
            with_plan: bool = True) -> dict:
    """The plan and the grid on one corpus for one budget."""
    train, heldout = str(work / "train"), str(work / "heldout")
    tokenizer = extra if "--tokenizer-vocab" in extra else ["--tokenizer-vocab", "4096", *extra]
    out = work / f"{minutes:g}min"
    result = {"corpus": name, "minutes": minutes, "grid": {}}
    for n_layers, emb_dim in grid:
        label = f"{n_layers}x{emb_dim}"
        args = ["--recipe", "modern", "--minutes", str(minutes), *shape_flags(n_layers, emb_dim), *tokenizer]
        run = cache.get(f"{name}/{minutes:g}/{label}",
                        lambda label=label, args=args: scored_run(train, heldout, out / label, args, selectable))
        result["grid"][label] = run["best"]
        if (n_layers, emb_dim) == DEFAULT_SHAPE:
            result["default_bpb"] = run["latest"]
    best = min(result["grid"], key=result["grid"].get)
    result.update(grid_best_shape=best, grid_best_bpb=result["grid"][best])
    if with_plan:
        plan = cache.get(f"{name}/{minutes:g}/plan", lambda: scored_run(
            train, heldout, out / "plan", ["--minutes", str(minutes), *extra], selectable))
        result.update(plan=plan["plan"], plan_bpb=plan["best"], plan_final_bpb=plan["latest"],
                      ratio=round(plan["best"] / result["grid"][best], 4))
    return result


def report(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['corpus']}, {r['minutes']:g} min: held-out bpb at the best checkpoint of each grid shape: "
              + ", ".join(f"{k} {v:.4f}" for k, v in r["grid"].items()))
    print(f"\n{'corpus':<11} {'min':>4} {'plan':<22} {'plan bpb':>8} {'grid best':>14} {'ratio':>6} "
          f"{'llama-mini final':>16}")
    for r in results:
        if "plan" in r:
            print(f"{r['corpus']:<11} {r['minutes']:>4g} {r['plan']:<22} {r['plan_bpb']:>8.4f} "
                  f"{r['grid_best_bpb']:>7.4f} {r['grid_best_shape']:>6} {r['ratio']:>6.3f} {r['default_bpb']:>16.4f}")
    print("targets: ratio <= 1.03 (the plan within 3% of the grid's best); plan bpb below llama-mini's final")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 3.0], help="the budgets")
    parser.add_argument("--corpora", nargs="+", default=["built-in", "docstrings", "vim-docs"])
    parser.add_argument("--holdout", type=float, default=0.05, help="held-out share of each corpus's characters")
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="built-in corpus, tiny shapes, seconds")
    parser.add_argument("--grid-only", action="store_true", help="train and score the grid, not the plan")
    args = parser.parse_args()
    corpora = ["built-in"] if args.quick else [c for c in args.corpora if AVAILABLE.get(c, True)]
    budgets, grid, extra = ([0.02], QUICK_GRID, QUICK) if args.quick else (args.minutes, GRID, [])
    selectable = has_best_checkpoint()
    results = []
    with tempfile.TemporaryDirectory(prefix="gptforge-plan-quality-") as tmp:
        root = Path(args.out or tmp)
        cache = Cache(root / "runs.json" if args.out else None)
        for name in corpora:
            train_docs, held = split_holdout(corpus_documents(name), args.holdout)
            work = root / name
            write_documents(train_docs, work / "train")
            write_documents(held, work / "heldout")
            print(f"{name}: {len(train_docs)} training documents ({sum(map(len, train_docs)):,} characters), "
                  f"{len(held)} held out ({sum(map(len, held)):,})", flush=True)
            results += [compare(name, minutes, work, grid, extra, selectable, cache, not args.grid_only)
                        for minutes in budgets]
    report(results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(json.dumps({"runs": results, "checkpoint": "best" if selectable else "newest",
                      "machine": device_name(torch.device("cpu")),
                      "commit": commit, "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
