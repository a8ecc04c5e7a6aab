"""GGUF out, read back with the gguf package's own reader: metadata, tokenizer, tensors as llama.cpp loads them.

Shapes are checked in GGUF's order (ne0 first), against what llama.cpp's model loader asks for per
architecture (llama-model.cpp: token_embd {n_embd, n_vocab}, attn_qkv {n_embd, 3 n_embd}, ffn_down {n_ff, n_embd},
...); values against the model's own parameters. Running the files in llama.cpp itself: tests/test_gguf_llama_cpp.py.
"""

import json

import numpy as np
import pytest
import torch
from clirun import run
from minimind_like import tokenizer_dir

from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.layers import apply_rotary, rotary_tables
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.tokenizer import get_tokenizer
from gptforge.weights import WeightsError, to_gguf, to_gptforge
from gptforge.weights.llama import interleave_rotary

gguf = pytest.importorskip("gguf")

MINIMIND = tokenizer_dir() / "tokenizer.json"  # minimind_like.py


def gpt2_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def llama_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=6400, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
               intermediate_size=64)
    model = Llama(LlamaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from ones and zeros
            p.add_(torch.randn_like(p) * 0.1)
    return model


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (list(map(int, t.shape)), gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type)
               for t in r.tensors}
    return fields, tensors


def assert_tensor(tensors, name, ne, expected, atol=0.0):
    shape, data, _ = tensors[name]
    assert shape == ne, name
    np.testing.assert_allclose(data, expected.detach().float().numpy(), atol=atol, rtol=0, err_msg=name)


def test_gpt2_round_trip(tmp_path):
    model = gpt2_model()
    path = to_gguf(model, tmp_path / "m.gguf", get_tokenizer("gpt2"))
    f, t = read(path)
    assert f["general.architecture"] == "gpt2" and f["general.file_type"] == 0
    assert (f["gpt2.context_length"], f["gpt2.embedding_length"], f["gpt2.feed_forward_length"],
            f["gpt2.block_count"], f["gpt2.attention.head_count"]) == (32, 32, 128, 2, 2)
    assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and types[50256] == 3 and types[0] == 1
    assert tokens[6109] == "Every" and tokens[3626] == "Ġeffort"  # "Every effort" -> [6109, 3626]
    assert len(f["tokenizer.ggml.merges"]) == 50000 and f["tokenizer.ggml.merges"][0] == "Ġ t"
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.bos_token_id"] == 50256
    assert f["tokenizer.ggml.add_bos_token"] is False
    sd = model.state_dict()
    assert len(t) == 2 + 2 * 12 + 3
    assert_tensor(t, "token_embd.weight", [32, 50257], sd["wte.weight"])
    assert_tensor(t, "position_embd.weight", [32, 32], sd["wpe.weight"])
    assert_tensor(t, "output.weight", [32, 50257], sd["wte.weight"])  # tied: written, as the converter does
    assert_tensor(t, "output_norm.bias", [32], sd["ln_f.bias"])
    for i in range(2):
        assert_tensor(t, f"blk.{i}.attn_qkv.weight", [32, 96], sd[f"h.{i}.attn.c_attn.weight"])
        assert_tensor(t, f"blk.{i}.attn_qkv.bias", [96], sd[f"h.{i}.attn.c_attn.bias"])
        assert_tensor(t, f"blk.{i}.attn_output.weight", [32, 32], sd[f"h.{i}.attn.c_proj.weight"])
        assert_tensor(t, f"blk.{i}.ffn_up.weight", [32, 128], sd[f"h.{i}.mlp.c_fc.weight"])
        assert_tensor(t, f"blk.{i}.ffn_down.weight", [128, 32], sd[f"h.{i}.mlp.c_proj.weight"])
        assert_tensor(t, f"blk.{i}.attn_norm.weight", [32], sd[f"h.{i}.ln_1.weight"])
        assert_tensor(t, f"blk.{i}.ffn_norm.bias", [32], sd[f"h.{i}.ln_2.bias"])


@pytest.mark.parametrize("dtype, qtype, atol", [("f16", 1, 1e-3), ("bf16", 30, 1e-2)])
def test_half_precision_keeps_norms_and_biases_f32(tmp_path, dtype, qtype, atol):
    model = gpt2_model(tie_weights=False, pad_vocab=True)  # an untied head; padding rows never written
    f, t = read(to_gguf(model, tmp_path / "m.gguf", get_tokenizer("gpt2"), dtype))
    assert f["general.file_type"] == {"f16": 1, "bf16": 32}[dtype]
    assert t["blk.0.attn_qkv.weight"][2] == qtype and t["blk.0.attn_qkv.bias"][2] == 0  # F32 = 0
    assert_tensor(t, "output.weight", [32, 50257], model.lm_head.weight[:50257], atol=atol)
    assert_tensor(t, "blk.1.ffn_down.weight", [128, 32], model.h[1].mlp.c_proj.weight, atol=atol)


