"""The GPT-2 architecture, and nothing else.

Parameter names follow OpenAI's GPT-2 checkpoints as Hugging Face stores them (``wte``, ``wpe``,
``h.{i}.ln_1``, ``attn.c_attn``, ``mlp.c_fc``, ``ln_f``), so importing GPT-2 weights is a short key
map. The attention and MLP projections (layers.py) are ``nn.Linear`` (weight shape ``(out, in)``),
the transpose of GPT-2's ``Conv1D``. GPT-2 attends with as many key/value heads as query heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import check_fields, flag
from ..errors import ConfigError
from .decoder import Decoder
from .layers import (
    MLP,
    CausalSelfAttention,
    Dropout,
    SavedConfig,
    padded_rows,
    vocab_padding_hooks,
)

GELU = ("tanh", "exact")  # GPTConfig.gelu: F.gelu's approximate="tanh" or "none"


@dataclass
class GPTConfig(SavedConfig):
    """Shape of a GPT-2-style model. The defaults are the CPU-sized "mini" preset."""

    vocab_size: int = field(
        default=50257, metadata={"help": "Number of token ids; default: the tokenizer's (50257 for GPT-2 BPE).",
                                 "low": 1}
    )
    context_length: int = field(
        default=128, metadata={"help": "Longest sequence the model trains on (GPT-2: its number of learned positions).",
                               "low": 1}
    )
    emb_dim: int = field(default=128, metadata={"help": "Width of the residual stream.", "low": 1})
    n_heads: int = field(default=4, metadata={"help": "Attention heads per layer; must divide emb_dim.", "low": 1})
    n_layers: int = field(default=4, metadata={"help": "Number of transformer blocks.", "low": 1})
    drop_rate: float = field(
        default=0.1, metadata={"help": "Dropout on embeddings, attention and residual branches in training.",
                               "low": 0, "high": 1, "below": True}
    )
    qkv_bias: bool = field(
        default=False, metadata={"help": "Bias on the query/key/value projections (GPT-2's checkpoints, Qwen2)."}
    )
    tie_weights: bool = field(
        default=True, metadata={"help": "Share the output head with the token embedding (GPT-2, Qwen3, minimind)."}
    )
    bias: bool = field(
        default=True,
        metadata={"help": "Biases in the attention output, MLP and LayerNorms (GPT-2); nanoGPT's bias=False has none "
                          "there nor on q/k/v."},
    )
    gelu: str = field(
        default="tanh",
        metadata={"help": "The MLP's GELU: tanh (the approximation GPT-2 was trained with, gelu_new) or exact "
                          "(erf, nanoGPT's nn.GELU).", "choices": GELU},
    )
    pad_vocab: bool = field(
        default=False,
        metadata={"help": "Pad the embedding and output head to a multiple of 64 rows for faster matmuls; "
                          "the padding never shows in logits, losses, samples or saved weights."},
    )

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{flag(name)} must be a whole number, got {value!r}")
        check_fields(self)
        if self.emb_dim % self.n_heads:
            raise ConfigError(f"--emb-dim {self.emb_dim} must be divisible by --n-heads {self.n_heads}; "
                             "change one of them")

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: as many as query heads (GPT-2 has no grouped-query attention)."""
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads



# Shapes of OpenAI's GPT-2 checkpoints, and small ones that train on a laptop CPU.
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(context_length=1024, emb_dim=768, n_layers=12, n_heads=12, qkv_bias=True),
    "gpt2-medium": dict(context_length=1024, emb_dim=1024, n_layers=24, n_heads=16, qkv_bias=True),
    "gpt2-large": dict(context_length=1024, emb_dim=1280, n_layers=36, n_heads=20, qkv_bias=True),
    "gpt2-xl": dict(context_length=1024, emb_dim=1600, n_layers=48, n_heads=25, qkv_bias=True),
    "tiny": dict(context_length=64, emb_dim=64, n_layers=2, n_heads=2),
    "mini": dict(context_length=128, emb_dim=128, n_layers=4, n_heads=4),
    "small-cpu": dict(context_length=256, emb_dim=256, n_layers=6, n_heads=8),
}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_heads, cfg.drop_rate, cfg.qkv_bias,
                                        out_bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg.emb_dim, 4 * cfg.emb_dim, cfg.drop_rate, bias=cfg.bias,
                       approximate="none" if cfg.gelu == "exact" else "tanh")

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                mask: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), kv, pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(Decoder):
    """GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP (names as GPT-2's: wte, wpe, h, ln_f)."""

    EMBEDDING, BLOCKS, NORM = "wte", "h", "ln_f"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = "auto"  # the kernel of packed documents (layers.ATTENTIONS): a runtime choice, not saved
        self.padded_vocab = padded_rows(cfg.vocab_size, cfg.pad_vocab)
        self.wte = nn.Embedding(self.padded_vocab, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.emb_dim, self.padded_vocab, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        vocab_padding_hooks(self, ("wte.weight", "lm_head.weight"), cfg.vocab_size, self.padded_vocab)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def check_length(self, length: int, layout: tuple | None) -> None:
        if length > self.cfg.context_length and layout is None:  # a layout's positions are its own
            raise IndexError(f"sequence of {length} tokens is longer than the model's context_length "
                             f"{self.cfg.context_length}")

    def embed(self, idx: torch.Tensor, pos: torch.Tensor, masked: bool) -> tuple[torch.Tensor, dict]:
        """Token + learned position embeddings, dropout; the blocks take nothing else."""
        return self.drop(self.wte(idx) + self.wpe(pos)), {}

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters; with non_embedding, without the position embeddings."""
        return super().num_params() - (self.wpe.weight.numel() if non_embedding else 0)


def blocks(model: GPT) -> nn.ModuleList:
    """The transformer blocks, in order (FSDP shards each one)."""
    return model.h


def matmul_params(cfg: GPTConfig) -> int:
    """Weights of every matrix multiply: q/k/v, attention out, both MLP layers, and the LM head."""
    return cfg.n_layers * 12 * cfg.emb_dim**2 + cfg.vocab_size * cfg.emb_dim


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at sequence length seq_len (default: context).

    6 x the matmul weights (embedding look-ups excluded) + 12·L·H·Q·T for attention (PaLM, appendix B).
    """
    T = seq_len or cfg.context_length
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
