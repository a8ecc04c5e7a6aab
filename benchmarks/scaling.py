"""Benchmark: FSDP2 on W CPU processes (gloo), measured beside docs/SCALING.md's memory model.

    python benchmarks/scaling.py                    # W=8, GPT-2-family models of ~23M and ~77M parameters
    python benchmarks/scaling.py --quick            # W=2, tiny models: proves the script works
    python benchmarks/scaling.py --nproc 4 --sizes 6x512 12x768

For each size (LAYERSxWIDTH, heads of 64, vocabulary --vocab, context --context, dropout 0) the script
starts itself under torchrun (`--worker`, OMP_NUM_THREADS=1 per process). Each rank reads its resident
memory (/proc/self/status VmRSS; the peak VmHWM, reset by writing 5 to /proc/self/clear_refs) before it
builds the model, then builds it, wraps it with `distributed.wrap(model, device, "fsdp")` (fully_shard per
block and the root), resets the peak, builds AdamW (`training.optim.build_optimizer`), trains 2 steps
(`Precision("fp32").step`: forward with the fused head + loss, backward, clipping, the update) and reads its
peak above the first reading. Then it measures a checkpoint save both ways:

- sharded: `distributed.save_sharded` (torch.distributed.checkpoint): the bytes of this rank's
  shards/__RANK_*.distcp, and the peak growth during the save (peak after, minus RSS before);
- full: `distributed.full_model_state` + `full_optimizer_state` (what --checkpoint-format full gathers on
  rank 0), then rank 0 writes it with `checkpoint.save_checkpoint` (safetensors + state.pt + checksums):
  the growth after gathering, and after writing.

A tiny model goes through the same steps first, so that what is paid once (modules imported on first use,
gloo's buffers) is in the baseline rather than in the first size's figures.

Ranks' figures are gathered to rank 0 (all_gather_object), which writes them to a JSON file the parent reads.
The parent prints the figures beside the predictions (docs/SCALING.md, "Measured on this machine") and, as
its last line, JSON. Workers run with MALLOC_MMAP_THRESHOLD_=65536, so that glibc hands freed tensors back
at once and RSS follows the live tensors rather than malloc's caching.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.models import build, spec_for
from gptforge.models.gpt2 import GPTConfig

MB = 2**20
DEFAULT_SIZES = ["6x512", "10x768"]  # ~23M and ~77M parameters with vocabulary 8192
QUICK_SIZES = ["2x128", "4x256"]


def model_config(size: str, vocab: int, context: int) -> GPTConfig:
    """'LxC' -> a GPT-2-family config: L blocks of width C, heads of 64, no dropout (the model's counted case)."""
    try:
        layers, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes {size!r}: write a size as LAYERSxWIDTH, e.g. 6x512") from None
    if width % 64:
        raise SystemExit(f"--sizes {size!r}: the width must be a multiple of 64 (heads of 64)")
    return GPTConfig(vocab_size=vocab, context_length=context, emb_dim=width, n_layers=layers, n_heads=width // 64,
                     drop_rate=0.0)


# ----------------------------------------------------------------------------- the prediction (docs/SCALING.md)


def counts(cfg: GPTConfig) -> dict[str, int]:
    """Parameters: all (tied head once), one block's, the root's (embeddings, final norm), the largest tensor."""
    with torch.device("meta"):
        model = build(cfg)
    block = spec_for(cfg).blocks(model)[0]
    P, Pb = model.num_params(), sum(p.numel() for p in block.parameters())
    return {"P": P, "P_block": Pb, "P_root": P - cfg.n_layers * Pb,
            "largest": max(p.numel() for p in model.parameters())}


def predict(cfg: GPTConfig, world: int, batch: int) -> dict[str, float]:
    """Bytes per rank, fp32 on a CPU under FSDP2 (docs/SCALING.md's formulas, gpt2, dropout 0)."""
    c = counts(cfg)
    P, Pb, Proot = c["P"], c["P_block"], c["P_root"]
    N, C, H, L = batch * cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers
    V64 = -(-cfg.vocab_size // 64) * 64
    state = 16 * P / world  # weights 4 + gradients 4 + AdamW moments 8, sharded
    in_flight = 8 * Proot + 16 * Pb  # root gathered + its gradients; 2 blocks' weights, 1 block's grads, 1 RS buffer
    activations = L * N * (68 * C + 4 * H + 16)  # gpt2 fp32, per token per layer: 4 (17C + H) + LN statistics
    head = 4 * N * V64 + 8 * N * C  # the fused head + loss buffer, ln_f's input and output
    return {**c, "state": state, "in_flight": in_flight, "activations": activations, "head": head,
            "train_peak": state + in_flight + activations + head, "ckpt_bytes": 12 * P / world,
            "full_gather": 12 * P, "full_write": 12 * P, "sharded_growth": 4 * c["largest"] / world}


# ----------------------------------------------------------------------------- one rank (under torchrun)


def memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes since the last reset_peak) of this process."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    return values["VmRSS"], values["VmHWM"]


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux: 5 written to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(cfg: GPTConfig, batch: int, out: Path) -> dict:
    """One rank's figures for one model: memory after wrapping, training peak, both checkpoint saves."""
    from gptforge import checkpoint as ckpt
    from gptforge import distributed as dist
    from gptforge.training import TrainConfig
    from gptforge.training.optim import build_optimizer
    from gptforge.training.step import Precision

    device, rank = torch.device("cpu"), dist.rank()
    torch.manual_seed(0)
    gc.collect()
    base = memory()[0]  # before the model exists

    model = dist.wrap(build(cfg), device, "fsdp")
    gc.collect()
    wrapped = memory()[0] - base  # this rank's shards of the weights
    reset_peak()  # the whole model built on every rank is not the training's footprint
    optimizer = build_optimizer(model, TrainConfig(), device)
    amp = Precision("fp32", device)
    g = torch.Generator().manual_seed(1000 + rank)
    step_s = []
    for _ in range(2):
        xy = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=g)
        t0 = time.perf_counter()
        amp.step(model, optimizer, [(xy[:, :-1], xy[:, 1:])], grad_clip=1.0)
        step_s.append(time.perf_counter() - t0)
    train_peak = memory()[1] - base

    shards = out / "sharded" / ckpt.SHARDS
    if rank == 0:
        shards.mkdir(parents=True)
    dist.barrier()
    gc.collect()
    reset_peak()
    before = memory()[0]
    t0 = time.perf_counter()
    dist.save_sharded(model, optimizer, shards)
    sharded_s = time.perf_counter() - t0
    sharded_growth = memory()[1] - before
    dist.barrier()
    sharded_bytes = sum(f.stat().st_size for f in shards.glob(f"__{rank}_*.distcp"))
    metadata_bytes = (shards / ".metadata").stat().st_size if rank == 0 else 0

    gc.collect()
    reset_peak()
    before = memory()[0]
    t0 = time.perf_counter()
    weights, optim_state = dist.full_model_state(model), dist.full_optimizer_state(model, optimizer)
    gather_s = time.perf_counter() - t0
    gather_growth = memory()[1] - before
    full_bytes, write_s, write_growth = 0, 0.0, gather_growth
    if rank == 0:  # as Checkpointer.save does for --checkpoint-format full
        t0 = time.perf_counter()
        saved = ckpt.save_checkpoint(out / "full", 2, dist.unwrap(model), "gpt2", {"optimizer": optim_state},
                                     keep_last=1, weights=weights)
        write_s = time.perf_counter() - t0
        write_growth = memory()[1] - before
        full_bytes = sum(f.stat().st_size for f in saved.iterdir())
    del weights, optim_state, model, optimizer
    dist.barrier()
    return dict(rank=rank, wrapped=wrapped, train_peak=train_peak, step_s=step_s, sharded_bytes=sharded_bytes,
                metadata_bytes=metadata_bytes, sharded_growth=sharded_growth, sharded_s=sharded_s,
                gather_growth=gather_growth, gather_s=gather_s, write_growth=write_growth, write_s=write_s,
                full_bytes=full_bytes)


