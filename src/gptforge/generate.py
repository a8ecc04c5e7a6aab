"""Sampling from a GPT: greedy, temperature, top-k, top-p; batched, with per-row end-token stops.

Generation runs a prefill (the prompt in one forward pass, filling a KV cache) and then one-token
decode steps that read the cache instead of recomputing the whole context.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from . import ops, perf
from .config import SEED_MAX, ConfigError, check_fields, opt
from .devices import device_opt, pick_device
from .models import KVCache, max_positions
from .tokenizer import tokenizer_opt
from .weights import load_for_text


@dataclass
class SampleConfig:
    """How tokens are picked from the model's next-token distribution."""

    max_new_tokens: int = opt(100, "Number of tokens to generate after the prompt.", low=0)
    temperature: float = opt(0.0, "0 takes the most likely token (greedy); higher values sample more freely.", low=0)
    top_k: int | None = opt(None, "Sample only among the k most likely tokens.", low=1)
    top_p: float | None = opt(
        None, "Sample only among the most likely tokens whose probabilities add up to p (nucleus)."
    , low=0, high=1, above=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class GenerateConfig:
    """What `gptforge generate` continues, how many times, and where (SampleConfig: how tokens are picked)."""

    prompt: str = opt("", "Text to continue; default: empty, which starts a new document.")
    num_samples: int = opt(1, "Continuations to generate.", low=1)
    seed: int | None = opt(None, "Seed for sampling: the same seed repeats the samples.", low=0, high=SEED_MAX)
    device: str = device_opt()
    tokenizer: str | None = tokenizer_opt()

    def __post_init__(self) -> None:
        check_fields(self)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); the rest become -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1): each row's own threshold
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # the top token always stays (mass_before = 0)
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B, 1)."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        logits = filter_top_k(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = filter_top_p(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def prefill(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (B, V) for the next token after idx (B, T), filling the cache with idx when one is given.

    A model with learned positions reads the last context_length tokens; a rotary one all of them.
    """
    limit = max_positions(model.cfg)
    if limit is not None:
        idx = idx[:, -limit:]
    if cache is None:
        return model(idx)[:, -1, :]
    cache.reset()
    return model(idx, cache)[:, -1, :]


def decode_one_token(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (B, V) after idx (B, T), whose last token is new: one cached step while the cache has room.

    Without a cache, or once the sequence outgrows the context (positions would shift), the model
    recomputes the last context_length tokens, exactly as generation without a cache does.
    """
    if cache is not None and cache.pos < cache.max_len:
        return model(idx[:, -1:], cache)[:, -1, :]
    return prefill(model, idx, None)


