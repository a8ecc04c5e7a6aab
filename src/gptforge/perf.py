"""Throughput and model FLOPs utilization (MFU), and the benchmarks behind `gptforge bench`.

FLOPs per trained token come from the model family's spec (models.ModelSpec.flops_per_token; for
GPT-2, 6 × the matmul weights + 12·L·H·Q·T, PaLM appendix B). MFU = achieved FLOP/s ÷ the device's
peak: a table of GPU peaks by device name, and on a CPU a measured fp32 matmul peak.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import time

import torch

from .errors import ConfigError

# Dense peak TFLOP/s by GPU name (bf16/fp16 tensor cores, no sparsity; TF32 is half of it on these parts), from
# NVIDIA's data sheets (their "with sparsity" figures halved). A name is matched by the first key it contains: the
# variants come before the family (H100 PCIe and NVL before H100, L40S before L4).
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0}


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
    for key, tflops in GPU_PEAK_TFLOPS.items():  # in order: "H100 PCIe" is checked before "H100"
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


def best_rate(op, nbytes: int, repeats: int) -> float:
    """Best bytes/s of op(), which moves nbytes, over `repeats` timed calls after an untimed one."""
    op()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        op()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best memory copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return best_rate(lambda: dst.copy_(src), 2 * nbytes, repeats)


def measure_read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s of one pass reading a buffer of nbytes (a reduction: nothing written), on all threads: the
    traffic of a decode step, which reads every weight once."""
    return best_rate(torch.ones(max(nbytes // 4, 1)).amax, nbytes, repeats)


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


# ----------------------------------------------------------------------------- memory, before it is taken

# bytes per parameter a training step holds: fp32 weights, their gradients and the optimizer's two moments
# (AdamW; Muon keeps one for its matrices and AdamW's two for the rest: at most as much)
TRAIN_BYTES_PER_PARAM = 16


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still take on the device: CUDA's free memory, or the system's MemAvailable
    (/proc/meminfo; else free pages); None where neither can be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse, before allocating, `need` bytes (of `what`) that the device does not have free: one line naming the
    estimate, the free memory and `advice` (what to reduce)."""
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        raise ConfigError(f"{what} needs about {human_bytes(need)} of memory on {device} and {human_bytes(free)} is "
                          f"free: {advice}")


ATTENTION_SAVED = 3.3  # T x T tensors per head a step keeps when attention has dropout (probabilities, mask, grad)


def activation_bytes(cfg, batch_size: int, context_length: int | None = None) -> int:
    """What a training step keeps for the backward, in fp32, per token: per layer about 24 widths for GPT-2's
    block (norms, q/k/v, attention output, residuals, its 4-wide MLP) or 16 widths and 5 intermediate widths for
    a SwiGLU block (QK-norm and rotary copies, gate, up, their product); with attention dropout, which rules out the
    fused attention kernels, the T x T probabilities of each head; and the logits with their gradient. Fitted to
    the peak memory of training steps on a CPU (tests/test_rundir.py checks it within 30%)."""
    T = context_length or cfg.context_length
    ff = getattr(cfg, "intermediate_size", None)
    layer = 16 * cfg.emb_dim + 5 * ff if ff else 24 * cfg.emb_dim
    if getattr(cfg, "drop_rate", 0.0) > 0:
        layer += ATTENTION_SAVED * cfg.n_heads * T
    return int(4 * batch_size * T * (cfg.n_layers * layer + 2 * cfg.vocab_size))


def training_bytes(params: int, cfg, batch_size: int, context_length: int | None = None) -> int:
    """Estimated peak bytes of training a model of `params` parameters and config cfg at this batch."""
    return TRAIN_BYTES_PER_PARAM * params + activation_bytes(cfg, batch_size, context_length)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
