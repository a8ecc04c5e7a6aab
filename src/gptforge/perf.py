"""Throughput and model FLOPs utilization (MFU), and the benchmarks behind `gptforge bench`.

FLOPs per trained token come from the model family's spec (models.ModelSpec.flops_per_token; for
GPT-2, 6 × the matmul weights + 12·L·H·Q·T, PaLM appendix B). MFU = achieved FLOP/s ÷ the device's
peak: a table of GPU peaks by device name, and on a CPU a measured fp32 matmul peak.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import resource
import statistics
import time

import torch

from .models import build, spec_for
from .models.gpt2 import GPTConfig

# Dense peak TFLOP/s by GPU name (bf16/fp16 tensor cores; TF32 is half of it on these parts).
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"cpu: {name}, {torch.get_num_threads()} threads"
    return device.type


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Peak FLOP/s of a GPU from the table, or None for a GPU not in it."""
    for key, tflops in GPU_PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key.lower() in name.lower():
            return tflops * 1e12 / (2 if precision == "fp32" else 1)  # fp32 matmuls run as TF32
    return None


@functools.cache
def measure_cpu_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> float:
    """Best fp32 matmul FLOP/s over a few large square shapes on this CPU's torch threads."""
    best = 0.0
    for n in sizes:
        g = torch.Generator().manual_seed(n)  # its own generator: training's random stream stays untouched
        a, b, c = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g), torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it comes from) for MFU on this device."""
    if device.type == "cpu":
        return measure_cpu_peak(), "measured fp32 matmul peak"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is None:
            return None, f"peak FLOP/s unknown for {name!r} (not in the table): MFU not reported"
        return peak, f"{name} table peak ({'TF32' if precision == 'fp32' else precision})"
    return None, f"peak FLOP/s unknown for device {device.type!r}: MFU not reported"


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best memory copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the kernel; True if set.

    A training step on a CPU allocates and frees the same large tensors (logits, gradients) every
    step. By default glibc serves each one with a fresh mmap and unmaps it on free, so every step
    pays ~250K page faults (GPT-2 124M at batch 2 x 256: 0.6 s of system time in a 3.4 s step).
    With mmap off and the heap never trimmed, the second or third step finds all its memory
    already mapped: like the CUDA caching allocator, the process keeps its peak footprint. Called
    once when training or benchmarking on a CPU; set GPTFORGE_KEEP_CPU_MEMORY=0 to leave malloc alone
    (and on systems without glibc nothing happens).
    """
    if os.environ.get("GPTFORGE_KEEP_CPU_MEMORY", "1") == "0" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                and libc.mallopt(M_TOP_PAD, 64 << 20))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak resident set of the process


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- benchmarks


