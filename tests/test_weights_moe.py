"""Mixture-of-experts weights against transformers' Qwen3MoeForCausalLM: a tiny random model saved by transformers
loads through the production loader with its logits and greedy tokens; a gptforge MoE run exported with
`convert --to hf` loads in transformers with no custom code and the same logits; minimind's MoE .pth loads; what
gptforge's router cannot compute is refused with the config key named."""

import json
import re

import pytest
import torch
from clirun import run
from safetensors.torch import load_file, save_file

from gptforge.data import DataConfig
from gptforge.generate import SampleConfig, generate
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.training import RunConfig, TrainConfig, train
from gptforge.weights import WeightsError, load_any, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

V = 101
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
             rope_theta=1e6, num_experts=4, num_experts_per_tok=2)


def hf_moe(seed: int = 0, **overrides):
    """A tiny random Qwen3MoeForCausalLM; norms perturbed and routers scaled up, so that both matter."""
    torch.manual_seed(seed)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))
    return hf


def assert_same_model(ours, hf, vocab=V):
    """Equal logits (<= 1e-5, fp32) and identical greedy continuations, with and without the KV cache."""
    ours.eval()
    idx = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)
        want = hf.generate(idx[:1, :4], max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert generate(ours, idx[:1, :4], SampleConfig(max_new_tokens=10))[0] == want


@pytest.mark.parametrize("overrides, shards", [
    (dict(norm_topk_prob=True, tie_word_embeddings=True), False),
    (dict(norm_topk_prob=False, tie_word_embeddings=False, num_experts_per_tok=1), True),
])
def test_qwen3_moe_loads_with_transformers_logits(tmp_path, overrides, shards):
    hf = hf_moe(**overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shards else "50GB")
    model, meta = load_any(tmp_path)
    cfg = model.cfg
    assert (cfg.n_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (4, hf.config.num_experts_per_tok, 48)
    assert cfg.norm_topk_prob == overrides["norm_topk_prob"] and cfg.qk_norm and meta["format"] == "hf"
    assert cfg.router_aux_loss_coef == hf.config.router_aux_loss_coef
    assert_same_model(model, hf)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_stacked_experts_as_transformers_state_dict_holds_them(tmp_path, fmt):
    """transformers 5's model.state_dict() (what torch.save of it, or save_file, writes): each layer's experts in
    two stacked tensors, mlp.experts.gate_up_proj (E, 2I, C) and mlp.experts.down_proj (E, C, I)."""
    hf = hf_moe(norm_topk_prob=True)
    sd = hf.state_dict()
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    hf.config.save_pretrained(tmp_path)
    if fmt == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))  # untied head
    model, _ = load_any(tmp_path)
    assert_same_model(model, hf)


@pytest.mark.parametrize("key, value", [
    ("shared_expert_intermediate_size", 64), ("scoring_func", "sigmoid"), ("mlp_only_layers", [1]),
    ("decoder_sparse_step", 2), ("moe_bias", True),
])
def test_what_the_router_cannot_compute_is_refused_with_the_key_named(tmp_path, key, value):
    hf_moe().save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, key: value}))
    with pytest.raises(WeightsError, match=re.escape(f"{key} is {value!r}")):
        load_any(tmp_path)


def test_experts_in_a_dense_model_type_are_refused(tmp_path):
    hf_moe().save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "model_type": "qwen3"}))
    with pytest.raises(WeightsError, match="num_local_experts is 4, but model_type 'qwen3' has dense MLPs"):
        load_any(tmp_path)


def test_minimind_moe_fp16_state_dict(tmp_path):
    """minimind-3-moe's naming: Qwen3-MoE's per-expert names with model., a tied head saved twice, top-1."""
    hf = hf_moe(num_experts_per_tok=1, norm_topk_prob=True, tie_word_embeddings=True)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    hf.save_pretrained(tmp_path / "hf")
    sd = {k: v.half() for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}  # per-expert names
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in sd
    torch.save(sd, tmp_path / "pretrain_moe.pth")
    model, meta = load_any(tmp_path / "pretrain_moe.pth")
    cfg = model.cfg
    assert meta["format"] == "minimind" and (cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob) == (4, 1, True)
    assert cfg.moe_intermediate_size == 48 and cfg.tie_weights
    assert_same_model(model, hf)


def test_trained_moe_run_exports_to_qwen3_moe(tmp_path, text_file, capsys):
    model = LlamaConfig(context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, intermediate_size=32,
                        qk_norm=True, n_experts=4, experts_per_token=2, norm_topk_prob=False)
    t = TrainConfig(batch_size=4, max_steps=2, eval_every=2, eval_batches=1, sample_tokens=0, lr=1e-2, seed=1,
                    device="cpu", progress=False)
    run_dir = tmp_path / "run"
    train(RunConfig(model=model, data=DataConfig(val_fraction=0.1), train=t, inputs=[str(text_file)]), run_dir,
          log=lambda *_: None)
    code, out, err = run(["convert", str(run_dir), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is transformers.Qwen3MoeForCausalLM and hf.config.num_experts == 4
    ours, _ = load_any(run_dir)
    assert_same_model(ours, hf, vocab=50257)
    back, _ = load_any(tmp_path / "hf")
    assert back.cfg == ours.cfg
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())


def test_export_refusals_name_the_setting(tmp_path):
    base = dict(vocab_size=V, emb_dim=32, n_heads=4, n_layers=1, n_experts=2)
    with pytest.raises(WeightsError, match="qk_norm false"):
        to_hf(Llama(LlamaConfig(**base)), tmp_path / "a")
    with pytest.raises(WeightsError, match="router_balance bias"):
        to_hf(Llama(LlamaConfig(**base, qk_norm=True, router_balance="bias")), tmp_path / "b")


def test_cli_train_init_from_qwen3_moe_keeps_its_experts(tmp_path, text_file, capsys):
    hf = hf_moe(vocab_size=50257, norm_topk_prob=True)
    hf.save_pretrained(tmp_path / "hf")
    code, out, err = run(["train", str(text_file), "--init-from", str(tmp_path / "hf"), "--max-steps", "2",
                          "--batch-size", "2", "--context-length", "16", "--eval-every", "2", "--eval-batches", "1",
                          "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
                         capsys)
    assert code == 0, err
    assert "2 of 4 experts per token" in out
    model, _ = load_any(tmp_path / "run")
    assert (model.cfg.n_experts, model.cfg.experts_per_token, model.cfg.moe_intermediate_size) == (4, 2, 48)
    src = hf.model.layers[0].mlp.experts.down_proj[3].detach()  # transformers 5 holds the experts stacked
    assert 0 < (model.layers[0].mlp.experts[3].down_proj.weight - src).abs().max() < 5e-2  # two steps away
    code, out, err = run(["train", str(text_file), "--init-from", str(tmp_path / "hf"), "--n-experts", "8",
                          "--out", str(tmp_path / "bad")], capsys)
    assert code == 1 and "--n-experts 8: the model in" in err