def worker(args: argparse.Namespace) -> None:
    from gptforge import distributed as dist

    dist.setup(torch.device("cpu"))
    out = Path(args.out)
    # a tiny model through the same steps first: the modules FSDP2 and DCP import on first use, gloo's buffers
    # and other one-time costs land before the baseline
    measure(model_config("1x64", 256, 16), 1, out / "warmup")
    record = measure(model_config(args.size, args.vocab, args.context), args.batch, out / "measured")
    every = dist.gather(record)
    if dist.is_main():
        print(f"{'rank':>4} {'shards MB':>10} {'after wrap MB':>14} {'train peak MB':>14} {'sharded save +MB':>17} "
              f"{'full gather +MB':>16}")
        for r in every:
            print(f"{r['rank']:>4} {r['sharded_bytes'] / MB:>10.2f} {r['wrapped'] / MB:>14.1f} "
                  f"{r['train_peak'] / MB:>14.1f} {r['sharded_growth'] / MB:>17.1f} {r['gather_growth'] / MB:>16.1f}")
        Path(args.result).write_text(json.dumps(every))
    dist.cleanup()


# ----------------------------------------------------------------------------- the parent


def run_size(size: str, args: argparse.Namespace, out: Path) -> dict:
    cfg = model_config(size, args.vocab, args.context)
    result = out / f"{size}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", "--size", size, "--vocab", str(args.vocab), "--context", str(args.context),
           "--batch", str(args.batch), "--out", str(out / size), "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    ranks = json.loads(result.read_text())
    if not args.out:
        shutil.rmtree(out / size, ignore_errors=True)  # the next size's checkpoints need the disk
    pred = predict(cfg, args.nproc, args.batch)
    shard = [r["sharded_bytes"] for r in ranks]
    zero = ranks[0]
    return {
        "size": size, "params": pred["P"], "wall_s": round(time.perf_counter() - t0, 1),
        "ckpt_bytes_pred": round(pred["ckpt_bytes"]), "ckpt_bytes_mean": round(sum(shard) / len(shard)),
        "ckpt_bytes_min": min(shard), "ckpt_bytes_max": max(shard), "metadata_bytes": zero["metadata_bytes"],
        "train_peak_pred": round(pred["train_peak"]), "train_peak_max": max(r["train_peak"] for r in ranks),
        "train_peak_min": min(r["train_peak"] for r in ranks),
        "train_pred_terms": {k: round(pred[k]) for k in ("state", "in_flight", "activations", "head")},
        "wrapped_pred": round(4 * pred["P"] / args.nproc), "wrapped_mean": round(sum(r["wrapped"] for r in ranks)
                                                                                / len(ranks)),
        "rank0_sharded_growth": zero["sharded_growth"], "sharded_growth_pred": round(pred["sharded_growth"]),
        "rank0_gather_growth": zero["gather_growth"], "gather_growth_pred": pred["full_gather"],
        "rank0_full_write_growth": zero["write_growth"], "full_write_growth_pred": pred["full_write"],
        "other_ranks_gather_growth_max": max((r["gather_growth"] for r in ranks[1:]), default=0),
        "full_bytes": zero["full_bytes"], "step_s": [round(max(r["step_s"][i] for r in ranks), 2) for i in range(2)],
        "sharded_save_s": round(max(r["sharded_s"] for r in ranks), 2), "gather_s": round(zero["gather_s"], 2),
        "full_write_s": round(zero["write_s"], 2),
    }


def ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.2f}" if predicted else "-"


def report(results: list[dict], world: int) -> None:
    print(f"\nFSDP2, {world} CPU processes (gloo), fp32; MB = 2^20 bytes; ratio = measured / predicted")
    print(f"{'size':>7} {'params':>12} | {'ckpt/rank pred':>14} {'meas (min-max)':>22} {'ratio':>5} | "
          f"{'train peak pred':>15} {'meas max (min)':>16} {'ratio':>5}")
    for r in results:
        print(f"{r['size']:>7} {r['params']:>12,} | {r['ckpt_bytes_pred'] / MB:>14.2f} "
              f"{r['ckpt_bytes_mean'] / MB:>8.2f} ({r['ckpt_bytes_min'] / MB:.2f}-{r['ckpt_bytes_max'] / MB:.2f}) "
              f"{ratio(r['ckpt_bytes_mean'], r['ckpt_bytes_pred']):>5} | {r['train_peak_pred'] / MB:>15.1f} "
              f"{r['train_peak_max'] / MB:>8.1f} ({r['train_peak_min'] / MB:.1f}) "
              f"{ratio(r['train_peak_max'], r['train_peak_pred']):>5}")
    print("train peak pred = 16 P/W (sharded weights, grads, AdamW) + 8 P_root + 16 P_block (in flight) "
          "+ activations + head/loss buffer:")
    for r in results:
        t = r["train_pred_terms"]
        print(f"{r['size']:>7}: " + ", ".join(f"{k} {v / MB:.1f}" for k, v in t.items()) + " MB")
    print("\nrank 0's peak growth while saving (MB; pred: sharded: one shard copy, plus a few MB of DCP's plans and "
          "buffers; full gather 12 B/param, + write the same: safetensors writes from the tensors)")
    print(f"{'size':>7} {'sharded':>9} {'copy':>7} | {'full gather':>11} {'pred':>7} {'ratio':>5} | "
          f"{'+ write':>8} {'pred':>7} {'ratio':>5} | {'seconds: sharded, gather, write':>31}")
    for r in results:
        print(f"{r['size']:>7} {r['rank0_sharded_growth'] / MB:>9.1f} {r['sharded_growth_pred'] / MB:>7.1f} | "
              f"{r['rank0_gather_growth'] / MB:>11.1f} {r['gather_growth_pred'] / MB:>7.1f} "
              f"{ratio(r['rank0_gather_growth'], r['gather_growth_pred']):>5} | "
              f"{r['rank0_full_write_growth'] / MB:>8.1f} {r['full_write_growth_pred'] / MB:>7.1f} "
              f"{ratio(r['rank0_full_write_growth'], r['full_write_growth_pred']):>5} | "
              f"{r['sharded_save_s']:>9.2f} {r['gather_s']:>9.2f} {r['full_write_s']:>9.2f}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        dp = b["params"] - a["params"]
        for key, name in (("rank0_sharded_growth", "sharded"), ("rank0_gather_growth", "full gather"),
                          ("rank0_full_write_growth", "full gather + write")):
            print(f"rank 0 growth per added parameter, {name}: {(b[key] - a[key]) / dp:.2f} B/param")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 processes, tiny sizes")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default 8; 2 with --quick)")
    parser.add_argument("--sizes", nargs="+", default=None, help=f"LAYERSxWIDTH (default {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default 8192; 2048 with --quick)")
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per rank")
    parser.add_argument("--out", default=None, help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.nproc = args.nproc or (2 if args.quick else 8)
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.vocab = args.vocab or (2048 if args.quick else 8192)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptforge-scaling-"))
    results = []
    try:
        for size in args.sizes:
            results.append(run_size(size, args, out))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    report(results, args.nproc)
    print(json.dumps({"benchmark": "scaling", "world": args.nproc, "vocab": args.vocab, "context": args.context,
                      "batch": args.batch, "torch": torch.__version__, "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