def bench_train(model_cfg: GPTConfig, batch_size: int, device: torch.device, precision: str = "auto",
                compile: bool = False, activation_checkpointing: bool = False, steps: int = 10, warmup: int = 2,
                seed: int = 0, profile: bool = False, log=print) -> dict:
    """Time optimizer steps on random tokens, with the training loop's own pieces; returns the JSON result.

    With profile, one more step runs under torch.profiler and its op table (by self time) is printed.
    """
    from .optim import make_optimizer
    from .train import Precision

    if device.type == "cpu":
        keep_freed_cpu_memory()  # as train.train does
    torch.manual_seed(seed)
    model = build(model_cfg).to(device)  # set up as train.train does
    model.activation_checkpointing = activation_checkpointing
    step_model = torch.compile(model) if compile else model
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device)
    amp = Precision(precision, device)
    model.train()
    T = model_cfg.context_length
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, T), generator=g).to(device)
    y = torch.randint(0, model_cfg.vocab_size, (batch_size, T), generator=g).to(device)
    spec = spec_for(model_cfg)
    fpt = spec.flops_per_token(model_cfg)
    peak, peak_source = peak_flops(device, amp.name)
    log(f"device: {device_name(device)}; precision {amp.name}; compile {compile}; "
        f"activation checkpointing {activation_checkpointing}")
    log(f"model: {spec.matmul_params(model_cfg) / 1e6:.2f}M matmul weights, {fpt / 1e6:.1f} MFLOP per trained token; "
        f"batch {batch_size} x {T} tokens")
    log(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})" if peak else peak_source)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = amp.step(step_model, optimizer, [(x, y)], grad_clip=1.0)[0]
        sync(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        log(f"{'warmup' if i < warmup else 'step'} {i + 1}: {dt * 1000:.0f} ms, loss {loss:.3f}")
    if device.type == "cpu":  # a shared CPU's speed drifts: the best peak seen before or after the steps
        peak = max(peak, measure_cpu_peak.__wrapped__())
        log(f"peak re-measured after the steps: {peak / 1e9:.1f} GFLOP/s (the higher one is used)")
    ms = statistics.median(times) * 1000
    tok_s = batch_size * T / (ms / 1000)
    m = mfu(fpt, tok_s, peak)
    log(f"median {ms:.0f} ms/step (best {min(times) * 1000:.0f}), {tok_s:,.1f} tokens/s"
        + (f", MFU {m:.3f} (best step: {mfu(fpt, batch_size * T / min(times), peak):.3f})" if m else ""))
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            amp.step(step_model, optimizer, [(x, y)], grad_clip=1.0)
            sync(device)
        log(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                      else "self_cpu_time_total", row_limit=20))
    result = {"tokens_per_s": round(tok_s, 2), "ms_per_step": round(ms, 2), "mfu": round(m, 4) if m else None,
              "peak_mem_bytes": peak_memory_bytes(device), "device": device_name(device)}
    log(json.dumps(result))
    return result


def bench_generate(model_cfg: GPTConfig, batch_size: int, device: torch.device, prompt_tokens: int = 10,
                   max_new_tokens: int = 200, seed: int = 0, log=print) -> dict:
    """Prefill and decode speed with the KV cache, and decode speed without it; returns the JSON result."""
    from .generate import SampleConfig, generate

    torch.manual_seed(seed)
    model = build(model_cfg).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model_cfg.vocab_size, (batch_size, prompt_tokens), generator=g).to(device)
    cfg = SampleConfig(max_new_tokens=max_new_tokens)  # greedy
    log(f"device: {device_name(device)}; batch {batch_size}, prompt {prompt_tokens} tokens, "
        f"{max_new_tokens} new tokens, greedy")
    generate(model, idx, SampleConfig(max_new_tokens=2))  # warm up
    cached, plain = {}, {}
    out_cached = generate(model, idx, cfg, stats=cached)
    out_plain = generate(model, idx, cfg, use_cache=False, stats=plain)
    new = batch_size * max(max_new_tokens - 1, 1)  # the first new token comes from the prefill
    prefill_tok_s = batch_size * prompt_tokens / cached["prefill_seconds"]
    decode_tok_s = new / cached["decode_seconds"]
    plain_tok_s = new / plain["decode_seconds"]
    weight_bytes = spec_for(model_cfg).matmul_params(model_cfg) * next(model.parameters()).element_size()
    bandwidth = measure_copy_bandwidth()
    bound = bandwidth / weight_bytes  # decode steps/s if each step only streamed the weights once
    log(f"prefill {prefill_tok_s:,.1f} tokens/s; decode with KV cache {decode_tok_s:,.2f} tokens/s, "
        f"without {plain_tok_s:,.2f} tokens/s ({decode_tok_s / plain_tok_s:.1f}x)")
    log(f"memory: {weight_bytes / 1e6:.0f} MB of matmul weights read per decode step; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s -> bandwidth bound {bound:.1f} steps/s; KV-cache decode: "
        f"{1000 * batch_size / decode_tok_s:.1f} ms/step = {batch_size * bound / decode_tok_s:.2f}x the bound's "
        f"{1000 / bound:.1f} ms")
    log(f"cached and uncached outputs identical: {out_cached == out_plain}")
    result = {"prefill_tokens_per_s": round(prefill_tok_s, 2), "decode_tokens_per_s": round(decode_tok_s, 2),
              "decode_tokens_per_s_no_cache": round(plain_tok_s, 2), "device": device_name(device)}
    log(json.dumps(result))
    return result