def sampling_generator(cfg: SampleConfig, seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The random generator sampling draws from: none for greedy; seeded, or fresh entropy for this generator only
    (the global RNG is untouched either way)."""
    if cfg.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def cache_length(cfg, total: int) -> int:
    """Positions a KV cache holds for sequences of `total` tokens: the context with learned positions, else total."""
    limit = max_positions(cfg)
    return limit if limit is not None else max(total, 1)


def new_cache(model: torch.nn.Module, batch_size: int, total: int | None = None) -> KVCache:
    """An empty KV cache for the model (for sequences of `total` tokens), on its device and in its dtype."""
    p = next(model.parameters())
    max_len = cache_length(model.cfg, total) if total is not None else None
    need = KVCache.nbytes(model.cfg, p.dtype, batch_size, max_len)
    positions = max_len or model.cfg.context_length
    perf.check_fits(need, p.device, f"the KV cache ({batch_size} x {positions} positions, {model.cfg.n_layers} layers)",
                    "lower --max-new-tokens, the prompt's length or --num-samples (serve: max_tokens)")
    return KVCache(model.cfg, batch_size, p.device, p.dtype, max_len)


def past_context(cfg, total: int) -> str | None:
    """A warning when sequences of `total` tokens run past the length a rotary model was trained at."""
    if max_positions(cfg) is None and total > cfg.context_length:
        return (f"gptforge: warning: generating {total} tokens (prompt + new), past the {cfg.context_length} the "
                "model was trained at; rotary positions extrapolate, and quality may fall")
    return None


def iter_tokens(model: torch.nn.Module, idx: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None,
                use_cache: bool = True, lock: AbstractContextManager | None = None,
                cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """The one token-by-token loop: the next token ids (B, 1) after idx (B, T), up to cfg.max_new_tokens of them.

    The prompt is prefilled (into a KV cache with use_cache: `cache`, or a new one), then each step
    is one decode step; a caller stops early by not asking for more. Each step runs under `lock`
    (serve: one request on the model at a time) and without gradients. On a CPU, cached decode steps
    of up to ops.FEW_ROWS sequences run on as many threads as measured fastest (ops.DecodeThreads: all,
    or one when another process holds a core); the tokens are the same either way.
    """
    if use_cache and cache is None and cfg.max_new_tokens > 0:
        cache = new_cache(model, idx.size(0), idx.size(1) + cfg.max_new_tokens)
    if not use_cache:
        cache = None
    few_rows = idx.size(0) <= ops.FEW_ROWS  # larger batches' products are MKL's, whose sums may follow the threads
    threads = ops.DecodeThreads() if cache is not None and idx.device.type == "cpu" and few_rows else None
    for i in range(cfg.max_new_tokens):
        with lock or nullcontext(), torch.no_grad():
            if i == 0:
                logits = prefill(model, idx, cache)  # (B, V)
            elif threads is not None and cache.pos < cache.max_len:  # a cached step (past it: prefills)
                logits = threads.run(decode_one_token, model, idx, cache)
            else:
                logits = decode_one_token(model, idx, cache)
            tok = next_token(logits, cfg, generator)  # (B, 1)
        yield tok
        idx = torch.cat([idx, tok], dim=1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    cfg: SampleConfig,
    eos_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stats: dict | None = None,
    keep_on_interrupt: bool = False,
) -> list[list[int]]:
    """Continue each row of idx (B, T) by up to cfg.max_new_tokens tokens.

    The model sees at most its context_length most recent tokens. A row stops after it produces
    eos_id (or any of several: a tokenizer's stop_ids), which is kept in its output; the others go on.
    Returns the new tokens of each row. With use_cache, a KV cache turns each step into a one-token
    forward pass (same tokens, greedy). A `stats` dict receives prefill_seconds (the prompt and the
    first pick; the cache is allocated before the clock starts), decode_seconds and tokens (new tokens
    of all rows). With keep_on_interrupt, Ctrl-C ends the generation and the tokens so far are returned (stats gets
    interrupted=True) rather than lost.
    """
    was_training = model.training
    model.eval()
    B = idx.size(0)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    stops = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                      dtype=torch.long, device=idx.device)
    total = idx.size(1) + cfg.max_new_tokens
    cache = new_cache(model, B, total) if use_cache and cfg.max_new_tokens > 0 else None  # allocated before the clock
    t0 = time.perf_counter()
    t1 = None
    try:
        for tok in iter_tokens(model, idx, cfg, generator, use_cache, cache=cache):  # (B, 1)
            for b, (t, finished) in enumerate(zip(tok.flatten().tolist(), done.tolist())):
                if not finished:  # one host copy per step, not one per row
                    out[b].append(t)
            if t1 is None:
                t1 = time.perf_counter()  # after the first host copy: the prefill has finished
            if stops is not None:
                done |= torch.isin(tok.squeeze(1), stops)
                if bool(done.all()):
                    break
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            raise
        interrupted = True
    else:
        interrupted = False
    finally:
        model.train(was_training)
    if stats is not None:
        t2 = time.perf_counter()
        t1 = t0 if t1 is None else t1
        stats.update(prefill_seconds=t1 - t0, decode_seconds=t2 - t1, tokens=sum(len(o) for o in out),
                     interrupted=interrupted)
    return out


def sample_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    cfg: SampleConfig,
    num_samples: int = 1,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    stats: dict | None = None,
    keep_on_interrupt: bool = False,
) -> list[str]:
    """Prompt text -> num_samples continuations (text only, prompt excluded); stats and keep_on_interrupt as in
    generate().

    Each stops at one of the tokenizer's stop_ids, which is left out of the text (nothing else is).
    """
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        if tokenizer.eot_id is None:
            raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from; give "
                              "some text to continue (--prompt)")
        ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    if (warning := past_context(model.cfg, len(ids) + cfg.max_new_tokens)) is not None:
        print(warning, file=sys.stderr)
    if (limit := max_positions(model.cfg)) is not None and len(ids) > limit:
        print(f"gptforge: warning: the prompt is {len(ids)} tokens and the model reads at most {limit} (its learned "
              f"positions): its first {len(ids) - limit} tokens are not seen", file=sys.stderr)
    generator = sampling_generator(cfg, seed, device)
    outs = generate(model, idx, cfg, eos_id=tokenizer.stop_ids, generator=generator, stats=stats,
                    keep_on_interrupt=keep_on_interrupt)
    return [tokenizer.decode(o[:-1] if o and o[-1] in tokenizer.stop_ids else o) for o in outs]


def generate_text(source, cfg: GenerateConfig, sample: SampleConfig, stats: dict | None = None) -> list[str]:
    """`gptforge generate`: cfg.num_samples continuations of cfg.prompt by the model in source (any format
    weights.load_any reads), prompt excluded; stats as in generate(). Ctrl-C while generating keeps the text so far
    (stats["interrupted"])."""
    if cfg.num_samples > 1 and sample.temperature == 0:
        raise ConfigError(f"--num-samples {cfg.num_samples} with greedy decoding (--temperature 0, the default) gives "
                          f"{cfg.num_samples} identical samples; set --temperature (e.g. 0.8) to sample")
    device = pick_device(cfg.device)
    model, tokenizer, _ = load_for_text(source, device, tokenizer=cfg.tokenizer)
    return sample_text(model, tokenizer, cfg.prompt, sample, cfg.num_samples, cfg.seed, device, stats=stats,
                       keep_on_interrupt=True)
