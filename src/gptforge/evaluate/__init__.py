"""Cross-entropy loss, perplexity and bits per byte over batches of (inputs, targets).

Bits per byte (bpb) = the scored tokens' summed cross-entropy in nats / ln 2 / the UTF-8 bytes of
the text those tokens decode to, the bytes coming from the tokenizer's `token_bytes` table. It does
not depend on the tokenizer, so models with different vocabularies compare. Special tokens (end of
text, BOS, padding) are 0 bytes, but their loss counts when they are scored targets; ids past the
tokenizer's vocabulary (a padded model vocabulary) are 0 bytes too. Targets IGNORE (-100) are not
scored: they count in neither the loss, the tokens nor the bytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops
from ..config import ConfigError, check_fields, opt
from ..data import Batches, TokenWindows, check_windows, document_eot, eval_tokens
from ..devices import attention_opt, device_opt, pick_device
from ..distributed import all_sum
from ..errors import DataError
from ..models.layers import cross_entropy
from ..ops import IGNORE_INDEX as IGNORE
from ..tokenizer import Tokenizer, tokenizer_opt
from ..weights import load_for_text, open_source
from .tasks import TASKS


@dataclass
class EvalConfig:
    """Which windows `gptforge eval` scores, and how many at a time."""

    context_length: int | None = opt(None, "Tokens per scored window; at most the model's; default: the model's "
                                           "context length.", low=1)
    stride: int | None = opt(None, "Step between window starts; default: the context length.", low=1)
    batch_size: int = opt(8, "Windows per batch.", low=1)
    max_batches: int | None = opt(None, "Score only the first N batches; default: all.", low=1)
    limit: int | None = opt(None, "--task, --suite: score only the first N items of each task; default: all.", low=1)
    num_fewshot: int = opt(0, "--task: examples before each item, drawn and laid out as lm-evaluation-harness does.",
                           low=0)
    fewshot_file: list[str] = field(default_factory=list, metadata={
        "help": "--num-fewshot: a task's train split to draw examples from, NAME=FILE (repeatable; "
                f"{', '.join(n for n, t in TASKS.items() if t.train)} draw from theirs, ceval and cmmlu from their "
                "dev/ files, the others from the evaluated file).",
        "metavar": "NAME=FILE"})
    document_mask: bool = opt(False, "Score each end-of-text-separated document of a window on its own "
                                     "(as train --document-mask trains).")
    attention: str = attention_opt()
    split: str | None = opt(None, "With a directory made by `gptforge prepare`: the split to score, val or train; "
                                  "default: val.", choices=("val", "train"))
    device: str = device_opt()
    tokenizer: str | None = tokenizer_opt()

    def __post_init__(self) -> None:
        check_fields(self)
        for spec in self.fewshot_file:
            name, _, path = spec.partition("=")
            if not path or name not in TASKS or TASKS[name].train is None:
                trains = ", ".join(n for n, t in TASKS.items() if t.train is not None)
                raise ConfigError(f"--fewshot-file {spec!r} must be NAME=FILE with NAME one of {trains}")


def lm_loss(h: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of the LM head's logits for final hidden states h (B, T, C) against targets (B, T).

    In fp32 on a CPU, the fused head + loss kernel (ops.head_cross_entropy: the logits are never kept);
    elsewhere the head's matmul and F.cross_entropy.
    """
    if ops.use_cpu_kernels(h):
        return ops.head_cross_entropy(h.flatten(0, 1), head_weight, targets.flatten(), vocab_size)
    return cross_entropy(h, head_weight, targets, vocab_size)


