"""Model families: an architecture name (``arch``) -> the spec the rest of gptforge asks about it.

Each family is one file (its config dataclass, presets and model, over the shared layers.py), one module
of weight formats (weights/<arch>.py), and one ModelSpec in SPECS below naming both: the only place a family
is registered (weights.FAMILIES is derived from it). Training, checkpoints, weights, perf, generation and
distributed code ask the spec rather than knowing the model: which config and model classes to build, the
presets, FLOPs per token, the transformer blocks (FSDP, activation checkpointing), whether positions are a
learned table, and where its weight formats live (Hugging Face names and layouts are theirs). The CLI's
shape flags are ModelSettings, every family's settings once. Files that record no arch are GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

import torch.nn as nn

from ..config import ConfigError
from . import gpt2, llama
from .cpu import with_cpu_kernels
from .layers import KVCache
from .moe import MoE

DEFAULT_ARCH = "gpt2"  # what config.toml files and checkpoints that record no arch hold


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of gptforge needs to know about one model family."""

    arch: str  # the name saved as `arch` in config.toml and checkpoint metadata
    config_class: type  # a dataclass with to_dict / from_dict, n_layers, context_length, n_kv_heads, head_dim
    model_class: type  # nn.Module built from a config: model(idx, cache) -> logits, model(idx, targets=y) -> loss
    presets: dict[str, dict]  # preset name -> config values
    matmul_params: Callable[[Any], int]  # weights of every matrix multiply, the LM head included
    flops_per_token: Callable[..., int]  # (cfg, seq_len=None) -> training FLOPs per token
    blocks: Callable[[nn.Module], Sequence[nn.Module]]  # the transformer blocks, in order
    weights: str | None = None  # the module of its weight formats (weights.plan.WeightFamily), imported by weights/
    learned_positions: bool = True  # a table of context_length positions (GPT-2); False: rotary, no limit
    default_preset: str = "mini"  # the shape `train` and `bench` start from when no --preset is given


SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", gpt2.GPTConfig, gpt2.GPT, gpt2.PRESETS, gpt2.matmul_params, gpt2.flops_per_token,
                      gpt2.blocks, weights="gptforge.weights.gpt2"),
    "llama": ModelSpec("llama", llama.LlamaConfig, llama.Llama, llama.PRESETS, llama.matmul_params,
                       llama.flops_per_token, llama.blocks, weights="gptforge.weights.llama", learned_positions=False,
                       default_preset="llama-mini"),
}


def get_spec(arch: str) -> ModelSpec:
    """The spec of a family by name; a ConfigError naming the known ones for any other."""
    if arch not in SPECS:
        raise ConfigError(f"unknown arch {arch!r}; known model families: {', '.join(sorted(SPECS))}")
    return SPECS[arch]


def spec_for(cfg: Any) -> ModelSpec:
    """The spec whose config class cfg is an instance of."""
    for spec in SPECS.values():
        if type(cfg) is spec.config_class:
            return spec
    raise TypeError(f"{type(cfg).__name__} is the config of no registered model family")


def build(cfg: Any) -> nn.Module:
    """A freshly initialised model of cfg's family (on the current default device), with the CPU kernels in
    (models/cpu.py: they apply in fp32 on a CPU, and leave every other case to the plain modules)."""
    return with_cpu_kernels(spec_for(cfg).model_class(cfg))


def config_from_dict(d: dict, arch: str | None = None) -> Any:
    """A saved model config (checkpoint metadata, config.toml's [model]) of family arch (None: GPT-2)."""
    return get_spec(arch or DEFAULT_ARCH).config_class.from_dict(d)


def preset_arch(name: str) -> str:
    """The family a preset belongs to (preset names are unique across families); ConfigError for an unknown one."""
    for spec in SPECS.values():
        if name in spec.presets:
            return spec.arch
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(all_presets()))}")


def all_presets() -> list[str]:
    return [name for spec in SPECS.values() for name in spec.presets]


def _settings_union() -> type:
    """A dataclass with every family's model settings once (the CLI's shape flags and config.toml's [model] keys).

    Its defaults are None (unset); the help text says which family each setting belongs to and its defaults.
    """
    merged: dict[str, dict] = {}
    for spec in SPECS.values():
        for f in fields(spec.config_class):
            entry = merged.setdefault(f.name, {"type": f.type, "help": f.metadata.get("help", ""), "defaults": {},
                                               "choices": f.metadata.get("choices")})
            default = f.default if f.default is not MISSING else None
            entry["defaults"][spec.arch] = default
    out = []
    for name, entry in merged.items():
        defaults = entry["defaults"]
        if len(defaults) < len(SPECS):
            note = f"({', '.join(defaults)} only" + (f"; default: {next(iter(defaults.values()))})"
                                                     if next(iter(defaults.values())) is not None else ")")
        elif len(set(map(repr, defaults.values()))) == 1:
            note = f"[default: {next(iter(defaults.values()))}]" if next(iter(defaults.values())) is not None else ""
        else:
            note = "[default: " + ", ".join(f"{v} ({a})" for a, v in defaults.items()) + "]"
        typ = entry["type"] if "None" in str(entry["type"]) else f"{entry['type']} | None"
        meta = {"help": f"{entry['help']} {note}".strip(), "archs": tuple(defaults)}
        if entry["choices"]:
            meta["choices"] = entry["choices"]
        out.append((name, typ, field(default=None, metadata=meta)))
    return make_dataclass("ModelSettings", out)


ModelSettings = _settings_union()


def check_settings(spec: ModelSpec, values: dict, where: str) -> None:
    """Refuse model settings of another family (e.g. --n-kv-heads with --arch gpt2), naming the family that has them."""
    own = {f.name for f in fields(spec.config_class)}
    for f in fields(ModelSettings):
        if f.name in values and f.name not in own:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{where}{flag} is a setting of the {' and '.join(f.metadata['archs'])} family, not of "
                              f"{spec.arch}; add --arch {f.metadata['archs'][0]} or drop {flag}")


def block_params(model: nn.Module) -> int:
    """Parameters in the model's transformer blocks: Kaplan et al.'s non-embedding count (no embedding, head or
    final norm), what model size means in scaling laws of small models; of a mixture of experts, the active ones
    (experts_per_token of each layer's experts: what a token's compute runs through)."""
    blocks = spec_for(model.cfg).blocks(model)
    idle = sum((m.n_experts - m.k) * sum(p.numel() for p in m.experts[0].parameters())
               for block in blocks for m in block.modules() if isinstance(m, MoE))
    return sum(p.numel() for block in blocks for p in block.parameters()) - idle


def max_positions(cfg: Any) -> int | None:
    """The longest sequence a model of cfg can read: context_length with learned positions, else no limit (None)."""
    return cfg.context_length if spec_for(cfg).learned_positions else None


__all__ = ["DEFAULT_ARCH", "KVCache", "ModelSettings", "ModelSpec", "SPECS", "all_presets", "build", "check_settings",
           "config_from_dict", "get_spec", "max_positions", "preset_arch", "spec_for"]
