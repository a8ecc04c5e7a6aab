"""The llama family against transformers' own Llama, Qwen2 and Qwen3 modules, and through training."""

import json
import shutil

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from gptforge import checkpoint as ckpt
from gptforge.config import ConfigError
from gptforge.data import DataConfig
from gptforge.generate import SampleConfig, generate
from gptforge.models import get_spec, preset_arch
from gptforge.models.layers import GroupedQueryAttention, RMSNorm, apply_rotary, rotary_tables
from gptforge.models.llama import PRESETS, Llama, LlamaConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig

V = 101


def hf_pair(kind: str, **extra):
    """A tiny random transformers model of `kind` and a gptforge Llama holding the same weights."""
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    ours = dict(vocab_size=V, context_length=64, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                norm_eps=1e-6)
    if kind == "llama":
        hc = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False, **extra)
        model_class, ours = transformers.LlamaForCausalLM, dict(ours, rope_theta=10000.0, tie_weights=False)
    elif kind == "qwen2":
        hc = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True, **extra)
        model_class, ours = transformers.Qwen2ForCausalLM, dict(ours, qkv_bias=True)
    else:  # qwen3: QK-norm, and heads narrower than hidden / heads
        hc = transformers.Qwen3Config(**common, head_dim=24, rope_theta=1e6, tie_word_embeddings=True, **extra)
        model_class, ours = transformers.Qwen3ForCausalLM, dict(ours, qk_norm=True, head_dim=24)
    torch.manual_seed(0)
    hf = model_class(hc).eval()
    with torch.no_grad():  # norms start at ones and biases at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    model = Llama(LlamaConfig(**ours)).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    return hf, model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_logits_and_greedy_tokens_equal_transformers(kind):
    hf, model = hf_pair(kind)
    idx = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)
        want = hf.generate(idx[:1, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generate(model, idx[:1, :5], SampleConfig(max_new_tokens=12))[0] == want


def test_rotary_equals_transformers_rotate_half():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    rope = modeling_llama.LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    positions = torch.arange(5, 14)  # continuing a cache: positions 5..13
    cos_hf, sin_hf = rope(q, positions[None])
    cos, sin = rotary_tables(positions, 16, 500000.0, torch.float32)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=0)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf, rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf, rtol=0, atol=0)


def test_rmsnorm_equals_transformers_in_fp32_and_bf16():
    hf = modeling_qwen3.Qwen3RMSNorm(24, eps=1e-6)
    ours = RMSNorm(24, 1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(24))
        ours.weight.copy_(hf.weight)
    x = torch.randn(3, 5, 24) * 4
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x.bfloat16()), hf(x.bfloat16()), rtol=0, atol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_attention_equals_transformers_module(n_kv_heads, qk_norm):
    """Multi-head (4), grouped (2) and multi-query (1) attention, with and without Qwen3's QK-norm."""
    kind = transformers.Qwen3Config if qk_norm else transformers.LlamaConfig
    cfg = kind(hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=24,
               rms_norm_eps=1e-6, attention_bias=False)
    cfg._attn_implementation = "eager"
    module = (modeling_qwen3.Qwen3Attention if qk_norm else modeling_llama.LlamaAttention)(cfg, layer_idx=0).eval()
    ours = GroupedQueryAttention(64, 4, n_kv_heads, 24, qkv_bias=False, qk_norm=qk_norm, norm_eps=1e-6,
                                 drop_rate=0.0).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if name.endswith("proj.weight") else 1))
    ours.load_state_dict(module.state_dict())
    T = 11
    x = torch.randn(2, T, 64)
    positions = torch.arange(T)
    cos, sin = rotary_tables(positions, 24, 10000.0, torch.float32)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = module(x, (cos[None], sin[None]), mask)[0]
        torch.testing.assert_close(ours(x, (cos, sin)), want, rtol=0, atol=1e-5)


def test_kv_cache_holds_key_value_heads_only_and_decodes_like_the_uncached_path():
    cfg = LlamaConfig(vocab_size=V, context_length=32, emb_dim=64, n_heads=8, n_kv_heads=2, n_layers=2,
                      qk_norm=True)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    from gptforge.models import KVCache
    assert KVCache.nbytes(cfg, torch.float32) == 2 * 2 * 2 * 32 * 8 * 4  # 2 kv heads of 8, not 8 heads
    idx = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(2))
    sample = SampleConfig(max_new_tokens=20)
    assert generate(model, idx, sample) == generate(model, idx, sample, use_cache=False)


