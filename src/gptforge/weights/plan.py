"""The plan: how each parameter of a model is made from a source's tensors, and filling a model by it.

Every format becomes a plan, a list of ``Entry``: one of our parameters, the source tensors it is
made from, and how (copied, transposed, concatenated). A ``Source`` is a detected model source: its
format, model config, reader and plan. The plan is checked against the reader's shapes before
anything is read (``gptforge.weights.check_source``); ``fill`` then assigns the parameters of a
meta-device model one transformer block at a time, each a fresh fp32 tensor, while the file is
memory-mapped or read by offset: the weights are never held twice.

Nothing here knows a model family. Block names, tied parameters and the tensors sized by the
context length are read off the model that the family's spec builds; Hugging Face names off the
family's weights module (``HF_PREFIX``, ``HF_TRANSPOSED``). ``WeightFamily`` is what a family's weight formats
provide (weights/gpt2.py); its ModelSpec names the module (``family_of``), ``gptforge.weights.FAMILIES`` lists them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..models import build, spec_for
from .readers import Reader, TorchReader

# A plan entry: our parameter, the source tensors it is made from, and how.
#   copy: as is   t: transpose (Conv1D -> Linear)   tf: drop the leading axis of 1, transpose
#   cat: concatenate q, k, v along the output axis (the book's separate W_query, W_key, W_value)
#   rows: the source has `rows` rows, of which ours are the first (nanoGPT's vocabulary padded to 50,304)
#   expert: the source stacks experts, shape `stacked`; ours is source[expert, start:start + our rows]
#           (transformers 5's in-memory mlp.experts.gate_up_proj (E, 2I, C) and down_proj (E, C, I))


@dataclass
class Entry:
    ours: str
    src: tuple[str, ...]
    how: str = "copy"
    rows: int = 0  # how == "rows": the source tensor's row count; how == "expert": the first row taken
    expert: int = 0  # how == "expert": which expert of the stack
    stacked: tuple[int, ...] = ()  # how == "expert": the source tensor's shape


@dataclass
class Source:
    """A detected model source: its format, model config, tensors, and how they map onto the model."""

    format: str
    cfg: Any  # the config of a registered model family (models.spec_for(cfg))
    reader: Reader
    plan: list[Entry]
    ignored: set[str] = field(default_factory=set)  # source tensors that are not weights
    meta: dict = field(default_factory=dict)


class WeightFamily(Protocol):
    """The weight formats of one model family: a module of these names (weights/gpt2.py), named by its ModelSpec.

    NAME names the family's models in errors ("GPT-2"); HF_MODEL_TYPES are the config.json
    ``model_type`` values it reads ("gpt2"); HF_PREFIX and HF_TRANSPOSED how its Hugging Face names and layouts
    differ from ours; SHAPE_KEYS the config settings a run initialised from
    its weights keeps (``train --init-from``); STATE_DICTS what its torch state dicts hold, for the
    error that says what a file is not ("GPT-2 (no transformer.wte.weight)").
    """

    NAME: str
    HF_MODEL_TYPES: tuple[str, ...]
    HF_PREFIX: str  # prefix of every Hugging Face key but the head's ("transformer.", "model.")
    HF_TRANSPOSED: tuple[str, ...]  # name endings of weights Hugging Face stores as (in, out) (GPT-2's Conv1D)
    SHAPE_KEYS: tuple[str, ...]
    STATE_DICTS: tuple[str, ...]

    def describe(self, cfg: Any) -> str:
        """The config's shape in a few words, for errors about tensors that do not fit it."""

    def config_from_hf(self, conf: dict, path: Path) -> Any:
        """A Hugging Face config.json (read from path) -> the family's config; a WeightsError for what
        the model cannot compute."""

    def hf_source(self, cfg: Any, reader: Reader, meta: dict) -> Source:
        """Hugging Face weights of config cfg as a Source; meta ("format", "source") gains "tokenizer"."""

    def open_state_dict(self, path: Path, reader: TorchReader, n_heads: int | None) -> Source | None:
        """A torch state dict in one of the family's own formats (not Hugging Face names), or None."""

    def is_hf_state_dict(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether a torch state dict holds the family's Hugging Face names (read with the config.json beside it)."""

    def hf_config(self, cfg: Any) -> dict:
        """The config.json of the transformers model with this config."""

    def hf_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's weights as that transformers model's from_pretrained loads them."""

    def gguf_arch(self, cfg: Any) -> str:
        """llama.cpp's architecture name for a model of cfg; a WeightsError for what llama.cpp cannot run."""

    def gguf_params(self, writer: Any, cfg: Any) -> None:
        """The architecture's metadata (context length, widths, heads, eps, rotary), through a gguf.GGUFWriter."""

    def gguf_tensors(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        """(llama.cpp tensor name, tensor) in the order and layout llama.cpp's converter writes them."""


def block_index(name: str, prefix: str) -> int:
    """The transformer block a parameter is in ("h.3.attn.c_attn.weight", prefix "h." -> 3); -1 outside blocks."""
    m = re.match(re.escape(prefix) + r"(\d+)\.", name)
    return int(m.group(1)) if m else -1


def block_prefix(model: nn.Module) -> str:
    """The name prefix of the model's transformer blocks (the spec's `blocks`): "h." for GPT-2."""
    blocks = spec_for(model.cfg).blocks(model)
    return next(name for name, m in model.named_modules() if m is blocks) + "."


def shared_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters the model registers under a second name (a tied head): {second name: first name}."""
    first: dict[int, str] = {}
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared[name] = first[id(p)]
        else:
            first[id(p)] = name
    return shared


def our_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """The tensors a model of cfg stores and their shapes: its state dict, a tied head once (as HF stores it)."""
    with torch.device("meta"):
        model = build(cfg)
    shared = shared_parameters(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in shared}


def expected(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each source tensor of entry has when our parameter's is shape."""
    if entry.how == "t":
        return shape[::-1]
    if entry.how == "tf":
        return (1, *shape[::-1])
    if entry.how == "cat":
        return (shape[0] // len(entry.src), *shape[1:])
    if entry.how == "rows":
        return (entry.rows, *shape[1:])
    if entry.how == "expert":
        return entry.stacked
    return shape


def family_of(cfg: Any) -> WeightFamily:
    """The module of weight formats that cfg's ModelSpec names (models.SPECS: the one registry of families)."""
    return importlib.import_module(spec_for(cfg).weights)


def plan_hf(cfg: Any, prefix: str) -> list[Entry]:
    """Hugging Face names are ours behind prefix, the head's bare (the family's spec says which weights
    are stored transposed)."""
    transposed = family_of(cfg).HF_TRANSPOSED
    plan = []
    for ours in our_shapes(cfg):
        src = ours if ours == "lm_head.weight" else prefix + ours
        plan.append(Entry(ours, (src,), "t" if ours.endswith(transposed) else "copy"))
    return plan


def hf_prefix_in(cfg: Any, shapes: dict[str, tuple[int, ...]]) -> str:
    """The family's HF_PREFIX ("transformer.") if a Hugging Face file's names carry it, else ""."""
    hf_prefix = family_of(cfg).HF_PREFIX
    return hf_prefix if any(k.startswith(hf_prefix) for k in shapes) else ""


def hf_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names and layout (plan_hf's inverse), a tied head once."""
    family = family_of(model.cfg)
    sd: dict[str, torch.Tensor] = {}
    for k, v in ckpt.model_state(model).items():
        v = v.detach().cpu()
        if family.HF_TRANSPOSED and k.endswith(family.HF_TRANSPOSED):
            v = v.t()  # Linear (out, in) -> Conv1D (in, out)
        sd[k if k == "lm_head.weight" else family.HF_PREFIX + k] = v.contiguous()
    return sd


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor with t's values: nothing of the source file stays referenced."""
    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t)
    return out


def _convert(e: Entry, tensors: list[torch.Tensor]) -> torch.Tensor:
    how = e.how
    if how == "expert":
        return _fresh(tensors[0][e.expert, e.rows:e.rows + _expert_rows(e)])
    if how == "cat":
        return _fresh(torch.cat(tensors, dim=0))  # (3C, C) from three (C, C)
    t = tensors[0]
    if how == "rows":  # fill keeps the first rows, as many as the model's state dict holds
        return t
    if how == "t":
        t = t.t()  # Conv1D (in, out) -> Linear (out, in)
    elif how == "tf":
        t = t[0].t()  # (1, in, out) -> (out, in)
    return _fresh(t)


def _expert_rows(e: Entry) -> int:
    """Rows of one expert's matrix in a stacked source: gate_up_proj holds gate and up, each half of its rows."""
    return e.stacked[1] // 2 if e.src[0].endswith("gate_up_proj") else e.stacked[1]


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class SavedMoments:
    """The Adam(W) state a source file carries beside its weights, mapped onto our parameters as the weights are."""

    settings: dict  # the file's first param group without its params: lr, betas, eps, weight_decay, amsgrad, ...
    state: dict[str, dict[str, torch.Tensor]]  # our parameter name -> {"step", "exp_avg", "exp_avg_sq"}


def saved_moments(src: Source, shapes: dict[str, tuple[int, ...]]) -> SavedMoments | str:
    """The AdamW moments of a source whose file holds ``optimizer_state_dict`` beside ``model_state_dict`` (the
    book's model_and_optimizer.pth), or a sentence saying why there are none. The file's optimizer numbers the
    parameters in the model's order, which is its state dict's order without the tensors that are not weights
    (src.ignored); each of our parameters gets its moments made as its weight is (the book's q, k and v moments
    concatenated), cropped to `shapes` (our parameters' shapes: a shorter context keeps the first positions)."""
    saved = getattr(src.reader, "extras", {}).get("optimizer_state_dict")
    if saved is None:
        return "it holds no optimizer state"
    not_torch = "its optimizer_state_dict is not a torch optimizer's (no param_groups and state)"
    try:
        groups, state = saved["param_groups"], saved["state"]
        numbers = [i for g in groups for i in g["params"]]
        settings = {k: v for k, v in groups[0].items() if k != "params"}
    except (KeyError, TypeError, IndexError, AttributeError):
        return not_torch
    if not isinstance(state, dict) or not all(isinstance(s, dict) for s in state.values()):
        return not_torch
    names = [k for k in src.reader.shapes if k not in src.ignored]
    if sorted(numbers) != list(range(len(names))):
        return f"its optimizer holds {len(numbers)} parameters and its model {len(names)}"
    by_name = {names[i]: state.get(i, {}) for i in numbers}
    if any(not ({*ADAM_MOMENTS, "step"} <= set(s)) for s in by_name.values() if s):
        return "its optimizer state has no exp_avg / exp_avg_sq (not Adam)"
    out = {}
    for e in src.plan:
        parts = [by_name[s] for s in e.src]
        if not all(parts):  # never updated: the optimizer starts that parameter as it would
            continue
        if any(tuple(p["exp_avg"].shape) != src.reader.shapes[s] for p, s in zip(parts, e.src)):
            return f"its moments of {e.src[0]} do not have the weight's shape {src.reader.shapes[e.src[0]]}"
        moments = {k: _convert(e, [p[k] for p in parts]) for k in ADAM_MOMENTS}
        want = shapes[e.ours]
        out[e.ours] = {"step": torch.as_tensor(parts[0]["step"], dtype=torch.float32).clone(),
                       **{k: v if tuple(v.shape) == want else _fresh(v[:want[0]]) for k, v in moments.items()}}
    return SavedMoments(settings, out)


def fill(model: nn.Module, src: Source) -> None:
    """Assign the parameters of a meta-device model from a checked source, one transformer block at a time.

    The model's config is the source's, or that with a shorter context_length: tensors sized by it
    (GPT-2's position embeddings) keep their first rows, as do "rows" entries (a padded vocabulary).
    Parameters the model shares (a tied head) are shared again afterwards.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shared = shared_parameters(model)
    prefix = block_prefix(model)
    groups: dict[int, list[Entry]] = {}
    for e in src.plan:
        groups.setdefault(block_index(e.ours, prefix), []).append(e)
    for _, entries in sorted(groups.items()):
        tensors = src.reader.read(list(dict.fromkeys(s for e in entries for s in e.src)))  # a stack read once
        sd = {e.ours: _convert(e, [tensors[s] for s in e.src]) for e in entries}
        del tensors
        sd = {k: t if tuple(t.shape) == want[k] else _fresh(t[:want[k][0]]) for k, t in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)
    for name, first in shared.items():  # assigning replaced the first name's parameter, not the second's
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(first))
    assert not any(p.is_meta for p in model.parameters()), "a parameter was not loaded"
