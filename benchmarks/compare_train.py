"""Training speed of gptforge against the book's chapter-5 code on the same machine, in the same run.

"Build a Large Language Model (From Scratch)" ships its code as the `llms-from-scratch` package;
install it next to gptforge without its (TensorFlow, Jupyter) dependencies:

    pip install --no-deps llms-from-scratch
    python benchmarks/compare_train.py                 # 3 rounds x 8 timed steps each
    python benchmarks/compare_train.py --rounds 1 --steps 3 --layers 2   # a quick look

Both train the GPT-2 124M shape at context 256, batch 2, dropout 0.1, fp32, on the same random
batch. Each implementation runs as its users run it: the book's `GPTModel`, `calc_loss_batch` and
its chapter-5 optimizer (`torch.optim.AdamW(lr=4e-4, weight_decay=0.1)`, no clipping); gptforge's
training step as `gptforge train` does it (fused AdamW, gradient clipping at 1.0). Every measurement
is a fresh process (process-wide settings never leak from one to the other), and the
implementations take turns, round after round, so a noisy machine slows both alike. The score per
implementation is the median ms/step over all its timed steps; MFU uses the issue's formula and
the best fp32 matmul peak measured before and after.

Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPLS = ("gptforge", "book")


def run_one(impl: str, steps: int, warmup: int, layers: int, batch: int, context: int) -> list[float]:
    """Runs in the child process: builds the model and optimizer, returns the timed step durations."""
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (batch, context), generator=g)
    y = torch.randint(0, 50257, (batch, context), generator=g)
    if impl == "gptforge":
        from gptforge.models import build
        from gptforge.models.gpt2 import PRESETS, GPTConfig
        from gptforge.perf import keep_freed_cpu_memory
        from gptforge.training.optim import make_optimizer
        from gptforge.training.step import Precision

        device = torch.device("cpu")
        keep_freed_cpu_memory()  # what gptforge train does on a CPU
        model = build(GPTConfig(**{**PRESETS["gpt2-small"], "context_length": context, "n_layers": layers}))
        optimizer = make_optimizer(model, 4e-4, 0.1, (0.9, 0.95), device)
        amp = Precision("fp32", device)
        model.train()

        def step():
            amp.step(model, optimizer, [(x, y)], grad_clip=1.0)
    elif impl == "book":
        from llms_from_scratch.ch04 import GPTModel
        from llms_from_scratch.ch05 import calc_loss_batch

        cfg = {"vocab_size": 50257, "context_length": context, "emb_dim": 768, "n_heads": 12,
               "n_layers": layers, "drop_rate": 0.1, "qkv_bias": False}
        model = GPTModel(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)  # as in chapter 5
        model.train()

        def step():
            optimizer.zero_grad()
            loss = calc_loss_batch(x, y, model, "cpu")
            loss.backward()
            optimizer.step()
    else:
        raise SystemExit(f"unknown implementation {impl!r}")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        times = run_one(args.child, args.steps, args.warmup, args.layers, args.batch_size, args.context_length)
        print(json.dumps(times))
        return

    import torch

    from gptforge.models import get_spec
    from gptforge.models.gpt2 import PRESETS, GPTConfig
    from gptforge.perf import device_name, measure_cpu_peak

    try:
        import llms_from_scratch  # noqa: F401
    except ImportError:
        raise SystemExit("the book's code is not installed: pip install --no-deps llms-from-scratch") from None
    cfg = GPTConfig(**{**PRESETS["gpt2-small"], "context_length": args.context_length, "n_layers": args.layers})
    fpt = get_spec("gpt2").flops_per_token(cfg)
    peak = measure_cpu_peak.__wrapped__()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS if r % 2 == 0 else reversed(IMPLS):
            out = subprocess.run(
                [sys.executable, __file__, "--child", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--layers", str(args.layers), "--batch-size", str(args.batch_size),
                 "--context-length", str(args.context_length)],
                check=True, capture_output=True, text=True).stdout
            step_times = json.loads(out.strip().splitlines()[-1])
            times[impl] += step_times
            print(f"round {r + 1} {impl:9s} median {statistics.median(step_times) * 1000:,.0f} ms/step", flush=True)
    peak = max(peak, measure_cpu_peak.__wrapped__())
    tokens = args.batch_size * args.context_length
    result = {"device": device_name(torch.device("cpu")), "peak_flops": round(peak), "flops_per_token": fpt,
              "n_layers": args.layers}
    print(f"\npeak {peak / 1e9:.1f} GFLOP/s (best of before/after); {fpt / 1e6:.1f} MFLOP per token")
    print(f"{'implementation':16s} {'ms/step':>9s} {'tokens/s':>9s} {'MFU':>6s}")
    for impl, ts in times.items():
        ms = statistics.median(ts) * 1000
        tok_s = tokens / (ms / 1000)
        mfu = fpt * tok_s / peak
        result[impl] = {"ms_per_step": round(ms, 1), "tokens_per_s": round(tok_s, 2), "mfu": round(mfu, 4),
                        "steps": len(ts)}
        print(f"{impl:16s} {ms:9,.0f} {tok_s:9.1f} {mfu:6.3f}")
    result["speedup"] = round(result["gptforge"]["tokens_per_s"] / result["book"]["tokens_per_s"], 3)
    print(f"gptforge / book: {result['speedup']:.2f}x tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
