"""GPU check: the `gpu` tests, then the training, decoding and quality benchmarks, in one command on one GPU.

    python benchmarks/gpu_check.py [--out DIR] [--skip-tests] [--quality-minutes 2]
    python benchmarks/gpu_check.py --dry-run      # tiny shapes, one step each, on this machine's CPU: seconds

In order (every part a `gptforge` command in its own process, so that one that fails or runs out of memory is a
row of the table, not the end of the check):
1. `pytest -m gpu tests/test_gpu.py` (on a CPU: all skipped);
2. `gptforge bench train` of GPT-2 124M at context 1024 (bf16, --compile) and of minimind-3 and minimind-3-moe, each
   without a document mask, and with one through sdpa (a dense mask) and flex (FlexAttention's block mask); the
   micro-batch of GPT-2 is the largest of a descending list that runs a step, minimind's a fixed 128 x 340;
3. `gptforge bench generate` of GPT-2 124M and minimind-3 (batch 1, 200 new tokens, greedy);
4. `gptforge bench quality --recipe modern --minutes 2` (the default recipe's held-out bits per byte).

Prints one table and, as its last line, JSON: {"device", "seconds", "tests", "train": [{"model", "document_mask",
"attention", "batch", "tokens_per_s", "mfu", "peak_mem_gb", "error"}], "generate": [{"model",
"decode_tokens_per_s", "prefill_tokens_per_s", "error"}], "quality": {"val_bpb", "steps", "minutes", "error"}}.
MFU is against the device's dense bf16 peak (gptforge.perf.GPU_PEAK_TFLOPS: H100 989, H200 989, A100 312 TFLOP/s).
Planned for under 8 minutes on one H100 (--budget-minutes: bench train rows that would leave too little time
for the rest are skipped, and say so); the time it took is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLEX_CPU = "skipped: FlexAttention has no backward on a CPU"

# (name, model flags, context, micro-batches to try in descending order (one: taken as is), compile); GPT-2
# pretrains without dropout here (as nanoGPT and llm.c do), which FlexAttention needs (it has no attention dropout)
GPU_MODELS = [
    ("gpt2-124M", ["--preset", "gpt2-small", "--drop-rate", "0"], 1024, (64, 48, 32, 24, 16, 8, 4), True),
    ("minimind-3", ["--preset", "minimind-3"], 340, (128,), False),  # 44K tokens a step: a fraction of 80 GB
    ("minimind-3-moe", ["--preset", "minimind-3-moe"], 340, (128,), False),
]
DRY_MODELS = [  # one of each family; the llama one a mixture of experts
    ("gpt2-tiny", ["--preset", "tiny", "--drop-rate", "0"], 64, (8, 4), False),
    ("llama-tiny-moe", ["--preset", "llama-tiny", "--n-experts", "4", "--moe-intermediate-size", "64"], 64, (4,),
     False),
]
MASKS = [(False, "sdpa"), (True, "sdpa"), (True, "flex")]  # without a mask flex and sdpa are the same kernel
QUALITY_EXTRA_S = 90  # bench quality beyond its training minutes (tokenizer, calibration, scoring), and generate


class Budget:
    """Seconds left of the check's wall-time budget (--budget-minutes)."""

    def __init__(self, minutes: float):
        self.deadline = time.perf_counter() + minutes * 60

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def gptforge(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run `python -m gptforge ARGS` with this checkout's package; (its JSON last line or None, the error line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1]), ""
    err = (proc.stderr.strip().splitlines() or lines or [f"exit code {proc.returncode}"])[-1]
    return None, err[:200]


def run_tests(dry: bool) -> dict:
    """pytest -m gpu tests/test_gpu.py: counts of passed, failed, skipped and errors, and the exit code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rfEs",
                               "-p", "no:cacheprovider"], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300 if dry else 420)
    except subprocess.TimeoutExpired:
        return {"rc": None, "failed_tests": ["timed out after 420 s"]}
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {**counts, "rc": proc.returncode, "failed_tests": failed[:20]}


def bench_flags(dry: bool) -> list[str]:
    if dry:
        return ["--device", "cpu", "--precision", "fp32", "--steps", "1", "--warmup", "0"]
    return ["--device", "cuda", "--precision", "bf16", "--steps", "5", "--warmup", "2"]


def fitting_batch(model: list[str], context: int, batches: tuple[int, ...], dry: bool) -> tuple[int | None, str]:
    """The largest micro-batch that runs an eager step (a compiled step needs no more memory), or None and why."""
    if len(batches) == 1:
        return batches[0], ""
    error = ""
    for batch in batches:
        result, error = gptforge(["bench", "train", *model, "--context-length", str(context), "--batch-size",
                                  str(batch), *bench_flags(dry)[:4], "--steps", "1", "--warmup", "0"], timeout=300)
        if result is not None:
            return batch, ""
    return None, error


def bench_trains(models, dry: bool, budget: Budget, reserve: float) -> list[dict]:
    """The bench train rows, each model's batch found first; rows that would eat into `reserve` seconds (what the
    steps after them need) are skipped."""
    rows = []
    for name, model, context, batches, compile in models:
        batch, error = None, "skipped: past the time budget"
        if budget.left() > reserve:
            batch, error = fitting_batch(model, context, batches, dry)
        for mask, attention in MASKS:
            row = {"model": name, "document_mask": mask, "attention": attention, "batch": batch, "tokens_per_s": None,
                   "mfu": None, "peak_mem_gb": None, "error": error}
            if batch is not None and dry and attention == "flex":
                row["error"] = FLEX_CPU
            elif batch is not None and budget.left() <= reserve:
                row["error"] = "skipped: past the time budget"
            elif batch is not None:
                args = ["bench", "train", *model, "--context-length", str(context), "--batch-size", str(batch),
                        "--attention", attention, *bench_flags(dry)]
                args += ["--document-mask"] if mask else []
                args += ["--compile"] if compile else []
                result, row["error"] = gptforge(args, timeout=min(300.0, budget.left() - reserve))
                if result is not None:
                    row.update(tokens_per_s=result["tokens_per_s"], mfu=result["mfu"],
                               peak_mem_gb=round(result["peak_mem_bytes"] / 2**30, 2))
            rows.append(row)
    return rows


def bench_generates(dry: bool) -> list[dict]:
    rows = []
    models = [("gpt2-tiny", "tiny"), ("llama-tiny", "llama-tiny")] if dry else [("gpt2-124M", "gpt2-small"),
                                                                                ("minimind-3", "minimind-3")]
    for name, preset in models:
        args = ["bench", "generate", "--preset", preset, "--device", "cpu" if dry else "cuda", "--max-new-tokens",
                "8" if dry else "200", "--prompt-tokens", "4" if dry else "10"]
        result, error = gptforge(args, timeout=300)
        rows.append({"model": name, "decode_tokens_per_s": result and result["decode_tokens_per_s"],
                     "prefill_tokens_per_s": result and result["prefill_tokens_per_s"], "error": error})
    return rows


def bench_quality(out: Path, minutes: float, dry: bool) -> dict:
    minutes = 0.02 if dry else minutes
    args = ["bench", "quality", "--recipe", "modern", "--minutes", str(minutes), "--out", str(out / "quality")]
    if dry:
        args += ["--device", "cpu", "--emb-dim", "32", "--n-layers", "1", "--head-dim", "16", "--context-length", "32",
                 "--batch-size", "4", "--points", "1", "--tokenizer-vocab", "300"]
    else:
        args += ["--device", "cuda"]
    result, error = gptforge(args, timeout=minutes * 60 + 240)
    if result is None:
        return {"val_bpb": None, "steps": None, "minutes": None, "error": error}
    return {"val_bpb": result["val_bpb"], "steps": result["steps"], "minutes": result["minutes"], "error": ""}


def cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(report: dict) -> None:
    tests = report["tests"]
    print(f"\ndevice: {report['device']}; {report['seconds']:.0f} s")
    print("gpu tests: " + ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "skipped", "error", "errors")
                                    if k in tests) + f" (exit code {tests['rc']})")
    print(f"\n{'model':<16} {'doc mask':<9} {'attention':<10} {'batch':>6} {'tokens/s':>12} {'MFU':>6} "
          f"{'peak GB':>8}  error")
    for r in report["train"]:
        print(f"{r['model']:<16} {str(r['document_mask']):<9} {r['attention']:<10} {cell(r['batch']):>6} "
              f"{cell(r['tokens_per_s'], '{:,.0f}'):>12} {cell(r['mfu'], '{:.3f}'):>6} "
              f"{cell(r['peak_mem_gb'], '{:.1f}'):>8}  {r['error']}")
    print(f"\n{'model':<16} {'decode tokens/s':>16} {'prefill tokens/s':>17}  error")
    for r in report["generate"]:
        print(f"{r['model']:<16} {cell(r['decode_tokens_per_s'], '{:,.1f}'):>16} "
              f"{cell(r['prefill_tokens_per_s'], '{:,.0f}'):>17}  {r['error']}")
    q = report["quality"]
    print(f"\nquality (modern recipe): held-out bpb {cell(q['val_bpb'])} after {cell(q['steps'])} steps "
          f"({cell(q['minutes'])} min) {q['error']}\n")


def device_name(dry: bool) -> str:
    import torch

    from gptforge.perf import device_name as name

    return name(torch.device("cpu" if dry else "cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, one step each, on the CPU")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the gpu tests")
    parser.add_argument("--quality-minutes", type=float, default=2.0, help="training minutes of bench quality")
    parser.add_argument("--out", default=None, help="directory for the quality runs (default: a temporary one)")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="wall time of the whole check: bench train rows that would leave too little for bench "
                             "generate and bench quality are skipped (and say so)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    dry = args.dry_run
    import torch

    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --dry-run to check the script on this machine's CPU")
    out = Path(args.out or tempfile.mkdtemp(prefix="gptforge-gpu-check-"))
    start, budget = time.perf_counter(), Budget(args.budget_minutes)
    tests = {"rc": None, "skipped_by": "--skip-tests"} if args.skip_tests else run_tests(dry)
    reserve = (0.02 if dry else args.quality_minutes) * 60 + QUALITY_EXTRA_S
    train_rows = bench_trains(DRY_MODELS if dry else GPU_MODELS, dry, budget, reserve)
    generate_rows = bench_generates(dry)
    quality = bench_quality(out, args.quality_minutes, dry)
    report = {"device": device_name(dry), "seconds": round(time.perf_counter() - start, 1), "tests": tests,
              "train": train_rows, "generate": generate_rows, "quality": quality}
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
