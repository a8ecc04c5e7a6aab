"""The llama family's weight formats: Hugging Face Llama, Qwen2 and Qwen3 files, and minimind's ``.pth`` state dicts.

The module-level names are this family's ``WeightFamily`` (plan.py). Hugging Face's
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` name their tensors as gptforge's
``Llama`` does, behind ``model.`` (the head bare), in the ``(out, in)`` layout: a plan of copies. A
config.json -> ``LlamaConfig``, refusing what the model cannot compute (another activation, scaled
rotary embeddings, sliding windows, experts, MLP or output-projection biases). Export writes
``Qwen3ForCausalLM`` when QK-norm is on, else ``Qwen2ForCausalLM`` with a q/k/v bias, else
``LlamaForCausalLM``.

minimind (jingyaogong/minimind) saves ``{k: v.half()}`` of its model's state dict in these same
names (``model.embed_tokens.weight``, ..., and ``lm_head.weight`` again although tied), bare or
under ``"model"`` in its resume files. Such a state dict (or any in these names, with or without
``model.``) is read without a config: its shape comes from the tensors (QK-norm from ``q_norm``,
the head width from its length; without it the head count must be given), and what no tensor says
from minimind's defaults (``MINIMIND_DEFAULTS``).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..models.llama import LlamaConfig
from .plan import Entry, Source, hf_names, hf_prefix_in, plan_hf
from .readers import Reader, TorchReader, WeightsError, positive_int, read_json

NAME = "Llama/Qwen"
HF_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
HF_PREFIX = "model."
HF_TRANSPOSED = ()  # Hugging Face stores Linear weights as we do, (out, in)
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_kv_heads", "head_dim", "n_layers", "intermediate_size",
              "norm_eps", "rope_theta", "qk_norm", "qkv_bias", "tie_weights", "n_experts", "experts_per_token",
              "moe_intermediate_size", "norm_topk_prob")
STATE_DICTS = ("Llama/Qwen/minimind (no model.embed_tokens.weight)",)
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM"}
# transformers' defaults for keys a config.json may leave out
HF_DEFAULTS = {"llama": {"max_position_embeddings": 2048, "head_dim": None},
               "qwen2": {"max_position_embeddings": 32768, "head_dim": None},
               "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
               "qwen3_moe": {"max_position_embeddings": 32768, "head_dim": None, "num_experts": 128,
                             "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
                             "router_aux_loss_coef": 0.001}}
# config.json keys of mixture-of-experts variants gptforge's router and experts do not compute (shared experts,
# routers other than softmax top-k, expert biases), each with the value that means "not used"
MOE_REFUSED = {"shared_expert_intermediate_size": 0, "n_shared_experts": 0, "num_shared_experts": 0,
               "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
               "routed_scaling_factor": 1.0, "decoder_sparse_step": 1, "mlp_only_layers": [], "mlp_bias": False,
               "moe_bias": False, "router_bias": False}
# What a minimind .pth does not store: its model code's rope_theta, and rms_norm_eps of minimind-3
# (QK-norm, 1e-6) or MiniMind2 (no QK-norm, 1e-5); a length to train at (rotary: it limits nothing).
MINIMIND_DEFAULTS = {"rope_theta": 1e6, "norm_eps_qk_norm": 1e-6, "norm_eps": 1e-5, "context_length": 512}
SKIPPED = ("rotary_emb.inv_freq",)  # buffers older transformers saved in pytorch_model.bin


def describe(cfg: LlamaConfig) -> str:
    """The settings that decide the family's tensor shapes, for errors about tensors that do not fit them."""
    experts = (f"n_experts {cfg.n_experts}, moe_intermediate_size {cfg.moe_intermediate_size}, "
               if cfg.n_experts else "")
    return (f"vocab_size {cfg.vocab_size}, emb_dim {cfg.emb_dim}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, "
            f"n_kv_heads {cfg.n_kv_heads}, head_dim {cfg.head_dim}, intermediate_size {cfg.intermediate_size}, "
            f"{experts}qk_norm {cfg.qk_norm}, qkv_bias {cfg.qkv_bias}, tie_weights {cfg.tie_weights}")


# ----------------------------------------------------------------------------- Hugging Face in


