"""Models out: Hugging Face directories (config.json, model.safetensors, the tokenizer's files), gptforge weights,
GGUF; and `gptforge convert`, which checks OUT, the dtype and the tokenizer before it reads the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import checkpoint as ckpt
from ..config import check_fields, opt
from ..models import build
from ..tokenizer import (
    TOKENIZER_CONFIG,
    HFTokenizer,
    Tokenizer,
    tokenizer_from_metadata,
)
from . import gguf_out, gpt2
from .load import _family, build_model, check_source, open_source, text_tokenizer
from .readers import (
    WeightsError,
)

TARGETS = ("hf", "gptforge", "gguf")  # what `convert --to` writes


def hf_config(cfg: Any) -> dict:
    """The config.json of the transformers model (GPT2LMHeadModel for GPT-2) with this config."""
    return _family(cfg).hf_config(cfg)


def convert_target(out: str | Path, target: str) -> Path:
    """What `convert --to TARGET OUT` writes, checked before any model is read; refused unless nothing is overwritten.

    OUT must be a new or empty directory, so no file of the user's (nor a model converted there
    earlier) is replaced; for gptforge, OUT may instead be a new .safetensors file. Returns the
    directory (hf) or the weights file (gptforge); for gguf, OUT is a new *.gguf file.
    """
    out = Path(out)
    if target == "gguf":
        return gguf_out.check_target(out)
    if target == "gptforge" and out.suffix == ".safetensors":
        if out.exists():
            raise WeightsError(f"OUT {out}: already exists; remove it or choose another OUT")
        ckpt.check_writable(out.parent, "OUT")
        return out
    ckpt.check_writable(out, "OUT")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        raise WeightsError(f"OUT {out}: not empty (holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                           "convert writes only into a new or empty directory, so that nothing is overwritten: "
                           "choose another OUT or empty this one")
    return out if target == "hf" else out / ckpt.WEIGHTS


def to_hf(model: nn.Module, out_dir: str | Path, tokenizer: Tokenizer | str = "gpt2") -> Path:
    """Write config.json + model.safetensors that the family's transformers class loads with from_pretrained
    (GPT2LMHeadModel; the family's hf_config and hf_state_dict say how).

    The safetensors metadata carries the gptforge config, which brings back on import what the
    Hugging Face config cannot say. The tokenizer's files are written too: GPT-2's vocab.json and
    merges.txt, or a Hugging Face tokenizer's tokenizer.json and a tokenizer_config.json with its eos
    (and pad) token, whose ids config.json then gives.
    """
    out = convert_target(out_dir, "hf")
    cfg = model.cfg
    family = _family(cfg)
    sd = family.hf_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    name = tokenizer if isinstance(tokenizer, str) else tokenizer.name
    meta = {"format": "pt", "gptforge_model": json.dumps(cfg.to_dict()), "gptforge_tokenizer": name}
    save_file(sd, str(out / "model.safetensors"), metadata=meta)
    ckpt.follow_umask(out / "model.safetensors")
    conf = family.hf_config(cfg)
    if isinstance(tokenizer, HFTokenizer):
        conf["eos_token_id"] = tokenizer.eot_id
        if tokenizer.pad_id is not None:
            conf["pad_token_id"] = tokenizer.pad_id
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    if name == "gpt2":  # the tokenizer's files, whatever the model family
        gpt2.write_tokenizer(out, cfg.context_length)
    elif isinstance(tokenizer, HFTokenizer):
        (out / "tokenizer.json").write_text(tokenizer.json, encoding="utf-8")
        conf = {**tokenizer.config(), "model_max_length": cfg.context_length}
        (out / TOKENIZER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return out


def to_gptforge(model: nn.Module, out: str | Path, tokenizer="gpt2", source: str | None = None) -> Path:
    """Write a gptforge weights file: OUT itself if it ends in .safetensors, else OUT/model.safetensors."""
    path = convert_target(out, "gptforge")
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(path, model, tokenizer, extra={"converted_from": source} if source else None)
    return path


def to_gguf(model: nn.Module, out: str | Path, tokenizer: Tokenizer, dtype: str = "f32",
            name: str = "gptforge") -> Path:
    """Write OUT.gguf for llama.cpp / Ollama: the family's architecture, metadata and tensors as llama.cpp's converter
    lays them out, and the tokenizer (weights/gguf_out.py)."""
    path = convert_target(out, "gguf")
    return gguf_out.write(path, model, tokenizer, dtype, _family(model.cfg), name)


@dataclass
class ConvertConfig:
    """`gptforge convert`'s settings (SOURCE and OUT are its arguments)."""

    to: str | None = opt(None, "hf: a directory transformers.AutoModelForCausalLM.from_pretrained loads "
                               "(GPT2LMHeadModel; for the llama family Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM "
                               "with a q/k/v bias, else LlamaForCausalLM); gptforge: a checkpoint directory (or a "
                               ".safetensors file) that eval, generate and --init-from take; gguf: one OUT.gguf file "
                               "for llama.cpp and Ollama (architecture gpt2, llama, qwen2 or qwen3, the tokenizer "
                               "inside).", choices=TARGETS, required=True)
    n_heads: int | None = opt(None, "Attention heads of a state dict that does not show them: the book's model.pth "
                                    "[default: emb_dim / 64, as in GPT-2], or a Llama/minimind .pth without q_norm "
                                    "(MiniMind2's have 8).", low=1)
    tokenizer: str | None = opt(None, "Tokenizer to write with the model (a Hugging Face tokenizer.json, its "
                                      "directory, or gpt2): for a SOURCE that carries none, or to override its own. "
                                      "--to gptforge stores it in the checkpoint, --to hf writes its tokenizer.json "
                                      "and tokenizer_config.json.  [default: the model's]", metavar="FILE")
    dtype: str = opt("f32", "--to gguf: the type of the weight matrices (norms and biases stay f32, as llama.cpp's "
                            "converter keeps them).", choices=("f32", "f16", "bf16"))

    def __post_init__(self) -> None:
        check_fields(self)


def convert(source: str | Path, target: str, out: str | Path, n_heads: int | None = None,
            tokenizer: str | None = None, dtype: str = "f32") -> tuple[Path, nn.Module, dict]:
    """`gptforge convert`: the model in source written to out as `target` (hf, gptforge or gguf), out checked before
    the model is read, with its tokenizer, or `tokenizer` (--tokenizer) when given: a gptforge checkpoint carries
    the whole tokenizer, an hf directory gets its files, a GGUF file holds it (in `dtype`: f32, f16, bf16).
    Returns (path written, model, metadata)."""
    convert_target(out, target)
    if target == "gguf" and dtype not in gguf_out.DTYPES:
        raise WeightsError(f"--dtype {dtype}: GGUF export writes {', '.join(gguf_out.DTYPES)}")
    if target != "gguf" and dtype != "f32":
        raise WeightsError(f"--dtype {dtype}: only --to gguf writes another precision; --to {target} writes the "
                           "model's float32 weights (leave --dtype out)")
    src = open_source(source, n_heads=n_heads)
    if n_heads is not None and getattr(src.cfg, "n_heads", n_heads) != n_heads:
        raise WeightsError(f"--n-heads {n_heads}: {source} records its heads ({src.cfg.n_heads}); --n-heads is for "
                           "sources that do not (the book's model.pth): leave it out")
    check_source(src)  # a partial file first, then the tokenizer: both before the weights are read
    meta = src.meta
    tok = tokenizer_from_metadata(meta) if tokenizer is None and "tokenizer" in meta else text_tokenizer(
        src.cfg, meta, source, tokenizer)
    if target == "gguf":
        _family(src.cfg).gguf_arch(src.cfg)  # what llama.cpp cannot run, refused before the weights are read
    with torch.device("meta"):
        n = sum(p.numel() for p in build(src.cfg).parameters())
    width = 2 if target == "gguf" and dtype != "f32" else 4
    ckpt.check_free_space(Path(out), n * width, f"the model ({n:,} parameters x {width} bytes)")
    model = build_model(src)
    with ckpt.cleaned_on_failure(Path(out), "convert"):
        if target == "gguf":
            return to_gguf(model, out, tok, dtype, name=Path(str(source)).name), model, meta
        if target == "hf":
            return to_hf(model, out, tok), model, meta
        return to_gptforge(model, out, tok, source=str(source)), model, meta
