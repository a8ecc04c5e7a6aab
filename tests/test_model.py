import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gptforge.distributed import checkpoint_blocks
from gptforge.evaluate import evaluate, loss_batch, perplexity
from gptforge.models import DEFAULT_ARCH, KVCache, build, config_from_dict, get_spec, spec_for
from gptforge.models.gpt2 import GPT, PRESETS, GPTConfig
from gptforge.models.layers import CausalSelfAttention
from gptforge.weights import FAMILIES, load_model


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(**PRESETS["gpt2-small"]))
    assert model.num_params() == 124_439_808
    with torch.device("meta"):
        untied = GPT(GPTConfig(**PRESETS["gpt2-small"], tie_weights=False))
    assert untied.num_params() == 124_439_808 + 50257 * 768


@pytest.mark.parametrize("name", ["gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_openai_shapes(name):
    expected = {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}[name]
    with torch.device("meta"):
        model = GPT(GPTConfig(**PRESETS[name]))
    assert model.num_params() == expected


def test_parameter_names_follow_gpt2():
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))
    names = set(model.state_dict())
    for key in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight",
                "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.weight",
                "h.0.mlp.c_proj.bias", "ln_f.weight", "lm_head.weight"]:
        assert key in names
    assert model.lm_head.weight is model.wte.weight


def test_output_shape_and_context_limit(tiny_model, tiny_cfg):
    x = torch.randint(0, tiny_cfg.vocab_size, (3, 10))
    assert tiny_model(x).shape == (3, 10, tiny_cfg.vocab_size)
    with pytest.raises(IndexError, match="longer than the model's context_length"):
        tiny_model(torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long))


