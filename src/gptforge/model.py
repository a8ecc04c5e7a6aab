"""The GPT-2 architecture, and nothing else.

Parameter names follow OpenAI's GPT-2 checkpoints as Hugging Face stores them (``wte``, ``wpe``,
``h.{i}.ln_1``, ``attn.c_attn``, ``mlp.c_fc``, ``ln_f``), so importing GPT-2 weights is a short key
map. The attention and MLP projections are ``nn.Linear`` (weight shape ``(out, in)``), the
transpose of GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import check_range, flag


@dataclass
class GPTConfig:
    """Shape of a GPT-2-style model. The defaults are the CPU-sized "mini" preset."""

    vocab_size: int = field(default=50257, metadata={"help": "Number of token ids (50257 for GPT-2 BPE)."})
    context_length: int = field(
        default=128, metadata={"help": "Longest sequence the model sees: the number of learned positions."}
    )
    emb_dim: int = field(default=128, metadata={"help": "Width of the residual stream."})
    n_heads: int = field(default=4, metadata={"help": "Attention heads per layer; must divide emb_dim."})
    n_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    drop_rate: float = field(
        default=0.1, metadata={"help": "Dropout on embeddings, attention and residual branches in training."}
    )
    qkv_bias: bool = field(default=False, metadata={"help": "Bias on the query/key/value projection."})
    tie_weights: bool = field(
        default=True, metadata={"help": "Share the output head with the token embedding, as GPT-2 does."}
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
                raise ValueError(f"{flag(name)} must be a whole number, got {value!r}")
            check_range(name, value, 1)
        if self.emb_dim % self.n_heads:
            raise ValueError(f"--emb-dim {self.emb_dim} must be divisible by --n-heads {self.n_heads}; "
                             "change one of them")
        check_range("drop_rate", self.drop_rate, 0, 1, below=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


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


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose decode-sized CPU products use both cores (ops.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.c_attn = Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # fused q, k, v
        self.c_proj = Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0):
        """x (B, T, C); with kv (a layer of a KVCache), x holds positions pos..pos+T-1 of the sequence."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        hs = C // self.n_heads
        q = q.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, hs).transpose(1, 2)
        v = v.view(B, T, self.n_heads, hs).transpose(1, 2)
        drop = self.drop_rate if self.training else 0.0
        if kv is None:  # whole sequences: training, scoring
            y = ops.causal_attention(q, k, v, drop)  # (B, nh, T, hs)
        else:
            k_all, v_all = kv  # (B, nh, T_max, hs)
            k_all[:, :, pos:pos + T] = k
            v_all[:, :, pos:pos + T] = v
            k, v = k_all[:, :, :pos + T], v_all[:, :, :pos + T]  # (B, nh, pos + T, hs)
            mask = None
            if pos > 0 and T > 1:  # query i (at pos + i) sees keys 0..pos + i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=pos == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return ops.dropout(self.c_proj(y), drop, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.drop_rate, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0):
        x = x + self.attn(self.ln_1(x), kv, pos)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for the first `pos` positions of a batch of sequences."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        hs = cfg.emb_dim // cfg.n_heads
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, hs)  # (L, B, nh, T_max, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]  # each (B, nh, T_max, hs)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False  # recompute each block in backward instead of storing it
        # Rows of the embedding and head: the vocabulary, padded (pad_vocab) to a multiple of 64.
        self.padded_vocab = -(-cfg.vocab_size // 64) * 64 if cfg.pad_vocab else cfg.vocab_size
        self.wte = nn.Embedding(self.padded_vocab, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = Linear(cfg.emb_dim, self.padded_vocab, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if self.padded_vocab != cfg.vocab_size:  # state dicts hold vocab_size rows, as unpadded models do
            self.register_state_dict_post_hook(self._unpad_state)
            self.register_load_state_dict_pre_hook(self._pad_state)

    @staticmethod
    def _unpad_state(module: GPT, state_dict: dict, prefix: str, local_metadata) -> None:
        for name in ("wte.weight", "lm_head.weight"):
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name][: module.cfg.vocab_size]

    @staticmethod
    def _pad_state(module: GPT, state_dict: dict, prefix: str, *args) -> None:
        for name in ("wte.weight", "lm_head.weight"):
            w = state_dict.get(prefix + name)
            if w is not None and w.size(0) == module.cfg.vocab_size:
                state_dict[prefix + name] = torch.cat([w, w.new_zeros(module.padded_vocab - w.size(0), w.size(1))])

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); with targets (B, T), their mean cross-entropy.

        With a cache, idx continues the cached positions, and their keys and values are added to it.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context_length "
                f"{self.cfg.context_length}"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        # Tied weights on a CPU: the look-up's gradient is sparse (T rows), added to the head's dense
        # one, instead of a dense (vocab x C) zero matrix with T rows filled in and then added.
        sparse = self.cfg.tie_weights and torch.is_grad_enabled() and ops.use_cpu_kernels(self.wte.weight)
        tok = F.embedding(idx, self.wte.weight, sparse=sparse)
        x = ops.dropout(tok + self.wpe(pos), self.cfg.drop_rate, self.training)  # (B, T, C)
        for i, block in enumerate(self.h):
            if cache is not None:
                x = block(x, cache.layer(i), start)
            elif self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is not None and ops.use_cpu_kernels(x):  # the head and the loss without keeping logits
            return ops.head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.cfg.vocab_size)
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        if targets is not None:
            return F.cross_entropy(logits[..., : self.cfg.vocab_size].flatten(0, 1).float(), targets.flatten())
        return logits[..., : self.cfg.vocab_size] if self.padded_vocab != self.cfg.vocab_size else logits

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters; with non_embedding, without the position embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields tied tensors once
        n -= (self.padded_vocab - self.cfg.vocab_size) * self.cfg.emb_dim * (1 if self.cfg.tie_weights else 2)
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n
