"""GGUF out: a model and its tokenizer as one file that llama.cpp (and Ollama) run, written with the `gguf` package.

The layout follows llama.cpp's own ``convert_hf_to_gguf.py``: the family says the architecture,
its metadata and the tensors under llama.cpp's names (weights/gpt2.py, weights/llama.py:
``gguf_arch``, ``gguf_params``, ``gguf_tensors``); here the shared parts: the tokenizer
(``tokenizer.ggml.model`` "gpt2", i.e. byte-level BPE, with its tokens, token types, merges, and
end-of-text / padding ids; ids past the tokenizer's vocabulary are ``[PAD{i}]`` tokens, as the
converter writes them), the dtype (2-D weights in f32, f16 or bf16; norms and biases always f32,
as the converter keeps them) and the file, written under a temporary name and renamed.

Tokenizers llama.cpp reads this way: GPT-2's, and Hugging Face byte-level BPE tokenizers with
GPT-2's pre-tokenizer (``ByteLevel`` with ``use_regex``; gptforge's ``tokenizer train`` and
minimind's), written with ``tokenizer.ggml.pre`` "gpt-2". Anything else is refused by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..tokenizer import GPT2Tokenizer, HFTokenizer, Tokenizer, _gpt2_data_files
from .readers import WeightsError

DTYPES = ("f32", "f16", "bf16")
SUFFIX = ".gguf"
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama.cpp's LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_BF16
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex


def _gguf():
    try:
        import gguf
    except ImportError:
        raise WeightsError("writing GGUF needs the gguf package (the ggml project's): pip install 'gptforge[gguf]'"
                           ) from None
    return gguf


def check_target(out: str | Path) -> Path:
    """OUT of `convert --to gguf`: a new file named *.gguf in a writable directory, checked before the model is read."""
    out = Path(out)
    if out.suffix != SUFFIX:
        raise WeightsError(f"OUT {out}: --to gguf writes one file; name it *.gguf")
    if out.exists():
        raise WeightsError(f"OUT {out}: already exists; remove it or choose another OUT")
    ckpt.check_writable(out.parent, "OUT")
    return out


# ----------------------------------------------------------------------------- the tokenizer


def _gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """GPT-2's tokens (encoder.json by id), token types and merges (vocab.bpe), the files tiktoken is built from."""
    vocab_bpe, encoder_json = _gpt2_data_files()
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    types = [CONTROL if t == "<|endoftext|>" else NORMAL for t in tokens]
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line.strip()]  # the first line is "#version: 0.2"
    return tokens, types, merges


def _hf_vocab(tok: HFTokenizer) -> tuple[list[str], list[int], list[str]]:
    """A Hugging Face byte-level BPE's tokens, types (added special tokens CONTROL, other added USER_DEFINED) and
    merges; a WeightsError for a tokenizer llama.cpp would split differently."""
    spec = json.loads(tok.json)
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    gpt2_pre = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if model.get("type") != "BPE" or not gpt2_pre or norm is not None:
        what = (f"model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}"
                + (f" (use_regex {pre.get('use_regex')}, add_prefix_space {pre.get('add_prefix_space')})"
                   if pre.get("type") == "ByteLevel" else "") + f", normalizer {(norm or {}).get('type')!r}")
        raise WeightsError(f"tokenizer {tok.source}: {what}; GGUF export supports byte-level BPE tokenizers with "
                           "GPT-2's pre-tokenizer (model BPE, pre_tokenizer ByteLevel with use_regex and no prefix "
                           "space, no normalizer), as `gptforge tokenizer train` and minimind make them")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [special.get(i, NORMAL if i in by_id else UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer's tokens, types, merges and special ids, padded with [PAD{i}] to the model's vocab_size."""
    if isinstance(tokenizer, GPT2Tokenizer):
        tokens, types, merges = _gpt2_vocab()
    elif isinstance(tokenizer, HFTokenizer):
        tokens, types, merges = _hf_vocab(tokenizer)
    else:
        raise WeightsError(f"tokenizer {tokenizer.name}: GGUF export knows GPT-2's and Hugging Face tokenizers")
    if len(tokens) > vocab_size:
        raise WeightsError(f"tokenizer {tokenizer.name} has {len(tokens)} tokens, the model {vocab_size} ids; export "
                           "a model with the tokenizer it was trained with (--tokenizer)")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eot_id)
    bos = getattr(tokenizer, "bos_id", None)
    if isinstance(tokenizer, GPT2Tokenizer):
        bos = tokenizer.eot_id  # GPT-2's tokenizer config: bos = eos = unk = <|endoftext|>
    if bos is not None:
        writer.add_bos_token_id(bos)
    if getattr(tokenizer, "pad_id", None) is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # gptforge's models were trained without one
    writer.add_add_eos_token(False)


# ----------------------------------------------------------------------------- tensors and the file


def _array(gguf, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    """(data, raw dtype or None) of one tensor as the converter stores it: 1-D in f32, 2-D in `dtype`."""
    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim < 2 or dtype == "f32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(a, qtype), qtype


def write(path: Path, model: nn.Module, tokenizer: Tokenizer, dtype: str, family, name: str) -> Path:
    """The model (of a family with gguf_arch / gguf_params / gguf_tensors) and tokenizer as a GGUF file at path."""
    if dtype not in DTYPES:
        raise WeightsError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    gguf = _gguf()
    cfg = model.cfg
    arch = family.gguf_arch(cfg)  # refuses what llama.cpp cannot run, before anything is written
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        family.gguf_params(writer, cfg)
        writer.add_file_type(FILE_TYPES[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
        tensors: Iterable[tuple[str, torch.Tensor]] = family.gguf_tensors(model)
        for tensor_name, t in tensors:
            data, raw = _array(gguf, t, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
