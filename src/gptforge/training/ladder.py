"""The ladder of shapes `gptforge plan` times and chooses from: a family's rungs from 0.14M to 205M parameters
(about twice the parameters per rung), each with its heads, context length for the data, and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import build
from ..errors import DataError
from ..models import block_params, get_spec
from ..models import build as build_model

# (n_layers, emb_dim), about twice the parameters per rung (0.14M to 205M with a 4,096-id vocabulary): 32 wide per
# layer up to 8 layers, then wider; heads 32 wide, 64 from WIDE_HEADS on
LADDER = ((1, 32), (2, 64), (3, 96), (4, 128), (5, 160), (6, 192), (8, 256), (8, 384), (8, 512), (10, 640),
          (12, 768), (16, 1024))
WIDE_HEADS = 384
CONTEXTS = ((192, 128), (384, 256), (640, 512), (1024, 1024))  # (up to this emb_dim, this context length)
MIN_CONTEXT = 16
MIN_WINDOWS = 64  # the context is halved until the training tokens fill this many windows


@dataclass
class Candidate:
    """One rung of the ladder, sized for the data.

    `params` is `model.num_params()` (what the plan prints); the choice sizes `block_params`, the transformer
    blocks' parameters (Kaplan et al.'s non-embedding count): with a small model the token embedding is most of
    `params` (4,096 x 32 of the 1 x 32 rung's 145K) but little of its compute or capacity, and its share
    depends on the vocabulary; at Hoffmann et al.'s scale the two counts nearly agree.
    """

    shape: dict  # the model flags of the rung: n_layers, emb_dim, n_heads (llama: n_kv_heads, head_dim, ...)
    config: Any  # the whole model config: the recipe's settings, the shape, the context, the vocabulary
    params: int
    block_params: int

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def describe(self) -> str:
        return f"{self.shape['n_layers']} x {self.shape['emb_dim']}"


def ladder_shape(arch: str, n_layers: int, emb_dim: int) -> dict:
    """A rung's model flags: heads 32 wide (64 from WIDE_HEADS); llama: half as many key/value heads (all of them
    for an odd count) and a SwiGLU 3 x emb_dim wide in multiples of 32, as the llama-mini preset (4 x 128, 4/2
    heads, 384)."""
    head_dim = 64 if emb_dim >= WIDE_HEADS else 32
    n_heads = emb_dim // head_dim
    if arch != "llama":
        return dict(n_layers=n_layers, emb_dim=emb_dim, n_heads=n_heads)
    return dict(n_layers=n_layers, emb_dim=emb_dim, n_heads=n_heads,
                n_kv_heads=n_heads // 2 if n_heads % 2 == 0 else n_heads, head_dim=head_dim,
                intermediate_size=32 * round(3 * emb_dim / 32))


def context_for(emb_dim: int, data_tokens: int) -> int:
    """The context length for a width (CONTEXTS), halved until the training tokens fill MIN_WINDOWS windows."""
    context = next((c for width, c in CONTEXTS if emb_dim <= width), CONTEXTS[-1][1])
    while context > MIN_CONTEXT and context * MIN_WINDOWS > data_tokens:
        context //= 2
    return context


def count_params(model_cfg) -> tuple[int, int]:
    """(model.num_params(), its block parameters) of a model built on the meta device (no memory, no
    initialisation)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    return model.num_params(), block_params(model)


def candidates(arch: str, base: dict, vocab_size: int, data_tokens: int) -> list[Candidate]:
    """The ladder for a family and data: `base` holds the recipe's model settings (qk_norm, tie_weights, ...)."""
    if data_tokens < MIN_WINDOWS * MIN_CONTEXT:
        raise DataError(f"the training text has {data_tokens:,} tokens, too few to plan a run (at least "
                          f"{MIN_WINDOWS * MIN_CONTEXT:,}: {MIN_WINDOWS} windows of {MIN_CONTEXT}); give more text")
    spec = get_spec(arch)
    out = []
    for n_layers, emb_dim in LADDER:
        shape = ladder_shape(arch, n_layers, emb_dim)
        config = build(spec.config_class, base, shape,
                       {"vocab_size": vocab_size, "context_length": context_for(emb_dim, data_tokens)})
        out.append(Candidate(shape, config, *count_params(config)))
    return out
