"""The CPU kernels (ops.py) put into a model when it is built, so that the models' forward holds only the math.

`with_cpu_kernels(model)` gives each module that has a faster CPU version a subclass of its own class whose
forward uses the kernel, as activation checkpointing wraps blocks from outside: the parameters, their names
and the state dict stay as they were. Each kernel decides per call (fp32 on a CPU, eager, outside autocast:
ops.use_cpu_kernels) and otherwise runs the plain module's forward, so a model built once works on any
device, compiled or not. Swapped in:

- linear layers (ops.linear): decode-sized products split over the cores;
- dropout (ops.dropout): the mask drawn as uniform numbers compared with p;
- attention (ops.causal_attention, ops.decode_attention): dropout on the attention weights with that mask,
  and one query attending to grouped cached keys and values without repeating them;
- a token embedding tied to the head: its gradient is sparse (T rows, added to the head's dense one)
  instead of a dense (vocab x C) zero matrix with T rows filled in.

A model built directly from its class (GPT(cfg)) runs plain PyTorch everywhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .layers import Attention, cached, repeat_kv


class _Linear:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class _Dropout:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training)


class _Attention:
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0, mask=None) -> torch.Tensor:
        if mask is None and ops.use_cpu_kernels(q):
            if kv is None:  # whole sequences
                n_heads = q.size(1)
                return ops.causal_attention(q, repeat_kv(k, n_heads), repeat_kv(v, n_heads), dropout_p)
            if q.size(2) == 1 and not dropout_p and not q.requires_grad:  # a decode step
                return ops.decode_attention(q, *cached(k, v, kv, pos))
        return super().forward(q, k, v, dropout_p, kv, pos, mask)


class _TiedEmbedding:
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        sparse = torch.is_grad_enabled() and ops.use_cpu_kernels(self.weight)
        return F.embedding(idx, self.weight, sparse=sparse)


KERNELS = ((nn.Linear, _Linear), (nn.Dropout, _Dropout), (Attention, _Attention))  # base class -> its CPU forward


@functools.cache
def _with(kernel: type, cls: type) -> type:
    """cls with kernel's forward: one class per pair, named after both (CPULinear, CPURouter, ...)."""
    return type(f"CPU{cls.__name__}", (kernel, cls), {"__module__": __name__})


def with_cpu_kernels(model: nn.Module) -> nn.Module:
    """model (in place, and returned) with the CPU kernels swapped into its modules; twice is the same as once."""
    for module in model.modules():
        for base, kernel in KERNELS:
            if isinstance(module, base) and not isinstance(module, kernel):
                module.__class__ = _with(kernel, type(module))
    cfg = getattr(model, "cfg", None)
    embedding = getattr(model, "token_embedding", None)
    if cfg is not None and getattr(cfg, "tie_weights", False) and isinstance(embedding, nn.Embedding) \
            and not isinstance(embedding, _TiedEmbedding):
        embedding.__class__ = _with(_TiedEmbedding, type(embedding))
    return model