def test_generating_past_the_trained_length_warns_and_keeps_going(capsys):
    from gptforge.generate import sample_text
    from gptforge.tokenizer import get_tokenizer

    cfg = LlamaConfig(vocab_size=50257, context_length=8, emb_dim=32, n_heads=2, n_layers=1)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    idx = torch.randint(0, 50257, (1, 6))
    sample = SampleConfig(max_new_tokens=10)
    out = generate(model, idx, sample)
    assert len(out[0]) == 10 and out == generate(model, idx, sample, use_cache=False)
    sample_text(model, get_tokenizer("gpt2"), "Hello there", SampleConfig(max_new_tokens=10))
    assert "past the 8 the model was trained at" in capsys.readouterr().err


def test_minimind_presets_have_the_published_parameter_counts():
    """minimind's code counts 63,912,192 (minimind-3), 25,829,888 (MiniMind2-small), 104,030,976 (MiniMind2)."""
    counts = {name: Llama(LlamaConfig(**PRESETS[name])).num_params()
              for name in ("minimind-3", "minimind2-small", "minimind2")}
    assert counts == {"minimind-3": 63_912_192, "minimind2-small": 25_829_888, "minimind2": 104_030_976}
    assert all(preset_arch(n) == "llama" for n in PRESETS) and preset_arch("mini") == "gpt2"


def test_flop_count_counts_every_matrix_multiply():
    spec = get_spec("llama")
    cfg = LlamaConfig(vocab_size=V, emb_dim=64, n_heads=4, n_kv_heads=2, head_dim=24, intermediate_size=96, n_layers=3,
                      tie_weights=False)
    model = Llama(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert spec.matmul_params(cfg) == linear  # q/k/v/o over kv heads, SwiGLU's three matrices, the head
    assert spec.flops_per_token(cfg, 100) == 6 * linear + 12 * 3 * 4 * 24 * 100


@pytest.mark.parametrize("values, message", [
    (dict(n_heads=4, n_kv_heads=3), "--n-kv-heads 3 must divide --n-heads 4"),
    (dict(emb_dim=60, n_heads=8), "--emb-dim 60 must be divisible by --n-heads 8"),
    (dict(head_dim=15), "--head-dim 15 must be even"),
    (dict(norm_eps=0.0), "--norm-eps must be above 0"),
])
def test_bad_shapes_are_refused_with_the_flag_named(values, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**values)


def tiny_run(text_file, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=8, eval_every=4, eval_batches=2, log_every=1, sample_tokens=4, lr=2e-3,
             warmup_steps=2, seed=5, device="cpu", progress=False)
    t.update(train_kw)
    model = LlamaConfig(context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, qk_norm=True,
                        drop_rate=0.1)
    return RunConfig(model=model, data=DataConfig(val_fraction=0.1), train=TrainConfig(**t), inputs=[str(text_file)])


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if r["event"] == "train"}


def test_llama_run_learns_and_resumes_bit_for_bit(text_file, tmp_path):
    cfg = tiny_run(text_file, max_steps=10, save_every=2, keep_last=0, grad_accum=2, lr=1e-2)
    full = tmp_path / "full"
    train(cfg, full, log=lambda *_: None)
    assert 'arch = "llama"' in (full / "config.toml").read_text()
    assert losses(full)[10] < losses(full)[1] - 1.0  # it learns
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    train(cfg, cut, resume=True, log=lambda *_: None)
    assert losses(cut) == losses(full)
    from safetensors.torch import load_file
    a, b = (load_file(str(ckpt.latest_checkpoint(r) / ckpt.WEIGHTS)) for r in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "layers.0.self_attn.q_norm.weight" in a


def test_settings_of_the_other_family_are_refused(tmp_path):
    from gptforge.training.config import resolve_train_config

    with pytest.raises(ConfigError, match="--n-kv-heads is a setting of the llama family, not of gpt2; add --arch "
                                          "llama"):
        resolve_train_config(["x.txt"], None, None, None, {"n_kv_heads": 2, "out": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match="preset 'mini' is a gpt2 model, not llama"):
        resolve_train_config((), None, None, "mini", {"out": str(tmp_path / "b")}, arch="llama")
    cfg, _ = resolve_train_config(["x.txt"], None, None, "minimind-3", {"out": str(tmp_path / "c"), "n_layers": 2})
    assert type(cfg.model) is LlamaConfig and cfg.model.n_kv_heads == 4 and cfg.model.n_layers == 2
    assert cfg.model.vocab_size == 50257  # the run's tokenizer (gpt2), not the preset's 6400
