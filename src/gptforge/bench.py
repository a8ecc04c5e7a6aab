"""`gptforge bench train` and `gptforge bench generate`: speed measured on random tokens, last line JSON.

Apart from the code it measures: it builds the model, optimizer and precision as a run does and
times `Precision.step` (training) and `generate` (decoding with and without the KV cache).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import torch

from .config import ConfigError, check_fields, opt
from .devices import pick_device
from .generate import SampleConfig, generate
from .models import build, spec_for
from .perf import (
    device_name,
    keep_freed_cpu_memory,
    measure_copy_bandwidth,
    measure_cpu_peak,
    measure_read_bandwidth,
    mfu,
    peak_flops,
    peak_memory_bytes,
    sync,
)
from .training.config import TrainConfig
from .training.state import check_memory
from .training.step import RandomSteps, time_steps


@dataclass
class BenchConfig:
    """How `gptforge bench` measures: timed and untimed training steps, profiling, and the lengths it generates."""

    steps: int = opt(10, "Timed optimizer steps (median reported).", low=1)
    warmup: int = opt(2, "Untimed steps first.", low=0)
    profile: bool = opt(False, "Also profile one step and print torch.profiler's op table.")
    max_new_tokens: int = opt(200, "Tokens to generate per row.")
    prompt_tokens: int = opt(10, "Length of the (random) prompt.")
    document_mask: bool = opt(False, "bench train: attention masked at documents (as train --document-mask), "
                                     "an end-of-text token (id 0) about every 256 random tokens.")

    def __post_init__(self) -> None:
        check_fields(self)


def bench_train(model_cfg, t: TrainConfig, b: BenchConfig, log=print) -> dict:
    """Time optimizer steps on random tokens, with the training loop's own pieces; returns the JSON result.

    From `t`: batch_size, device, precision, compile, activation_checkpointing, seed (and the optimizer settings:
    AdamW by default). With b.profile, one more step runs under torch.profiler and its op table (by self time)
    is printed.
    """
    batch_size, steps, warmup = t.batch_size, b.steps, b.warmup
    compile, activation_checkpointing = t.compile, t.activation_checkpointing
    device = pick_device(t.device)

    if device.type == "cpu":
        keep_freed_cpu_memory()  # as train.train does
    check_memory(model_cfg, t, device)  # refused before anything is allocated
    step = RandomSteps.setup(model_cfg, t, device, 0 if b.document_mask else None)  # set up as train.train does
    amp = step.amp
    T = model_cfg.context_length
    spec = spec_for(model_cfg)
    fpt = spec.flops_per_token(model_cfg)
    peak, peak_source = peak_flops(device, amp.name)
    log(f"device: {device_name(device)}; precision {amp.name}; compile {compile}; "
        f"activation checkpointing {activation_checkpointing}; document mask {b.document_mask} "
        f"(attention {t.attention})")
    log(f"model: {spec.matmul_params(model_cfg) / 1e6:.2f}M matmul weights per token, {fpt / 1e6:.1f} MFLOP per "
        f"trained token; batch {batch_size} x {T} tokens")
    log(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})" if peak else peak_source)
    times = time_steps(step, steps, warmup, device, log)
    if device.type == "cpu":  # a shared CPU's speed drifts: the best peak seen before or after the steps
        peak = max(peak, measure_cpu_peak.__wrapped__())
        log(f"peak re-measured after the steps: {peak / 1e9:.1f} GFLOP/s (the higher one is used)")
    ms = statistics.median(times) * 1000
    tok_s = batch_size * T / (ms / 1000)
    m = mfu(fpt, tok_s, peak)
    log(f"median {ms:.0f} ms/step (best {min(times) * 1000:.0f}), {tok_s:,.1f} tokens/s"
        + (f", MFU {m:.3f} (best step: {mfu(fpt, batch_size * T / min(times), peak):.3f})" if m else ""))
    if b.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
            sync(device)
        log(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                      else "self_cpu_time_total", row_limit=20))
    result = {"tokens_per_s": round(tok_s, 2), "ms_per_step": round(ms, 2), "mfu": round(m, 4) if m else None,
              "peak_mem_bytes": peak_memory_bytes(device), "device": device_name(device)}
    log(json.dumps(result))
    return result


def bench_generate(model_cfg, t: TrainConfig, b: BenchConfig, log=print) -> dict:
    """Prefill and decode speed with the KV cache, and decode speed without it; returns the JSON result.

    From `t`: batch_size, device, seed; from `b`: prompt_tokens, max_new_tokens (both fit in the context).
    """
    batch_size, seed, prompt_tokens, max_new_tokens = t.batch_size, t.seed, b.prompt_tokens, b.max_new_tokens
    if prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens {prompt_tokens}: must be at least 1")
    if max_new_tokens < 2:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 2 (the first new token is the "
                          "prefill's; decoding is timed from the second)")
    if prompt_tokens + max_new_tokens > model_cfg.context_length:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} plus --max-new-tokens {max_new_tokens} must fit in the "
                          f"context length {model_cfg.context_length}; lower one (or raise --context-length)")
    device = pick_device(t.device)

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
    bandwidth, read = measure_copy_bandwidth(), measure_read_bandwidth(weight_bytes)
    bound = bandwidth / weight_bytes  # decode steps/s if each step only streamed the weights once
    log(f"prefill {prefill_tok_s:,.1f} tokens/s; decode with KV cache {decode_tok_s:,.2f} tokens/s, "
        f"without {plain_tok_s:,.2f} tokens/s ({decode_tok_s / plain_tok_s:.1f}x)")
    log(f"memory: {weight_bytes / 1e6:.0f} MB of matmul weights read per decode step; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s -> bandwidth bound {bound:.1f} steps/s; KV-cache decode: "
        f"{1000 * batch_size / decode_tok_s:.1f} ms/step = {batch_size * bound / decode_tok_s:.2f}x the bound's "
        f"{1000 / bound:.1f} ms (read bandwidth {read / 1e9:.1f} GB/s: "
        f"{batch_size * read / weight_bytes / decode_tok_s:.2f}x its bound of {1000 * weight_bytes / read:.1f} ms)")
    log(f"cached and uncached outputs identical: {out_cached == out_plain}")
    result = {"prefill_tokens_per_s": round(prefill_tok_s, 2), "decode_tokens_per_s": round(decode_tok_s, 2),
              "decode_tokens_per_s_no_cache": round(plain_tok_s, 2), "device": device_name(device)}
    log(json.dumps(result))
    return result