def segments_of(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Document numbers (B, T) of packed windows x (B, T): a document starts at the window's start and at each
    end-of-text token, which begins the next document as tokenize_documents and prepare place it."""
    return (x == eot_id).cumsum(dim=1)


def loss_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eot_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch; x, y are (B, T) token ids, targets -100 not scored.

    The loss is computed inside the model's forward (so DDP and FSDP see it), with the kernel lm_loss picks.
    With eot_id (--document-mask), each document of a packed window is scored as if it ran alone.
    """
    if eot_id is None:
        return model(x, targets=y, loss=lm_loss)
    return model(x, targets=y, loss=lm_loss, segments=segments_of(x, eot_id))


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per scored token, nats
    tokens: int  # scored targets
    bytes: int | None = None  # UTF-8 bytes of the scored targets' text; None without a byte table

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bpb(self) -> float | None:
        """Bits per byte; None without a byte table or when the scored targets are no text (all special)."""
        if not self.bytes:
            return None
        return self.loss * self.tokens / math.log(2) / self.bytes


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    token_bytes: np.ndarray | None = None,
    eot_id: int | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> EvalResult:
    """Token-weighted mean loss over the first `max_batches` batches (all when None), over the
    targets that are not IGNORE; with `token_bytes` (a tokenizer's table) also their bytes, for bpb.
    eot_id (--document-mask): score each packed document alone (loss_batch).

    ranks (rank, world) under torchrun: each rank scores its own share of every batch's rows and the
    sums are added up over the ranks, so W processes give one process's numbers in about 1/W of the time;
    every rank runs one forward per batch (a rank whose share is empty scores a row it then leaves out), as
    FSDP needs every rank in each forward. Puts the model in eval mode (no dropout) and restores the mode it had.
    """
    was_training = model.training
    model.eval()
    rank, world = ranks
    table = None if token_bytes is None else torch.tensor(token_bytes, dtype=torch.int64, device=device)
    total, count, n_bytes = 0.0, 0, 0
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            share = -(-len(x) // world)  # rows per rank
            x, y = x[rank * share:(rank + 1) * share].to(device), y[rank * share:(rank + 1) * share].to(device)
            scored = y[y != IGNORE]  # all of y but padding (--packing pad)
            if len(scored) == 0:
                if world > 1:  # the other ranks' forward needs this one's
                    loss_batch(model, *(t.to(device) for t in _any_row(batches)), eot_id)
                continue
            total += loss_batch(model, x, y, eot_id).item() * len(scored)
            count += len(scored)
            if table is not None:
                n_bytes += table[scored[scored < len(table)]].sum().item()
    finally:
        model.train(was_training)
    total, count, n_bytes = all_sum([total, count, n_bytes], torch.device(device))
    count, n_bytes = int(count), int(n_bytes)
    if count == 0:
        raise DataError("no batches to evaluate: the data gives no complete window with a scored target")
    return EvalResult(loss=total / count, tokens=count, bytes=None if table is None else n_bytes)


def _any_row(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """A row to run the model on when this rank's share of a batch is empty: the first batch's first."""
    x, y = next(iter(batches))
    return x[:1], y[:1]


def byte_table(tokenizer: Tokenizer, warn) -> np.ndarray | None:
    """The tokenizer's `token_bytes`, or None after telling `warn` why bits per byte is not reported."""
    try:
        return tokenizer.token_bytes()
    except ConfigError as e:
        warn(f"gptforge: warning: bits per byte not reported: {e}")
        return None


def evaluate_text(source, data: Iterable[str], cfg: EvalConfig, warn=None) -> EvalResult:
    """`gptforge eval`: the loss and bpb of the model in source (any format weights.load_any reads) on the
    text files in `data` (or a prepared directory's val split), windows and batches as cfg says; `warn`
    (default: stderr) says why bpb is missing."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    try:
        texts = eval_tokens(tuple(data), None, cfg.split)  # the text read and checked before the model is
    except DataError:
        open_source(source)  # unless SOURCE is no model (eval TEXT SOURCE: the arguments swapped), which says so
        raise
    device = pick_device(cfg.device)
    model, tokenizer, _ = load_for_text(source, device, tokenizer=cfg.tokenizer)
    model.attention = cfg.attention
    ctx = cfg.context_length or model.cfg.context_length
    if ctx > model.cfg.context_length:
        raise ConfigError(f"--context-length {ctx} must be between 1 and the model's {model.cfg.context_length}")
    tokens = eval_tokens(tuple(data), tokenizer, cfg.split, texts)
    windows = TokenWindows(tokens, ctx, cfg.stride, new_targets_only=True)
    check_windows(windows, len(tokens), "evaluation", cfg.batch_size, drop_last=False)
    if windows.stride > ctx:
        skipped = len(windows) * (windows.stride - ctx)
        warn(f"gptforge: warning: --stride {windows.stride} is longer than the {ctx}-token windows: {skipped:,} of "
             f"{len(tokens):,} tokens ({skipped / len(tokens):.0%}) fall between windows and are not scored")
    batches = Batches(windows, cfg.batch_size, shuffle=False, drop_last=False)
    eot_id = document_eot(tokenizer, "document_mask") if cfg.document_mask else None
    result = evaluate(model, batches, cfg.max_batches, device, byte_table(tokenizer, warn), eot_id)
    if result.bytes == 0:
        warn("gptforge: warning: bits per byte not reported: the scored tokens are all special tokens (no text)")
    return result
