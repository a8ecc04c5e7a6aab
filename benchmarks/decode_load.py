"""Decode speed on a CPU, gptforge's decode path against plain PyTorch, quiet and with the cores busy.

Two ways to decode the same model, alternated round by round in one process (the machine's drift hits
both alike), each `generate` with a KV cache, batch 1, greedy, 10-token prompt:

- `plain`: PyTorch as it comes: the family's model class as it is, without the CPU kernels (`F.linear` for
  every product: MKL's one-thread matrix-vector products; scaled_dot_product_attention over repeated
  key/value heads), every step on torch's own thread count;
- `gptforge`: the same weights in the model `build()` gives: the CPU kernels swapped in (models/cpu.py:
  `ops.linear`, the products split over both cores; `ops.decode_attention`, grouped, no repeat) and
  `ops.DecodeThreads` (each step on all threads or one, whichever it measured faster).

`--busy N` starts N processes that spin on a core for the whole benchmark (load from elsewhere). Also
measured, quiet, before the busy processes start: the copy bandwidth `bench generate` uses for its
bound (bytes read + written) and the read bandwidth (a reduction over a buffer as large as the matmul
weights), each turned into the decode step's bound (matmul weights ÷ bandwidth).

    python benchmarks/decode_load.py --preset minimind-3 --busy 0
    python benchmarks/decode_load.py --preset minimind-3 --busy 2

Prints one line a round; the last line is JSON with every figure (ms per decoded token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys

import torch

from gptforge import ops
from gptforge.generate import SampleConfig, generate
from gptforge.models import get_spec, preset_arch, spec_for, with_cpu_kernels
from gptforge.perf import device_name, measure_copy_bandwidth, measure_read_bandwidth


class _OneThreadCount:
    """DecodeThreads' stand-in for the plain runs: every step on the caller's threads, untimed."""

    def run(self, step, *args):
        return step(*args)


@contextlib.contextmanager
def threads_as_torch_has_them():
    """generate's decode steps on the caller's threads (no DecodeThreads) while the block runs."""
    saved, ops.DecodeThreads = ops.DecodeThreads, _OneThreadCount
    try:
        yield
    finally:
        ops.DecodeThreads = saved


def ms_per_token(model, idx, new_tokens: int) -> tuple[float, list[int]]:
    stats: dict = {}
    out = generate(model, idx, SampleConfig(max_new_tokens=new_tokens), stats=stats)
    return 1000 * stats["decode_seconds"] / (new_tokens - 1), out[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="minimind-3")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core meanwhile")
    a = p.parse_args()

    spec = get_spec(preset_arch(a.preset))
    cfg = spec.config_class(**spec.presets[a.preset])
    torch.manual_seed(0)
    plain = spec.model_class(cfg).eval()
    ours = spec.model_class(cfg)
    ours.load_state_dict(plain.state_dict())
    models = {"plain": plain, "gptforge": with_cpu_kernels(ours).eval()}
    weight_bytes = spec_for(cfg).matmul_params(cfg) * 4
    copy_bw, read_bw = measure_copy_bandwidth(), measure_read_bandwidth(weight_bytes)
    idx = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    print(f"{a.preset}: {weight_bytes / 1e6:.0f} MB of matmul weights; {torch.get_num_threads()} threads; "
          f"bound {1000 * weight_bytes / copy_bw:.2f} ms/token at the copy bandwidth {copy_bw / 1e9:.1f} GB/s, "
          f"{1000 * weight_bytes / read_bw:.2f} ms at the read bandwidth {read_bw / 1e9:.1f} GB/s", flush=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    times: dict[str, list[float]] = {"plain": [], "gptforge": []}
    tokens = {}
    try:
        for name in ("plain", "gptforge"):  # warm-up, untimed
            with threads_as_torch_has_them() if name == "plain" else contextlib.nullcontext():
                ms_per_token(models[name], idx, 4)
        for r in range(a.rounds):
            order = ("plain", "gptforge") if r % 2 == 0 else ("gptforge", "plain")
            for name in order:
                with threads_as_torch_has_them() if name == "plain" else contextlib.nullcontext():
                    ms, tokens[name] = ms_per_token(models[name], idx, a.new_tokens)
                times[name].append(ms)
            print(f"round {r + 1}: plain {times['plain'][-1]:.2f} ms/token, gptforge {times['gptforge'][-1]:.2f}",
                  flush=True)
    finally:
        for proc in busy:
            proc.kill()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"preset": a.preset, "busy": a.busy, "device": device_name(torch.device("cpu")),
              "new_tokens": a.new_tokens, "ms_per_token": {k: [round(x, 3) for x in v] for k, v in times.items()},
              "median_ms_per_token": {k: round(v, 3) for k, v in med.items()},
              "speedup": round(med["plain"] / med["gptforge"], 3),
              "bound_ms_copy": round(1000 * weight_bytes / copy_bw, 3),
              "bound_ms_read": round(1000 * weight_bytes / read_bw, 3),
              "gptforge_over_copy_bound": round(med["gptforge"] * copy_bw / weight_bytes / 1000, 3),
              "gptforge_over_read_bound": round(med["gptforge"] * read_bw / weight_bytes / 1000, 3),
              "same_tokens": tokens["plain"] == tokens["gptforge"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
