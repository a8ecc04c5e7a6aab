"""GPT-2's weight formats: Hugging Face GPT-2 files, OpenAI's TensorFlow checkpoints, the book's state dicts.

The module-level names are this family's ``WeightFamily`` (plan.py): a Hugging Face ``GPT2Config``
-> ``GPTConfig``, Hugging Face's ``Conv1D`` weights (``(in, out)``) -> a plan of transposes, the
state dicts it recognises, and the ``config.json`` and weights that ``to_hf`` writes for
``GPT2LMHeadModel``. GPT-2's alone: OpenAI's TensorFlow checkpoint directory (``hparams.json``,
``checkpoint``, ``model.ckpt.*``, read by ``readers.TFCheckpointReader``), the book's ``GPTModel``
state dict (``tok_emb``, ``trf_blocks.N.att.W_query``, ...; its shape inferred from the tensors),
nanoGPT's ``ckpt.pt`` (``model`` in Hugging Face's names but ``nn.Linear`` layout, ``model_args``),
the GPT-2 tokenizer files of an export, and the hub's GPT-2 ids without an organisation.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..models.gpt2 import GPT, GPTConfig
from ..tokenizer import _gpt2_data_files
from .plan import Entry, Source, block_index, hf_names, hf_prefix_in, our_shapes, plan_hf
from .readers import Reader, TFCheckpointReader, TorchReader, WeightsError, positive_int, read_json

NAME = "GPT-2"
HF_MODEL_TYPES = ("gpt2",)
HF_ARCHITECTURE = "GPT2LMHeadModel"  # the transformers class an exported config.json names
HF_PREFIX = "transformer."
HF_TRANSPOSED = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # Conv1D
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "bias", "gelu", "tie_weights")
STATE_DICTS = ("the book's GPTModel (no tok_emb.weight)", "GPT-2 (no transformer.wte.weight)")
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # hub ids that are GPT-2 without an organisation
HF_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # config.json activation_function values of gelu = "tanh"
HF_GELU_EXACT = "gelu"
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # model_args keys read as whole numbers
GPT2_VOCAB = 50257
NANOGPT_PADDED_VOCAB = 50304  # nanoGPT's GPT-2 vocabulary (50,257) padded to a multiple of 64
HEAD_SIZE = 64  # every OpenAI GPT-2 size has 64-wide heads (768/12 ... 1600/25)


def describe(cfg: GPTConfig) -> str:
    """The settings that decide GPT-2's tensor shapes, for errors about tensors that do not fit them."""
    return (f"vocab_size {cfg.vocab_size}, context_length {cfg.context_length}, emb_dim {cfg.emb_dim}, "
            f"n_layers {cfg.n_layers}, qkv_bias {cfg.qkv_bias}, bias {cfg.bias}, tie_weights {cfg.tie_weights}")


# ----------------------------------------------------------------------------- Hugging Face