def test_gpt2_without_biases_gets_zeros(tmp_path):
    model = gpt2_model(qkv_bias=False, bias=False)
    _, t = read(to_gguf(model, tmp_path / "m.gguf", get_tokenizer("gpt2")))
    for name, ne in (("blk.0.attn_qkv.bias", [96]), ("blk.1.ffn_up.bias", [128]), ("blk.0.attn_norm.bias", [32]),
                     ("output_norm.bias", [32])):
        assert_tensor(t, name, ne, torch.zeros(ne[0]))


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_llama_family_round_trip(tmp_path, kind):
    model = llama_model(qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2", tie_weights=kind != "llama")
    tok = get_tokenizer(str(MINIMIND))
    f, t = read(to_gguf(model, tmp_path / "m.gguf", tok))
    assert f["general.architecture"] == kind
    keys = ("context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "vocab_size")
    assert [f[f"{kind}.{k}"] for k in keys] == [64, 32, 64, 2, 4, 2, 8, 8, 6400]
    assert f[f"{kind}.rope.freq_base"] == pytest.approx(model.cfg.rope_theta)
    assert f[f"{kind}.attention.layer_norm_rms_epsilon"] == pytest.approx(model.cfg.norm_eps)
    spec = json.loads(MINIMIND.read_text())
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and len(f["tokenizer.ggml.tokens"]) == 6400
    assert f["tokenizer.ggml.merges"][0] == " ".join(spec["model"]["merges"][0])
    assert f["tokenizer.ggml.eos_token_id"] == tok.eot_id == 2 and f["tokenizer.ggml.padding_token_id"] == 0
    assert f["tokenizer.ggml.bos_token_id"] == 1
    assert ("output.weight" in t) == (kind == "llama")  # a tied head: llama.cpp reads token_embd
    layer = model.layers[1]
    q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
    if kind == "llama":  # llama.cpp's llama rotates neighbouring pairs: rows interleaved, as the converter does
        q, k = interleave_rotary(q, 4), interleave_rotary(k, 2)
    assert_tensor(t, "blk.1.attn_q.weight", [32, 32], q)
    assert_tensor(t, "blk.1.attn_k.weight", [32, 16], k)
    assert_tensor(t, "blk.1.attn_v.weight", [32, 16], layer.self_attn.v_proj.weight)
    assert_tensor(t, "blk.1.attn_output.weight", [32, 32], layer.self_attn.o_proj.weight)
    assert_tensor(t, "blk.1.ffn_gate.weight", [32, 64], layer.mlp.gate_proj.weight)
    assert_tensor(t, "blk.1.ffn_down.weight", [64, 32], layer.mlp.down_proj.weight)
    assert_tensor(t, "blk.1.ffn_norm.weight", [32], layer.post_attention_layernorm.weight)
    assert_tensor(t, "token_embd.weight", [32, 6400], model.embed_tokens.weight)
    if kind == "qwen3":
        assert_tensor(t, "blk.1.attn_q_norm.weight", [8], layer.self_attn.q_norm.weight)
    if kind == "qwen2":
        assert_tensor(t, "blk.1.attn_k.bias", [16], layer.self_attn.k_proj.bias)


def test_interleaved_rows_rotate_as_llama_cpp_does():
    """Rotary on interleaved rows with neighbouring pairs (llama.cpp's llama) = the rotate-half rotary, interleaved."""
    torch.manual_seed(0)
    hs, theta, T = 8, 10000.0, 5
    q = torch.randn(1, 1, T, hs)  # (B, heads, T, hs), one head
    cos, sin = rotary_tables(torch.arange(T), hs, theta, torch.float32)
    half = apply_rotary(q, cos, sin)  # Hugging Face / gptforge: dimension i turns with i + hs/2
    perm = interleave_rotary(torch.arange(hs), 1)  # where each interleaved row comes from
    qi = q[..., perm]
    freqs = theta ** (-torch.arange(0, hs, 2).float() / hs)  # pair (2i, 2i+1) turns at frequency i
    angle = torch.arange(T).float()[:, None] * freqs  # (T, hs/2)
    a, b = qi[..., 0::2], qi[..., 1::2]
    neighbours = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1).flatten(-2)
    torch.testing.assert_close(neighbours, half[..., perm])


def test_refusals(tmp_path, capsys):
    nano = gpt2_model(gelu="exact")
    with pytest.raises(WeightsError, match="llama.cpp's gpt2 computes GELU with the tanh approximation"):
        to_gguf(nano, tmp_path / "n.gguf", get_tokenizer("gpt2"))
    assert not list(tmp_path.iterdir())
    with pytest.raises(WeightsError, match=r"OUT .*m.bin: --to gguf writes one file; name it \*.gguf"):
        to_gguf(gpt2_model(), tmp_path / "m.bin", get_tokenizer("gpt2"))
    both = llama_model(qk_norm=True, qkv_bias=True)
    with pytest.raises(WeightsError, match="both qk_norm and qkv_bias"):
        to_gguf(both, tmp_path / "b.gguf", get_tokenizer(str(MINIMIND)))
    spec = json.loads(MINIMIND.read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match="pre_tokenizer 'Whitespace'.*GGUF export supports byte-level BPE"):
        to_gguf(llama_model(), tmp_path / "w.gguf", get_tokenizer(str(tmp_path / "ws" / "tokenizer.json")))
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    # through the CLI: one line, checked before the weights are read; OUT never overwritten
    to_gptforge(nano, tmp_path / "nano")
    code, out, err = run(["convert", str(tmp_path / "nano"), "--to", "gguf", str(tmp_path / "n.gguf")], capsys)
    assert code == 1 and "tanh approximation" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    code, out, err = run(["convert", str(tmp_path / "nano"), "--to", "gguf", str(tmp_path / "taken.gguf")], capsys)
    assert code == 1 and "already exists" in err and (tmp_path / "taken.gguf").read_bytes() == b"mine"


def test_cli_convert_to_gguf(tmp_path, capsys):
    model = llama_model(qk_norm=True)
    to_gptforge(model, tmp_path / "ckpt", get_tokenizer(str(MINIMIND)))
    code, out, err = run(["convert", str(tmp_path / "ckpt"), "--to", "gguf", str(tmp_path / "m.gguf"), "--dtype",
                          "f16"], capsys)
    assert code == 0 and "m.gguf" in out, err
    f, t = read(tmp_path / "m.gguf")
    assert f["general.architecture"] == "qwen3" and f["general.file_type"] == 1 and f["general.name"] == "ckpt"
    assert_tensor(t, "blk.0.ffn_up.weight", [32, 64], model.layers[0].mlp.up_proj.weight, atol=1e-3)


def test_mixture_of_experts_as_qwen3moe(tmp_path):
    """llama.cpp's qwen3moe (convert_hf_to_gguf.py's Qwen3MoeModel): the router as ffn_gate_inp {n_embd, n_expert},
    each layer's experts stacked: ffn_gate_exps / ffn_up_exps {n_embd, n_ff_exp, n_expert}, ffn_down_exps
    {n_ff_exp, n_embd, n_expert}; the expert counts and width in the metadata."""
    model = llama_model(qk_norm=True, n_experts=4, experts_per_token=2, moe_intermediate_size=48)
    f, t = read(to_gguf(model, tmp_path / "m.gguf", get_tokenizer(str(MINIMIND))))
    assert f["general.architecture"] == "qwen3moe"
    assert (f["qwen3moe.expert_count"], f["qwen3moe.expert_used_count"]) == (4, 2)
    assert f["qwen3moe.expert_feed_forward_length"] == 48
    moe = model.layers[1].mlp
    assert_tensor(t, "blk.1.ffn_gate_inp.weight", [32, 4], moe.gate.weight)
    assert_tensor(t, "blk.1.ffn_gate_exps.weight", [32, 48, 4], torch.stack([e.gate_proj.weight for e in moe.experts]))
    assert_tensor(t, "blk.1.ffn_up_exps.weight", [32, 48, 4], torch.stack([e.up_proj.weight for e in moe.experts]))
    assert_tensor(t, "blk.1.ffn_down_exps.weight", [48, 32, 4], torch.stack([e.down_proj.weight for e in moe.experts]))
    assert not any(".ffn_gate.weight" in name or "experts" in name for name in t)
    with pytest.raises(WeightsError, match="norm_topk_prob false: llama.cpp's qwen3moe always renormalises"):
        to_gguf(llama_model(qk_norm=True, n_experts=2, norm_topk_prob=False), tmp_path / "n.gguf",
                get_tokenizer(str(MINIMIND)))
