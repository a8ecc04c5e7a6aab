"""Layers the model families share: linear layers, causal attention over n_kv_heads, norms, MLPs,
rotary position embeddings, the output head and its loss, and the KV cache.

Attention takes a number of key/value heads that divides the number of query heads: equal for
multi-head attention (GPT-2), fewer for grouped-query attention, where each key/value head serves
n_heads // n_kv_heads query heads. The projections are ``nn.Linear`` (weight shape ``(out, in)``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

try:  # FlexAttention: torch 2.5 and later
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

ATTENTIONS = ("auto", "sdpa", "flex")  # the kernel of packed documents (--attention)
SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)  # scaled_dot_product_attention's enable_gqa


class SavedConfig:
    """to_dict / from_dict for a family's config dataclass (checkpoint metadata, config.toml's [model])."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class Dropout(nn.Dropout):
    """Dropout that leaves x alone (draws no random numbers) at rate 0 or in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, True) if self.training and self.p > 0 else x


class Attention(nn.Module):
    """A block's attention kernel (no parameters): causal_attention. A module, so that models/cpu.py can put
    the CPU kernels in its place when the model is built."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0, mask=None) -> torch.Tensor:
        return causal_attention(q, k, v, dropout_p, kv, pos, mask)


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values (B, n_kv_heads, T, hs) -> (B, n_heads, T, hs), each head repeated for its query group."""
    if x.size(1) == n_heads:
        return x
    return x.repeat_interleave(n_heads // x.size(1), dim=1)


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that restart at 0 where each document starts; segments (B, T) number the documents of
    each row in order (non-decreasing, as a cumulative sum of document starts gives them)."""
    T = segments.size(1)
    index = torch.arange(T, device=segments.device).expand_as(segments)  # (B, T)
    starts = segments != F.pad(segments, (1, 0), value=-1)[:, :-1]  # a token whose segment differs from the last
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """The attention mask (B, 1, T, T) of packed documents: a query sees the keys up to its own position that lie
    in its own document (True: attend)."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, :, None] == segments[:, None, :]).logical_and_(causal)[:, None]  # (B, 1, T, T)


def uses_flex(attention: str, device: torch.device, dropout_p: float) -> bool:
    """Whether packed documents attend through FlexAttention: --attention flex, or auto on CUDA (where the dense
    mask rules out the flash kernel) without attention dropout (which FlexAttention lacks)."""
    if attention == "flex":
        if flex_attention is None:
            raise ConfigError(f"--attention flex needs FlexAttention (torch 2.5 or later; this is torch "
                              f"{torch.__version__}); use --attention sdpa or auto")
        return True
    return attention == "auto" and device.type == "cuda" and dropout_p == 0.0 and flex_attention is not None


def packed_mask(segments: torch.Tensor, attention: str, dropout_p: float):
    """The mask of packed documents for the chosen kernel: a BlockMask for FlexAttention (uses_flex), else the
    dense document_mask (B, 1, T, T) (a bool tensor, True: attend)."""
    if not uses_flex(attention, segments.device, dropout_p):
        return document_mask(segments)
    B, T = segments.shape

    def same_document(b, h, q, kv):  # causal within each document
        return (segments[b, q] == segments[b, kv]) & (q >= kv)

    compile = segments.is_cuda and not torch.compiler.is_compiling()  # inside --compile's graph it is compiled
    return create_block_mask(same_document, B, None, T, T, device=segments.device, _compile=compile)


@functools.cache
def _flex_kernel(device_type: str):
    """flex_attention compiled (once per shape: dynamic=False) on CUDA; its eager form elsewhere (forward only)."""
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention of q (B, nh, T, hs) over k, v (B, n_kv_heads, T, hs) within block_mask -> (B, nh, T, hs);
    under autocast in its dtype (as scaled_dot_product_attention runs there), else in q's."""
    kind = q.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with warnings.catch_warnings():  # off CUDA the eager form runs on purpose (tests): no advice to compile
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        kernel = flex_attention if torch.compiler.is_compiling() else _flex_kernel(kind)  # --compile: in its graph
        return kernel(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """scaled_dot_product_attention over n_kv_heads keys and values: on CUDA without a mask with enable_gqa (no
    repeated tensors; torch 2.5 and later; the flash kernel takes it), else repeated for each query group (a mask
    leaves the memory-efficient kernel, which does not take enable_gqa; the CPU path as it always ran)."""
    if q.is_cuda and k.size(1) != q.size(1) and SDPA_GQA and kwargs.get("attn_mask") is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    n_heads = q.size(1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_heads), repeat_kv(v, n_heads), **kwargs)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                     kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                     mask=None) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hs) over k, v (B, n_kv_heads, T, hs) -> (B, nh, T, hs).

    Without kv, q, k and v are whole sequences (training, scoring). With kv (a layer of a KVCache),
    they hold positions pos..pos+T-1: k and v are written into the cache, and the queries attend to
    every cached position up to their own. A mask restricts whole sequences further (packed documents):
    dense (B, 1, T, T; document_mask) for scaled_dot_product_attention, which picks the kernel, or a
    BlockMask (packed_mask) for FlexAttention.
    """
    if BlockMask is not None and isinstance(mask, BlockMask):
        if dropout_p:
            raise ConfigError("--attention flex has no attention dropout: train with --drop-rate 0, or use "
                              "--attention sdpa")
        if q.device.type == "cpu" and q.requires_grad:
            raise ConfigError("--attention flex trains on GPUs only (FlexAttention has no backward on a CPU in "
                              f"torch {torch.__version__}); use --attention sdpa or auto")
        return flex(q, k, v, mask)
    if mask is not None:
        assert kv is None, "packed documents are whole sequences: no KV cache"
        return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if kv is None:
        return sdpa(q, k, v, dropout_p=dropout_p, is_causal=True)
    T = q.size(2)
    k, v = cached(k, v, kv, pos)  # (B, n_kv_heads, pos + T, hs)
    mask = None
    if pos > 0 and T > 1:  # query i (at pos + i) sees keys 0..pos + i
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=pos == 0)


def cached(k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], pos: int):
    """Write keys and values (B, n_kv_heads, T, hs) at positions pos..pos+T-1 of a KVCache layer kv; every cached
    key and value up to there (B, n_kv_heads, pos + T, hs)."""
    T = k.size(2)
    k_all, v_all = kv  # (B, n_kv_heads, T_max, hs)
    k_all[:, :, pos:pos + T] = k
    v_all[:, :, pos:pos + T] = v
    return k_all[:, :, :pos + T], v_all[:, :, :pos + T]


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection (``c_attn``), causal attention, output projection (``c_proj``)."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, drop_rate: float, qkv_bias: bool,
                 out_bias: bool = True):
        super().__init__()
        assert emb_dim % n_heads == 0 and n_heads % n_kv_heads == 0, (emb_dim, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, emb_dim // n_heads
        self.drop_rate = drop_rate
        self.c_attn = nn.Linear(emb_dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(emb_dim, emb_dim, bias=out_bias)
        self.attend, self.resid_drop = Attention(), Dropout(drop_rate)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                mask: torch.Tensor | None = None):
        """x (B, T, C); with kv (a layer of a KVCache), x holds positions pos..pos+T-1 of the sequence; mask
        (B, 1, T, T) or None: see causal_attention."""
        B, T, C = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.c_attn(x).split((nh * hs, nkv * hs, nkv * hs), dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        drop = self.drop_rate if self.training else 0.0
        y = self.attend(q, k, v, drop, kv, pos, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama and Qwen compute it: in fp32, then scaled by ``weight`` in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (..., head_dim) of rotary embeddings at positions (...,): (T,) or (B, T); rotate-half layout.

    Frequency i (of head_dim / 2) is theta^(-2i / head_dim), computed in fp32; both halves of a
    head share the frequencies, as Hugging Face's Llama and Qwen models lay them out.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hs) by the angles whose cos and sin are (T, hs), or (B, 1, T, hs) for positions per
    row: pairs (i, i + hs/2) turn together."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GroupedQueryAttention(nn.Module):
    """Separate q/k/v projections (``q_proj``, ``k_proj``, ``v_proj``) into n_heads query and n_kv_heads
    key/value heads of head_dim, optional RMSNorm of each query and key head (``q_norm``, ``k_norm``),
    rotary positions, causal attention, output projection (``o_proj``)."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 qk_norm: bool, norm_eps: float, drop_rate: float):
        super().__init__()
        assert n_heads % n_kv_heads == 0, (n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.drop_rate = drop_rate
        self.q_proj = nn.Linear(emb_dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(emb_dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(emb_dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=False)
        self.attend, self.resid_drop = Attention(), Dropout(drop_rate)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions pos..pos+T-1, whose rotary cos and sin (T, head_dim) are `rope` ((B, 1, T,
        head_dim) for packed documents, with their mask (B, 1, T, T): see causal_attention)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), *rope)  # (B, nh, T, hs)
        k = apply_rotary(k.transpose(1, 2), *rope)  # (B, nkv, T, hs)
        drop = self.drop_rate if self.training else 0.0
        y = self.attend(q, k, v, drop, kv, pos, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_drop(self.o_proj(y))


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), no biases, dropout on the output."""

    def __init__(self, emb_dim: int, hidden_dim: int, drop_rate: float):
        super().__init__()
        self.gate_proj = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, emb_dim, bias=False)
        self.drop = Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MLP(nn.Module):
    """Linear (``c_fc``), GELU (with the tanh approximation, or exact: approximate="none"), linear back
    (``c_proj``), dropout."""

    def __init__(self, emb_dim: int, hidden_dim: int, drop_rate: float, bias: bool = True, approximate: str = "tanh"):
        super().__init__()
        self.c_fc = nn.Linear(emb_dim, hidden_dim, bias=bias)
        self.c_proj = nn.Linear(hidden_dim, emb_dim, bias=bias)
        self.drop = Dropout(drop_rate)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


def torch_default_init(model: nn.Module) -> None:
    """Re-initialise every layer as PyTorch's modules do by default (the book's ``GPTModel`` is built so):
    linear weights and biases uniform in +-1/sqrt(fan_in), embeddings N(0, 1), norms ones (and zeros).

    A head tied to the embedding keeps the embedding's initialisation.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in tied:
            continue
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def padded_rows(vocab_size: int, pad: bool) -> int:
    """Rows of the embedding and head: the vocabulary, padded (pad_vocab) to a multiple of 64."""
    return -(-vocab_size // 64) * 64 if pad else vocab_size


def cross_entropy(h: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of the head's logits h (B, T, C) @ head_weight[:vocab_size].T against targets (B, T)."""
    logits = F.linear(h, head_weight)[..., :vocab_size]  # (B, T, vocab_size)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def vocab_padding_hooks(model: nn.Module, names: tuple[str, ...], vocab_size: int, padded: int) -> None:
    """State dicts of a model with padded rows hold vocab_size rows of the named tensors, as unpadded models do."""
    if padded == vocab_size:
        return

    def unpad(module, state_dict, prefix, local_metadata):
        for name in names:
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name][:vocab_size]

    def pad(module, state_dict, prefix, *args):
        for name in names:
            w = state_dict.get(prefix + name)
            if w is not None and w.size(0) == vocab_size:
                state_dict[prefix + name] = torch.cat([w, w.new_zeros(padded - w.size(0), w.size(1))])

    model.register_state_dict_post_hook(unpad)
    model.register_load_state_dict_pre_hook(pad)


class KVCache:
    """Keys and values of every layer for the first `pos` positions of a batch of sequences.

    Sized by the model config's n_layers, n_kv_heads and head_dim, for max_len positions (default:
    context_length). The model writes positions pos.. and then advances pos; generation resets it
    before each prompt.
    """

    def __init__(self, cfg, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 max_len: int | None = None):
        positions = max_len or cfg.context_length
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, positions, cfg.head_dim)  # (L, B, nkv, T_max, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far

    @staticmethod
    def nbytes(cfg, dtype: torch.dtype, batch_size: int = 1, max_len: int | None = None) -> int:
        """Memory of a cache for this config: keys and values of every layer for max_len positions (the context)."""
        positions = max_len or cfg.context_length
        return 2 * cfg.n_layers * batch_size * cfg.n_kv_heads * positions * cfg.head_dim * dtype.itemsize

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