def config_from_hf(conf: dict, path: Path) -> GPTConfig:
    """A Hugging Face GPT2Config -> GPTConfig, refusing what gptforge's model cannot compute."""
    n_embd = positive_int(conf, "n_embd", path)
    activation = conf.get("activation_function", "gelu_new")
    unsupported = {
        "activation_function": (activation in (*HF_GELU_TANH, HF_GELU_EXACT),
                                "GELU with the tanh approximation (gelu_new) or exact (gelu)"),
        "layer_norm_epsilon": (abs(conf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-05"),
        "n_inner": (conf.get("n_inner") in (None, 4 * n_embd), f"null or {4 * n_embd} (4 x n_embd)"),
        "scale_attn_weights": (conf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (not conf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        "add_cross_attention": (not conf.get("add_cross_attention", False), "false"),
    }
    for key, (ok, wanted) in unsupported.items():
        if not ok:
            raise WeightsError(f"{path}: {key} is {conf[key]!r}; gptforge's GPT-2 supports only {wanted}")
    try:
        return GPTConfig(vocab_size=positive_int(conf, "vocab_size", path),
                         context_length=positive_int(conf, "n_positions", path), emb_dim=n_embd,
                         n_heads=positive_int(conf, "n_head", path), n_layers=positive_int(conf, "n_layer", path),
                         drop_rate=float(conf.get("resid_pdrop", 0.1)), qkv_bias=True,
                         gelu="exact" if activation == HF_GELU_EXACT else "tanh",
                         tie_weights=bool(conf.get("tie_word_embeddings", True)))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def hf_source(cfg: GPTConfig, reader: Reader, meta: dict) -> Source:
    """GPT-2 weights as transformers stores them (``transformer.`` prefix or none, ``Conv1D`` weights)."""
    prefix = hf_prefix_in(cfg, reader.shapes)
    saved = getattr(reader, "metadata", {}).get("gptforge_model")
    if saved:  # written by to_hf: restore what GPT2Config cannot say (no q/k/v or other biases, drop rate)
        try:
            mine = GPTConfig.from_dict(json.loads(saved))
        except ValueError as e:
            raise WeightsError(f"{reader.where}: bad gptforge_model metadata ({e})") from None
        if all(getattr(mine, k) == getattr(cfg, k) for k in SHAPE_KEYS if k not in BIAS_SETTINGS):
            cfg = replace(cfg, qkv_bias=mine.qkv_bias, bias=mine.bias, drop_rate=mine.drop_rate)
    for setting in BIAS_SETTINGS:  # to_hf stores zeros there; a model trained since then has grown a bias
        if not getattr(cfg, setting):
            present = [k for k in _zero_biases(cfg, setting, prefix) if k in reader.shapes]
            if any(bool(t.any()) for t in reader.read(present).values()):
                cfg = replace(cfg, **{setting: True})
    plan = plan_hf(cfg, prefix)
    ignored = {k for k in reader.shapes if k.endswith((".attn.bias", ".attn.masked_bias"))}
    for setting in BIAS_SETTINGS:
        if not getattr(cfg, setting):
            ignored |= set(_zero_biases(cfg, setting, prefix))
    if cfg.tie_weights:
        ignored.add("lm_head.weight")
    return Source("hf", cfg, reader, plan, ignored, {**meta, "tokenizer": "gpt2"})


BIAS_SETTINGS = ("qkv_bias", "bias")  # GPT2LMHeadModel has every bias; these settings drop some


def _zero_biases(cfg: GPTConfig, setting: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The biases (Hugging Face names behind prefix, and shapes) a model of cfg lacks because `setting` is off."""
    full = our_shapes(replace(cfg, **{setting: True}))
    return {prefix + k: shape for k, shape in full.items() if k not in our_shapes(cfg)}


def is_hf_state_dict(shapes: dict[str, tuple[int, ...]]) -> bool:
    """GPT2LMHeadModel's names (transformer.wte.weight) or GPT2Model's (wte.weight)."""
    return any(k.endswith("wte.weight") for k in shapes)


def hf_config(cfg: GPTConfig) -> dict:
    """The config.json of a transformers GPT2LMHeadModel with this shape."""
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPES[0], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": None, "activation_function": HF_GELU_EXACT if cfg.gelu == "exact" else HF_GELU_TANH[0],
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 50256, "eos_token_id": 50256, "dtype": "float32",
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights: an untied head is kept; a model without q/k/v biases (qkv_bias) or without the
    others (bias, nanoGPT's bias=False) gets zero biases, which compute exactly what no bias does (GPT-2 always has
    them; the gptforge config in the file's metadata brings the settings back on import)."""
    cfg = model.cfg
    sd = hf_names(model)
    for setting in BIAS_SETTINGS:
        if not getattr(cfg, setting):
            zeros = _zero_biases(cfg, setting, HF_PREFIX)
            sd.update({k: torch.zeros(shape) for k, shape in zeros.items()})
    return sd


def write_tokenizer(out: Path, context_length: int) -> None:
    """The GPT-2 tokenizer as transformers' GPT2Tokenizer reads it, into an exported model's directory."""
    vocab_bpe, encoder_json = _gpt2_data_files()
    shutil.copyfile(encoder_json, out / "vocab.json")  # the same files under Hugging Face's names
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    eot = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "bos_token": eot,
        "eos_token": eot, "unk_token": eot, "add_prefix_space": False,
    }, indent=2) + "\n")


# ----------------------------------------------------------------------------- OpenAI's TensorFlow checkpoints


def plan_tf(cfg: GPTConfig) -> list[Entry]:
    names = {"weight": "g", "bias": "b"}
    plan = []
    for ours in our_shapes(cfg):
        parts = ours.split(".")
        if parts[0] in ("wte", "wpe"):
            plan.append(Entry(ours, (f"model/{parts[0]}",)))
        elif parts[0] == "ln_f":
            plan.append(Entry(ours, (f"model/ln_f/{names[parts[1]]}",)))
        elif parts[2] in ("ln_1", "ln_2"):
            plan.append(Entry(ours, (f"model/h{parts[1]}/{parts[2]}/{names[parts[3]]}",)))
        else:  # h.i.attn.c_attn.weight -> model/hi/attn/c_attn/w
            kind = "w" if parts[4] == "weight" else "b"
            name = f"model/h{parts[1]}/{parts[2]}/{parts[3]}/{kind}"
            plan.append(Entry(ours, (name,), "tf" if kind == "w" else "copy"))
    return plan


def tf_source(d: Path) -> Source:
    """OpenAI's TensorFlow checkpoint directory: hparams.json and model.ckpt.* (or the prefix `checkpoint` names)."""
    hparams_path = d / "hparams.json"
    if not hparams_path.is_file():
        raise WeightsError(f"{d}: a TensorFlow GPT-2 checkpoint needs hparams.json (n_vocab, n_ctx, n_embd, "
                           "n_head, n_layer), and there is none")
    hp = read_json(hparams_path)
    try:
        n = {k: positive_int(hp, k, hparams_path) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
        cfg = GPTConfig(vocab_size=n["n_vocab"], context_length=n["n_ctx"], emb_dim=n["n_embd"], n_heads=n["n_head"],
                        n_layers=n["n_layer"], qkv_bias=True, tie_weights=True)
    except ValueError as e:
        raise WeightsError(f"{hparams_path}: {e}") from None
    prefix = d / "model.ckpt"
    state = d / "checkpoint"
    if state.is_file():  # model_checkpoint_path: "model.ckpt"; only the name counts (the directory may have moved)
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(), re.MULTILINE)
        if m:
            prefix = d / Path(m.group(1)).name
    else:
        indexes = sorted(d.glob("*.index"))
        if len(indexes) == 1:
            prefix = indexes[0].with_suffix("")
    if not prefix.with_name(prefix.name + ".index").is_file():
        raise WeightsError(f"{d}: no {prefix.name}.index; the TensorFlow checkpoint is incomplete")
    reader = TFCheckpointReader(prefix)
    return Source("tf", cfg, reader, plan_tf(cfg), set(), {"format": "tf", "source": str(d), "tokenizer": "gpt2"})


# ----------------------------------------------------------------------------- the book's GPTModel


BOOK_NAMES = {
    "wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.scale",
    "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight",
}
BOOK_BLOCK_NAMES = {
    "ln_1.weight": "norm1.scale", "ln_1.bias": "norm1.shift", "ln_2.weight": "norm2.scale", "ln_2.bias": "norm2.shift",
    "attn.c_proj.weight": "att.out_proj.weight", "attn.c_proj.bias": "att.out_proj.bias",
    "mlp.c_fc.weight": "ff.layers.0.weight", "mlp.c_fc.bias": "ff.layers.0.bias",
    "mlp.c_proj.weight": "ff.layers.2.weight", "mlp.c_proj.bias": "ff.layers.2.bias",
}


def plan_book(cfg: GPTConfig) -> list[Entry]:
    plan = []
    for ours in our_shapes(cfg):
        i = block_index(ours, "h.")
        if i < 0:
            plan.append(Entry(ours, (BOOK_NAMES[ours],)))
            continue
        rest = ours.split(".", 2)[2]
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            qkv = tuple(f"trf_blocks.{i}.att.W_{p}.{kind}" for p in ("query", "key", "value"))
            plan.append(Entry(ours, qkv, "cat"))
        else:
            plan.append(Entry(ours, (f"trf_blocks.{i}.{BOOK_BLOCK_NAMES[rest]}",)))
    return plan


def open_state_dict(path: Path, reader: TorchReader, n_heads: int | None) -> Source | None:
    """nanoGPT's ckpt.pt, or the book's GPTModel state dict (n_heads given or from GPT-2's head size); None for any
    other."""
    shapes = reader.shapes
    if "model_args" in reader.extras:
        return nanogpt_source(path, reader, n_heads)
    if "tok_emb.weight" not in shapes:
        return None
    vocab, emb = shapes["tok_emb.weight"]
    if "pos_emb.weight" not in shapes:
        raise WeightsError(f"{path}: tensor 'pos_emb.weight' is missing: a partial GPTModel state dict")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    if n_heads is None:
        if emb % HEAD_SIZE:
            raise WeightsError(f"{path}: the number of attention heads is not stored in a state dict, and "
                               f"emb_dim {emb} is not a multiple of GPT-2's head size {HEAD_SIZE}; give n_heads "
                               "(gptforge convert ... --n-heads N)")
        n_heads = emb // HEAD_SIZE
    try:
        cfg = GPTConfig(vocab_size=vocab, context_length=shapes["pos_emb.weight"][0], emb_dim=emb, n_heads=n_heads,
                        n_layers=max(blocks, default=-1) + 1, qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
                        tie_weights=False)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    ignored = {k for k in shapes if k.endswith(".att.mask")}
    meta = {"format": "book", "source": str(path), "tokenizer": "gpt2", "n_heads": str(n_heads)}
    return Source("book", cfg, reader, plan_book(cfg), ignored, meta)


# ----------------------------------------------------------------------------- nanoGPT's ckpt.pt


def _nanogpt_args(path: Path, args: object) -> dict:
    """model_args of a nanoGPT checkpoint, checked: whole numbers, bias a boolean, dropout a number."""
    if not isinstance(args, dict):
        raise WeightsError(f"{path}: model_args is {type(args).__name__}, expected nanoGPT's dict (n_layer, n_head, "
                           "n_embd, block_size, bias, vocab_size, dropout)")
    for key in NANOGPT_ARGS:
        if not isinstance(args.get(key), int) or isinstance(args[key], bool) or args[key] < 1:
            raise WeightsError(f"{path}: model_args[{key!r}] is {args.get(key)!r}; a nanoGPT checkpoint has a positive "
                               "whole number there")
    if not isinstance(args.get("bias", True), bool):
        raise WeightsError(f"{path}: model_args['bias'] is {args['bias']!r}, expected true or false")
    dropout = args.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
        raise WeightsError(f"{path}: model_args['dropout'] is {dropout!r}, expected a number")
    return args


def nanogpt_source(path: Path, reader: TorchReader, n_heads: int | None) -> Source:
    """nanoGPT's checkpoint: {"model", "model_args", "optimizer", "iter_num", "config", ...} as its train.py saves it.

    Its model is GPT-2's (names behind ``transformer.``, ``_orig_mod.`` already dropped by the reader) in
    ``nn.Linear`` layout, with exact GELU, and with ``bias=False`` no biases in Linear layers or LayerNorms.
    Its default vocabulary is GPT-2's 50,257 ids padded to 50,304 rows: read as a 50,257-id model with
    ``pad_vocab`` (padded to the same 50,304 rows), whose padding rows are zeros that no logit, loss or sample
    sees; the first 50,257 logits are nanoGPT's. The tokenizer is GPT-2's for those vocabularies; any other size
    (a character-level meta.pkl) needs --tokenizer.
    """
    args = _nanogpt_args(path, reader.extras["model_args"])
    if n_heads is not None and n_heads != args["n_head"]:
        raise WeightsError(f"{path}: --n-heads {n_heads}, but the nanoGPT checkpoint's model_args say n_head "
                           f"{args['n_head']}; drop --n-heads")
    shapes = reader.shapes
    if "transformer.wte.weight" not in shapes:
        raise WeightsError(f"{path}: tensor 'transformer.wte.weight' is missing: not a nanoGPT model state dict")
    padded = args["vocab_size"] == NANOGPT_PADDED_VOCAB
    tied = "lm_head.weight" not in shapes or torch.equal(
        *reader.read(["lm_head.weight", "transformer.wte.weight"]).values())
    try:
        cfg = GPTConfig(vocab_size=GPT2_VOCAB if padded else args["vocab_size"], context_length=args["block_size"],
                        emb_dim=args["n_embd"], n_heads=args["n_head"], n_layers=args["n_layer"],
                        drop_rate=float(args.get("dropout", 0.0)), qkv_bias=args.get("bias", True),
                        bias=args.get("bias", True), gelu="exact", tie_weights=tied, pad_vocab=padded)
    except ValueError as e:
        raise WeightsError(f"{path}: model_args: {e}") from None
    plan = []
    for ours in our_shapes(cfg):
        src = ours if ours == "lm_head.weight" else "transformer." + ours
        if padded and ours in ("wte.weight", "lm_head.weight"):
            plan.append(Entry(ours, (src,), "rows", rows=NANOGPT_PADDED_VOCAB))
        else:
            plan.append(Entry(ours, (src,)))
    ignored = {k for k in shapes if k.endswith(".attn.bias") and k not in {e.src[0] for e in plan}}  # causal masks
    if tied:
        ignored.add("lm_head.weight")
    meta = {"format": "nanogpt", "source": str(path)}
    if cfg.vocab_size == GPT2_VOCAB:
        meta["tokenizer"] = "gpt2"
    return Source("nanogpt", cfg, reader, plan, ignored, meta)


# ----------------------------------------------------------------------------- GGUF out (llama.cpp's gpt2)


GGUF_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # block i: h.i.X -> blk.i.Y, as convert_hf_to_gguf.py


def gguf_arch(cfg: GPTConfig) -> str:
    """llama.cpp's architecture for the model, or a WeightsError for what its gpt2 cannot compute."""
    if cfg.gelu != "tanh":
        raise WeightsError("llama.cpp's gpt2 computes GELU with the tanh approximation, and this model uses the exact "
                           "one (gelu = \"exact\", nanoGPT's nn.GELU); its logits would differ there: convert it --to "
                           "hf or --to gptforge instead")
    return "gpt2"


def gguf_params(writer, cfg: GPTConfig) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(1e-5)


def gguf_tensors(model: GPT):
    """(llama.cpp name, tensor) in nn.Linear layout (the converter transposes GPT-2's Conv1D to it); zeros for the
    biases a model without them lacks (llama.cpp's gpt2 reads every bias); the head written even when tied, as the
    converter writes it."""
    cfg = model.cfg
    sd = {k: v for k, v in model.state_dict().items()}  # vocab_size rows (padding cut off)
    for setting in BIAS_SETTINGS:
        if not getattr(cfg, setting):
            sd.update({k: torch.zeros(shape) for k, shape in _zero_biases(cfg, setting).items()})
    yield "token_embd.weight", sd["wte.weight"]
    yield "position_embd.weight", sd["wpe.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                yield f"blk.{i}.{theirs}.{kind}", sd[f"h.{i}.{ours}.{kind}"]
    yield "output_norm.weight", sd["ln_f.weight"]
    yield "output_norm.bias", sd["ln_f.bias"]
    yield "output.weight", sd["wte.weight" if cfg.tie_weights else "lm_head.weight"]