def _rope_theta(conf: dict, path: Path) -> float:
    """rope_theta as transformers 5 reads it: from rope_parameters (or rope_scaling) if set, else the top-level key;
    refused for any rope type but the default."""
    theta = conf.get("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):  # the last one set wins, as in transformers 5
        rope = conf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise WeightsError(f"{path}: {key} is {rope!r}; expected an object (rope_type, rope_theta) or null")
        for type_key in ("rope_type", "type"):
            if rope.get(type_key, "default") not in ("default", None):
                raise WeightsError(f"{path}: {key}.{type_key} is {rope[type_key]!r}; gptforge's llama family "
                                   "computes only default rotary embeddings (no scaling)")
        theta = rope.get("rope_theta", theta)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise WeightsError(f"{path}: rope_theta must be a number, found {theta!r}")
    return float(theta)


def _refuse_unsupported(conf: dict, path: Path, model_type: str) -> None:
    """One line naming the key and value of anything in conf that gptforge's Llama cannot compute."""
    if conf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise WeightsError(f"{path}: hidden_act is {conf['hidden_act']!r}; gptforge's llama family computes only "
                           "silu (SwiGLU)")
    if conf.get("use_sliding_window"):
        raise WeightsError(f"{path}: use_sliding_window is true; gptforge attends over the whole context "
                           "(no sliding windows)")
    other = sorted({t for t in conf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise WeightsError(f"{path}: layer_types holds {other[0]!r}; gptforge attends over the whole context "
                           "(full_attention in every layer)")
    if model_type == "qwen3_moe":
        for key, none in MOE_REFUSED.items():
            if conf.get(key, none) not in (none, None):
                raise WeightsError(f"{path}: {key} is {conf[key]!r}; gptforge's mixture of experts is a softmax "
                                   "top-k router over SwiGLU experts in every layer (no shared experts, other "
                                   "routers, expert biases or dense layers between)")
        if conf.get("num_experts") and conf.get("num_local_experts") not in (None, conf["num_experts"]):
            raise WeightsError(f"{path}: num_experts {conf['num_experts']} and num_local_experts "
                               f"{conf['num_local_experts']} differ")
    else:
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if conf.get(key):
                raise WeightsError(f"{path}: {key} is {conf[key]!r}, but model_type {model_type!r} has dense MLPs "
                                   "(a mixture of experts loads as qwen3_moe)")
    if conf.get("mlp_bias"):
        raise WeightsError(f"{path}: mlp_bias is true; gptforge's llama family has no MLP biases")
    if model_type != "qwen2" and conf.get("attention_bias"):
        raise WeightsError(f"{path}: attention_bias is true, which puts a bias on o_proj too; gptforge's llama "
                           "family has a bias on q/k/v only (as Qwen2 has)")


def config_from_hf(conf: dict, path: Path) -> LlamaConfig:
    """A Hugging Face Llama/Qwen2/Qwen3 config.json -> LlamaConfig, refusing what gptforge's model cannot compute."""
    model_type = conf["model_type"]
    _refuse_unsupported(conf, path, model_type)
    defaults = HF_DEFAULTS[model_type]
    hidden, heads = positive_int(conf, "hidden_size", path), positive_int(conf, "num_attention_heads", path)
    kv_heads = positive_int(conf, "num_key_value_heads", path) if conf.get("num_key_value_heads") else heads
    head_dim = positive_int(conf, "head_dim", path) if conf.get("head_dim") else defaults["head_dim"]
    ctx = (positive_int(conf, "max_position_embeddings", path) if "max_position_embeddings" in conf
           else defaults["max_position_embeddings"])
    try:
        return LlamaConfig(
            vocab_size=positive_int(conf, "vocab_size", path), context_length=ctx, emb_dim=hidden, n_heads=heads,
            n_kv_heads=kv_heads, head_dim=head_dim or hidden // heads,
            n_layers=positive_int(conf, "num_hidden_layers", path),
            intermediate_size=positive_int(conf, "intermediate_size", path),
            norm_eps=float(conf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(conf, path),
            qk_norm=model_type in ("qwen3", "qwen3_moe"), qkv_bias=model_type == "qwen2",
            tie_weights=bool(conf.get("tie_word_embeddings", False)), drop_rate=0.0,
            **(_experts_from_hf(conf, path) if model_type == "qwen3_moe" else {}))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def _experts_from_hf(conf: dict, path: Path) -> dict:
    """The mixture-of-experts settings of a qwen3_moe config.json (num_experts, or transformers 5's
    num_local_experts), transformers' defaults where it says nothing."""
    d = {**HF_DEFAULTS["qwen3_moe"], **{k: v for k, v in conf.items() if v is not None}}
    experts = "num_local_experts" if "num_local_experts" in conf and "num_experts" not in conf else "num_experts"
    coef = d["router_aux_loss_coef"]
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not isinstance(d["norm_topk_prob"], bool):
        raise WeightsError(f"{path}: router_aux_loss_coef must be a number and norm_topk_prob true or false")
    return dict(n_experts=positive_int(d, experts, path),
                experts_per_token=positive_int(d, "num_experts_per_tok", path),
                moe_intermediate_size=positive_int(d, "moe_intermediate_size", path),
                norm_topk_prob=d["norm_topk_prob"], router_aux_loss_coef=float(coef))


def _saved_config(cfg: LlamaConfig, reader: Reader) -> LlamaConfig:
    """cfg with what config.json cannot say (drop_rate, pad_vocab) from the gptforge config to_hf stored, if it fits."""
    saved = getattr(reader, "metadata", {}).get("gptforge_model")
    if not saved:
        return cfg
    try:
        mine = LlamaConfig.from_dict(json.loads(saved))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{reader.where}: bad gptforge_model metadata ({e})") from None
    same = all(getattr(mine, f.name) == getattr(cfg, f.name) for f in fields(LlamaConfig)
               if f.name not in ("drop_rate", "pad_vocab"))
    return replace(cfg, drop_rate=mine.drop_rate, pad_vocab=mine.pad_vocab) if same else cfg


def hf_source(cfg: LlamaConfig, reader: Reader, meta: dict) -> Source:
    """Llama/Qwen weights as transformers stores them (``model.`` prefix or none; a tied head stored or not)."""
    cfg = _saved_config(cfg, reader)
    ignored = {k for k in reader.shapes if k.endswith(SKIPPED)}
    if cfg.tie_weights:
        ignored.add("lm_head.weight")  # transformers, too, uses the embedding when the head is tied
    if "tokenizer" not in meta and getattr(reader, "metadata", {}).get("gptforge_tokenizer") == "gpt2":
        meta = {**meta, "tokenizer": "gpt2"}  # exported with the GPT-2 tokenizer's vocab.json and merges.txt
    prefix = hf_prefix_in(cfg, reader.shapes)
    return Source("hf", cfg, reader, stacked_experts(plan_hf(cfg, prefix), cfg, prefix, reader.shapes), ignored, meta)


def stacked_experts(plan: list[Entry], cfg: LlamaConfig, prefix: str, shapes: dict) -> list[Entry]:
    """The plan with each expert's matrices taken from a layer's stacked tensors where the file has them
    (transformers 5's in-memory names, as its state_dict() gives them: mlp.experts.gate_up_proj (E, 2I, C) with
    gate then up, mlp.experts.down_proj (E, C, I)) instead of one tensor per expert (what save_pretrained writes)."""
    if not cfg.n_experts or not any(k.endswith("mlp.experts.gate_up_proj") for k in shapes):
        return plan
    n, width, C = cfg.n_experts, cfg.moe_intermediate_size, cfg.emb_dim
    out = []
    for e in plan:
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", e.ours)
        if m is None:
            out.append(e)
            continue
        layer, expert, which = m.groups()
        stack = f"{prefix}layers.{layer}.mlp.experts." + ("down_proj" if which == "down" else "gate_up_proj")
        out.append(Entry(e.ours, (stack,), "expert", rows=width if which == "up" else 0, expert=int(expert),
                         stacked=(n, C, width) if which == "down" else (n, 2 * width, C)))
    return out


def is_hf_state_dict(shapes: dict[str, tuple[int, ...]]) -> bool:
    """LlamaForCausalLM's names (model.embed_tokens.weight) or LlamaModel's (embed_tokens.weight)."""
    return any(k.endswith("embed_tokens.weight") for k in shapes)


# ----------------------------------------------------------------------------- minimind's .pth state dicts


def _has_hf_config(path: Path) -> bool:
    """A Llama/Qwen config.json beside the file: then it is Hugging Face weights, read with that config."""
    conf = path.parent / "config.json"
    return conf.is_file() and read_json(conf).get("model_type") in HF_MODEL_TYPES


def _heads(path: Path, shapes: dict, prefix: str, n_heads: int | None) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) from the projections' rows: q_norm's width is head_dim; without it,
    n_heads must be given."""
    attn = prefix + "layers.0.self_attn."
    q_rows, k_rows = shapes[attn + "q_proj.weight"][0], shapes[attn + "k_proj.weight"][0]
    q_norm = shapes.get(attn + "q_norm.weight")
    if q_norm is not None:
        head_dim = q_norm[0]
        if n_heads is not None and n_heads * head_dim != q_rows:
            raise WeightsError(f"{path}: n_heads {n_heads} does not fit q_proj's {q_rows} rows of {head_dim}-wide "
                               f"heads (q_norm); this model has {q_rows // head_dim} heads")
    elif n_heads is None:
        raise WeightsError(f"{path}: the number of attention heads is not stored in a state dict without q_norm "
                           "(MiniMind2, Llama); give n_heads (gptforge convert ... --n-heads N; minimind's models "
                           "have 8)")
    else:
        head_dim = q_rows // n_heads
        if head_dim * n_heads != q_rows:
            raise WeightsError(f"{path}: n_heads {n_heads} does not divide q_proj's {q_rows} rows")
    if q_rows % head_dim or k_rows % head_dim:
        raise WeightsError(f"{path}: q_proj's {q_rows} and k_proj's {k_rows} rows are not whole heads of {head_dim}")
    return q_rows // head_dim, k_rows // head_dim, head_dim


def _minimind_experts(shapes: dict, layer0: str) -> dict:
    """minimind's MoE (use_moe): the number of experts and their width from layer 0's tensors; what no tensor says
    (top-1, renormalised, the loss coefficient) from its MiniMindConfig's defaults. {} for a dense model."""
    n = len({k for k in shapes if re.fullmatch(re.escape(layer0) + r"mlp\.experts\.\d+\.gate_proj\.weight", k)})
    if not n:
        return {}
    return dict(n_experts=n, moe_intermediate_size=shapes[layer0 + "mlp.experts.0.gate_proj.weight"][0],
                experts_per_token=1, norm_topk_prob=True, router_aux_loss_coef=5e-4)


def _tied(reader: TorchReader, prefix: str) -> bool:
    """Tied when the state dict has no head, or one equal to the embedding (minimind saves both)."""
    if "lm_head.weight" not in reader.shapes:
        return True
    t = reader.read(["lm_head.weight", prefix + "embed_tokens.weight"])
    return torch.equal(t["lm_head.weight"], t[prefix + "embed_tokens.weight"])


def open_state_dict(path: Path, reader: TorchReader, n_heads: int | None) -> Source | None:
    """A state dict in Llama/Qwen/minimind names with no config.json, its shape from the tensors; None for any other."""
    shapes = reader.shapes
    prefix = "model." if "model.embed_tokens.weight" in shapes else ""
    if prefix + "embed_tokens.weight" not in shapes or _has_hf_config(path):
        return None
    layer0 = prefix + "layers.0."
    experts = _minimind_experts(shapes, layer0)
    mlp = "mlp.experts.0.gate_proj.weight" if experts else "mlp.gate_proj.weight"
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", mlp):
        if layer0 + name not in shapes:
            raise WeightsError(f"{path}: tensor {layer0 + name!r} is missing: a partial Llama/minimind state dict")
    vocab, emb = shapes[prefix + "embed_tokens.weight"]
    heads, kv_heads, head_dim = _heads(path, shapes, prefix, n_heads)
    qk_norm = layer0 + "self_attn.q_norm.weight" in shapes
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    tied = _tied(reader, prefix)
    d = MINIMIND_DEFAULTS
    try:
        cfg = LlamaConfig(vocab_size=vocab, context_length=d["context_length"], emb_dim=emb, n_heads=heads,
                          n_kv_heads=kv_heads, head_dim=head_dim, n_layers=max(layers) + 1,
                          intermediate_size=shapes[layer0 + mlp][0],
                          norm_eps=d["norm_eps_qk_norm"] if qk_norm else d["norm_eps"], rope_theta=d["rope_theta"],
                          qk_norm=qk_norm, qkv_bias=layer0 + "self_attn.q_proj.bias" in shapes, tie_weights=tied,
                          drop_rate=0.0, **experts)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    ignored = {k for k in shapes if k.endswith(SKIPPED)} | ({"lm_head.weight"} if tied else set())
    meta = {"format": "minimind", "source": str(path), "n_heads": str(heads)}
    return Source("minimind", cfg, reader, plan_hf(cfg, prefix), ignored, meta)


# ----------------------------------------------------------------------------- Hugging Face out


def _hf_kind(cfg: LlamaConfig) -> str:
    """The transformers model_type a model of cfg exports as, or one line saying there is none."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise WeightsError("a model with both qk_norm and qkv_bias has no transformers class (Qwen3's attention_bias "
                           "puts a bias on o_proj too); convert it --to gptforge instead")
    if cfg.n_experts and not cfg.qk_norm:
        raise WeightsError("a mixture of experts exports as Qwen3MoeForCausalLM, which has QK-norm; this model has "
                           "none (qk_norm false): convert it --to gptforge instead")
    if cfg.n_experts and cfg.router_balance == "bias":
        raise WeightsError("router_balance bias: the routing bias (expert_bias) changes which experts a token goes "
                           "to, and Qwen3MoeForCausalLM has none; convert it --to gptforge instead")
    if cfg.n_experts:
        return "qwen3_moe"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_config(cfg: LlamaConfig) -> dict:
    """The config.json of the transformers model: Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM with a q/k/v bias,
    else LlamaForCausalLM. rope_theta is written both ways transformers reads it (4: top level, 5: rope_parameters)."""
    kind = _hf_kind(cfg)
    conf = {
        "architectures": [HF_CLASSES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_weights, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "dtype": "float32",
    }
    if kind == "llama":
        conf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        conf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                    layer_types=["full_attention"] * cfg.n_layers)
        if kind in ("qwen3", "qwen3_moe"):
            conf["attention_bias"] = False
    if kind == "qwen3_moe":
        conf.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                    moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                    router_aux_loss_coef=cfg.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                    output_router_logits=False)
    return conf


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's weights: ours behind ``model.``, the head bare and left out when tied (as
    save_pretrained does)."""
    _hf_kind(model.cfg)  # refused before anything is written
    return hf_names(model)


# ----------------------------------------------------------------------------- GGUF out (llama, qwen2, qwen3)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "mlp.gate": "ffn_gate_inp"}  # layers.i.X -> blk.i.Y, as convert_hf_to_gguf.py


def gguf_arch(cfg: LlamaConfig) -> str:
    """llama.cpp's architecture: the transformers class's (qwen3 with QK-norm, qwen2 with a q/k/v bias, else llama;
    qwen3moe with experts, whose top-k weights llama.cpp always renormalises)."""
    if cfg.n_experts and not cfg.norm_topk_prob:
        raise WeightsError("norm_topk_prob false: llama.cpp's qwen3moe always renormalises the chosen experts' "
                           "weights; convert it --to hf or --to gptforge instead")
    return _hf_kind(cfg).replace("_", "")  # qwen3_moe -> qwen3moe


def gguf_params(writer, cfg: LlamaConfig) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows (n_heads * head_dim, ...) from the rotate-half layout (dimension i turns with i + hs/2)
    to llama.cpp's llama layout (2i with 2i + 1): the converter's `permute`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: nn.Module):
    """(llama.cpp name, tensor); for the llama architecture q and k rows interleaved (its rotary pairs neighbours;
    qwen2 and qwen3 rotate halves, as Hugging Face does); the head only when untied (llama.cpp then reads the
    embedding)."""
    cfg = model.cfg
    arch = gguf_arch(cfg)
    yield "token_embd.weight", model.embed_tokens.weight[: cfg.vocab_size]  # padding (pad_vocab) cut off
    for i in range(cfg.n_layers):
        for name, t in model.layers[i].state_dict().items():
            if ".experts." in name:  # stacked per layer below, as the converter does
                continue
            module, kind = name.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":
                t = interleave_rotary(t, cfg.n_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                t = interleave_rotary(t, cfg.n_kv_heads)
            yield f"blk.{i}.{GGUF_NAMES[module]}.{kind}", t
        if cfg.n_experts:
            experts = model.layers[i].mlp.experts
            for ours, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")):
                stacked = torch.stack([getattr(e, ours).weight for e in experts])  # (E, out, in)
                yield f"blk.{i}.{theirs}.weight", stacked
    yield "output_norm.weight", model.norm.weight
    if not cfg.tie_weights:
        yield "output.weight", model.lm_head.weight[: cfg.vocab_size]