def test_causality_future_tokens_do_not_change_earlier_logits(tiny_model, tiny_cfg):
    torch.manual_seed(1)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, tiny_cfg.vocab_size, (2, 6))
    a, b = tiny_model(x), tiny_model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_matches_explicit_attention_reference(tiny_model, tiny_cfg):
    """The block computed by hand (softmax(QK^T/sqrt(d)) with a causal mask) equals the model."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, tiny_cfg.emb_dim)
    attn = tiny_model.h[0].attn
    B, T, C = x.shape
    nh, hs = tiny_cfg.n_heads, C // tiny_cfg.n_heads
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    ref = attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_fresh_model_loss_is_close_to_ln_vocab():
    torch.manual_seed(0)
    cfg = GPTConfig(context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    y = torch.randint(0, cfg.vocab_size, (4, 32))
    result = evaluate(model, [(x, y)])
    assert abs(result.loss - math.log(cfg.vocab_size)) < 0.3
    assert result.tokens == 128
    assert perplexity(result.loss) == pytest.approx(math.exp(result.loss))


def test_tiny_model_overfits_one_batch(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    x = torch.randint(0, tiny_cfg.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss_batch(model, x, y).item()
    for _ in range(150):
        loss = loss_batch(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.05


def test_evaluate_restores_training_mode_and_limits_batches(tiny_model, tiny_cfg):
    tiny_model.train()
    batches = [(torch.randint(0, tiny_cfg.vocab_size, (2, 8)),) * 2 for _ in range(5)]
    assert evaluate(tiny_model, batches, max_batches=2).tokens == 32
    assert tiny_model.training


def test_config_validation():
    with pytest.raises(ValueError, match="--emb-dim 30 must be divisible by --n-heads 4"):
        GPTConfig(emb_dim=30, n_heads=4)
    with pytest.raises(ValueError, match=r"--drop-rate must be in \[0, 1\), got 1.0"):
        GPTConfig(drop_rate=1.0)
    with pytest.raises(ValueError, match="--n-heads must be at least 1, got 0"):
        GPTConfig(n_heads=0)
    with pytest.raises(ValueError, match="--vocab-size must be a whole number, got 50257.5"):
        GPTConfig.from_dict({"vocab_size": 50257.5})  # e.g. from a checkpoint's metadata
    with pytest.raises(ValueError, match="unknown model setting"):
        GPTConfig.from_dict({"emb": 3})


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_padding_is_invisible(tmp_path, tie):
    """Padded to 128 rows, the model's logits, loss, state dict and saved weights equal an unpadded model's."""
    from gptforge import checkpoint as ckpt

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_weights=tie,
                    drop_rate=0.0)
    plain = GPT(cfg)
    padded = GPT(GPTConfig(**{**cfg.to_dict(), "pad_vocab": True}))
    assert padded.wte.weight.shape == (128, 16) and padded.lm_head.weight.shape == (128, 16)
    padded.load_state_dict(plain.state_dict())  # unpadded weights load into the padded model
    sd = padded.state_dict()
    assert sd["wte.weight"].shape == (101, 16) and sd["lm_head.weight"].shape == (101, 16)
    assert padded.num_params() == plain.num_params()
    with torch.no_grad():
        padded.lm_head.weight[101:] = 100.0  # padding rows that would win every argmax if they leaked
    x = torch.randint(0, 101, (2, 8))
    torch.testing.assert_close(padded(x), plain(x))
    assert padded(x).shape == (2, 8, 101)
    torch.testing.assert_close(loss_batch(padded, x, x), loss_batch(plain, x, x))
    ckpt.save_weights(tmp_path / "w.safetensors", padded, "gpt2")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "w.safetensors"))
    assert saved["wte.weight"].shape == (101, 16) and ("lm_head.weight" in saved) == (not tie)
    loaded, _ = load_model(tmp_path / "w.safetensors")
    assert loaded.padded_vocab == 128
    torch.testing.assert_close(loaded(x), plain(x))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_cfg, arch):
    from gptforge.models import build
    from gptforge.models.llama import LlamaConfig

    torch.manual_seed(0)
    cfg = (GPTConfig(**{**tiny_cfg.to_dict(), "drop_rate": 0.1}) if arch == "gpt2" else
           LlamaConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                       drop_rate=0.1))
    model = build(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    grads, calls = [], []
    mlps = [m for name, m in model.named_modules() if name.endswith("mlp")]
    for mlp in mlps:
        mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops early: no post hook)
    for ac in (False, True):
        if ac:
            checkpoint_blocks(model)  # from outside the model, through its spec's blocks
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same dropout masks; recomputation restores the RNG state itself
        loss_batch(model, x, x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # each block runs once, and with checkpointing once more in backward (the recomputation)
        assert len(calls) == len(mlps) * (2 if ac else 1)
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # the same numbers, bit for bit


# ----------------------------------------------------------------------------- models: layers and the registry


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_with_fewer_kv_heads_equals_repeated_heads(n_kv_heads):
    """Grouped-query attention: each key/value head serves n_heads // n_kv_heads query heads, cached or not."""
    torch.manual_seed(3)
    cfg = SimpleNamespace(n_layers=1, n_kv_heads=n_kv_heads, context_length=10, head_dim=8)
    attn = CausalSelfAttention(32, 4, n_kv_heads, 0.0, qkv_bias=True).eval()
    assert attn.c_attn.weight.shape == ((4 + 2 * n_kv_heads) * 8, 32)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split((32, 8 * n_kv_heads, 8 * n_kv_heads), dim=2)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k, v = (t.view(2, 10, n_kv_heads, 8).transpose(1, 2).repeat_interleave(4 // n_kv_heads, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(ref), atol=1e-5, rtol=1e-5)
    cache = KVCache(cfg, 2, "cpu", torch.float32)
    assert cache.k.shape == (1, 2, n_kv_heads, 10, 8)  # (L, B, n_kv_heads, T_max, hs)
    parts = []
    for start, end in ((0, 4), (4, 7), (7, 8), (8, 10)):  # prefill, a chunk, single tokens
        parts.append(attn(x[:, start:end], cache.layer(0), cache.pos))
        cache.advance(end - start)
    torch.testing.assert_close(torch.cat(parts, 1), attn(x), atol=1e-5, rtol=1e-5)


def test_kv_cache_owns_its_position(tiny_model, tiny_cfg):
    cache = KVCache(tiny_cfg, 1, "cpu", torch.float32)
    assert cache.k.shape == (2, 1, tiny_cfg.n_kv_heads, 16, 8) and cache.max_len == 16
    assert KVCache.nbytes(tiny_cfg, torch.float32) == cache.k.numel() * 4 * 2
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 6))
    first = tiny_model(x, cache)
    assert cache.pos == 6
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(tiny_model(x, cache), first)  # the same positions again


def test_registry_maps_arch_to_the_gpt2_spec(tiny_cfg):
    spec = get_spec("gpt2")
    assert spec_for(tiny_cfg) is spec and spec.arch == DEFAULT_ARCH == "gpt2"
    assert spec.config_class is GPTConfig and spec.model_class is GPT and spec.presets is PRESETS
    assert spec.weights == "gptforge.weights.gpt2" and FAMILIES["gpt2"].HF_ARCHITECTURE == "GPT2LMHeadModel"
    torch.manual_seed(0)
    model = build(tiny_cfg)
    assert type(model) is GPT and list(spec.blocks(model)) == list(model.h)
    assert config_from_dict(tiny_cfg.to_dict()) == tiny_cfg == config_from_dict(tiny_cfg.to_dict(), "gpt2")
    with pytest.raises(ValueError, match="unknown arch 'mamba'; known model families: gpt2, llama"):
        get_spec("mamba")


def test_checkpoints_record_arch_and_files_without_it_are_gpt2(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    from gptforge import checkpoint as ckpt

    path = tmp_path / "w.safetensors"
    ckpt.save_weights(path, tiny_model, "gpt2")
    meta = ckpt.read_weights_meta(path)
    assert meta["arch"] == "gpt2"
    del meta["arch"]  # as written before model families
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    model, _ = load_model(tmp_path / "old.safetensors")
    assert type(model) is GPT and model.cfg == tiny_model.cfg
    meta["arch"] = "mamba"
    save_file(load_file(str(path)), str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match="other.safetensors: bad model config.*unknown arch 'mamba'"):
        load_model(tmp_path / "other.safetensors")
