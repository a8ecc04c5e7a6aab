"""Layers the model families share: linear layers, causal attention over n_kv_heads, MLP, KV cache.

Attention takes a number of key/value heads that divides the number of query heads: equal for
multi-head attention (GPT-2), fewer for grouped-query attention, where each key/value head serves
n_heads // n_kv_heads query heads. The projections are ``nn.Linear`` (weight shape ``(out, in)``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose decode-sized CPU products use both cores (ops.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values (B, n_kv_heads, T, hs) -> (B, n_heads, T, hs), each head repeated for its query group."""
    if x.size(1) == n_heads:
        return x
    return x.repeat_interleave(n_heads // x.size(1), dim=1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                     kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hs) over k, v (B, n_kv_heads, T, hs) -> (B, nh, T, hs).

    Without kv, q, k and v are whole sequences (training, scoring). With kv (a layer of a KVCache),
    they hold positions pos..pos+T-1: k and v are written into the cache, and the queries attend to
    every cached position up to their own.
    """
    n_heads = q.size(1)
    if kv is None:
        return ops.causal_attention(q, repeat_kv(k, n_heads), repeat_kv(v, n_heads), dropout_p)
    T = q.size(2)
    k_all, v_all = kv  # (B, n_kv_heads, T_max, hs)
    k_all[:, :, pos:pos + T] = k
    v_all[:, :, pos:pos + T] = v
    k, v = k_all[:, :, :pos + T], v_all[:, :, :pos + T]  # (B, n_kv_heads, pos + T, hs)
    mask = None
    if pos > 0 and T > 1:  # query i (at pos + i) sees keys 0..pos + i
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_heads), repeat_kv(v, n_heads), attn_mask=mask,
                                          dropout_p=dropout_p, is_causal=pos == 0)


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection (``c_attn``), causal attention, output projection (``c_proj``)."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, drop_rate: float, qkv_bias: bool):
        super().__init__()
        assert emb_dim % n_heads == 0 and n_heads % n_kv_heads == 0, (emb_dim, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, emb_dim // n_heads
        self.drop_rate = drop_rate
        self.c_attn = Linear(emb_dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=qkv_bias)  # fused q, k, v
        self.c_proj = Linear(emb_dim, emb_dim)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0):
        """x (B, T, C); with kv (a layer of a KVCache), x holds positions pos..pos+T-1 of the sequence."""
        B, T, C = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.c_attn(x).split((nh * hs, nkv * hs, nkv * hs), dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        drop = self.drop_rate if self.training else 0.0
        y = causal_attention(q, k, v, drop, kv, pos)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return ops.dropout(self.c_proj(y), drop, self.training)


class MLP(nn.Module):
    """Linear (``c_fc``), GELU with the tanh approximation, linear back (``c_proj``), dropout."""

    def __init__(self, emb_dim: int, hidden_dim: int, drop_rate: float):
        super().__init__()
        self.c_fc = Linear(emb_dim, hidden_dim)
        self.c_proj = Linear(hidden_dim, emb_dim)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.drop_rate, self.training)


class KVCache:
    """Keys and values of every layer for the first `pos` positions of a batch of sequences.

    Sized by the model config's n_layers, n_kv_heads, context_length and head_dim. The model writes
    positions pos.. and then advances pos; generation resets it before each prompt.
    """

    def __init__(self, cfg, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)  # (L, B, nkv, T_max, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far

    @staticmethod
    def nbytes(cfg, dtype: torch.dtype, batch_size: int = 1) -> int:
        """Memory of a cache for this config: keys and values of every layer for the whole context."""
        return 2 * cfg.n_layers * batch_size * cfg.n_kv_heads * cfg.context_length * cfg.head_dim * dtype.itemsize

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]  # each (B, nkv, T_max, hs)

    def reset(self) -> None:
        """Forget every position: the next forward pass starts a new sequence at position 0."""
        self.pos = 0

    def advance(self, n: int) -> None:
        """Count n more positions as filled (after the model wrote their keys and values)."""
        assert 0 <= n and self.pos + n <= self.max_len, (self.pos, n, self.max_len)
        self.pos += n
