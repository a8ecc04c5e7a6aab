"""Device names (auto, cpu, cuda, mps) and the one function that turns a name into a torch.device; the attention
kernel of packed documents (--attention), a runtime choice of the device's kernels."""

from __future__ import annotations

import torch

from .config import ConfigError, opt
from .models.layers import ATTENTIONS

DEVICES = ("auto", "cpu", "cuda", "mps")


def device_opt(help: str = "Device to run on; auto picks cuda, then mps, then cpu.") -> str:
    """A `device` dataclass field (the --device flag): one of DEVICES, default auto."""
    return opt("auto", help, choices=DEVICES)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: no Apple MPS device is available; use --device cpu or auto")
    return torch.device(name)


def attention_opt() -> str:
    """An `attention` dataclass field (the --attention flag): the kernel packed documents attend with."""
    return opt("auto", "Attention kernel of packed documents (--document-mask): sdpa (scaled_dot_product_attention "
                       "with a dense mask), flex (FlexAttention with a block mask of the documents, compiled on "
                       "CUDA; no attention dropout), or auto (flex on CUDA without attention dropout, else sdpa). "
                       "Plain causal attention is always sdpa's (flash on CUDA).", choices=ATTENTIONS)
