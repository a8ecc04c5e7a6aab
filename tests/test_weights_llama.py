"""The llama family's weight formats against transformers' Llama, Qwen2 and Qwen3 as the reference.

Tiny random transformers models are saved in each format gptforge reads (a directory, a safetensors
file, shards, pytorch_model.bin, the hub cache, minimind's fp16 .pth and resume files), loaded through
the production loader, and must give transformers' logits (<= 1e-5, fp32) and greedy tokens;
gptforge-trained llama runs exported with `convert --to hf` load in transformers with no custom code.
"""

import json
import re

import pytest
import torch
from clirun import run
from safetensors.torch import load_file

from gptforge.data import DataConfig
from gptforge.generate import SampleConfig, generate
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.tokenizer import get_tokenizer, train_bpe
from gptforge.training import RunConfig, TrainConfig, train
from gptforge.weights import WeightsError, init_model_config, load_any, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 101
SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model of kind; norms and biases perturbed so that they matter."""
    config_class, model_class = CLASSES[kind]
    torch.manual_seed(seed)
    hf = model_class(config_class(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return hf


def assert_same_model(ours, hf, vocab=V):
    """Equal logits (<= 1e-5, fp32) and identical greedy continuations."""
    ours.eval()
    idx = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)
        want = hf.generate(idx[:1, :4], max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert generate(ours, idx[:1, :4], SampleConfig(max_new_tokens=10))[0] == want


def save(hf, d, fmt: str):
    """hf saved as format fmt under d; returns the SOURCE to give gptforge."""
    if fmt == "bin":  # transformers 5 writes only safetensors: pytorch_model.bin as older versions did
        hf.config.save_pretrained(d)
        torch.save(hf.state_dict(), d / "pytorch_model.bin")  # a tied head stored too
        return d
    hf.save_pretrained(d, max_shard_size="20KB" if fmt == "sharded" else "50GB")
    return d / "model.safetensors" if fmt == "file" else d


# ----------------------------------------------------------------------------- Hugging Face in


@pytest.mark.parametrize("kind, fmt, overrides", [
    ("llama", "dir", dict(rope_theta=500000.0, tie_word_embeddings=False)),
    ("llama", "bin", dict(tie_word_embeddings=True)),
    ("qwen2", "dir", dict(rope_theta=1e6, tie_word_embeddings=True)),
    ("qwen2", "sharded", dict(tie_word_embeddings=False)),
    ("qwen3", "dir", dict(head_dim=24, rope_theta=1e6, tie_word_embeddings=True)),
    ("qwen3", "file", dict(head_dim=16, num_key_value_heads=1, tie_word_embeddings=False)),
    ("qwen3", "sharded", dict(head_dim=24, tie_word_embeddings=True)),
])
def test_hf_llama_qwen2_qwen3_load_with_transformers_logits(tmp_path, kind, fmt, overrides):
    hf = hf_model(kind, **overrides)
    source = save(hf, tmp_path, fmt)
    if fmt == "sharded":
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, meta = load_any(source)
    cfg = model.cfg
    assert isinstance(model, Llama) and meta["format"] == "hf" and "tokenizer" not in meta
    assert (cfg.qk_norm, cfg.qkv_bias) == (kind == "qwen3", kind == "qwen2")
    assert cfg.tie_weights == hf.config.tie_word_embeddings and cfg.context_length == 64
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim
    assert_same_model(model, hf)
    if fmt == "bin":  # the file itself: Hugging Face names with the config.json beside them
        assert load_any(tmp_path / "pytorch_model.bin")[0].cfg == cfg


def test_rope_theta_in_every_spelling_of_config_json(tmp_path):
    """transformers 5's rope_parameters, 4's top-level rope_theta and rope_scaling: null, and the dict winning."""
    hf = hf_model("llama", rope_theta=123456.0)
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("rope_parameters")
    for extra in ({"rope_theta": 123456.0, "rope_scaling": None},
                  {"rope_theta": 1.0, "rope_scaling": {"rope_type": "default", "rope_theta": 123456.0}},
                  {"rope_theta": 1.0, "rope_parameters": {"type": "default", "rope_theta": 123456.0}}):
        (tmp_path / "config.json").write_text(json.dumps({**conf, **extra}))
        assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 123456.0
        assert load_any(tmp_path)[0].cfg.rope_theta == 123456.0


def test_hub_id_from_the_cache_offline_with_its_tokenizer(tmp_path, monkeypatch):
    """A sharded Qwen3 in huggingface_hub's cache layout; its tokenizer.json becomes the source's tokenizer."""
    from huggingface_hub import constants

    hf = hf_model("qwen3", head_dim=24, tie_word_embeddings=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-qwen3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    hf.save_pretrained(snapshot, max_shard_size="20KB")
    bpe = train_bpe(["one two three four five six seven"] * 3, vocab_size=300)
    (snapshot / "tokenizer.json").write_text(bpe.json)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, meta = load_any("someone/tiny-qwen3")
    assert meta["format"] == "hub" and meta["tokenizer"] == str(snapshot / "tokenizer.json")
    assert_same_model(model, hf)


# ----------------------------------------------------------------------------- minimind's .pth files


def fp16_rounded(hf):
    """hf with every weight rounded to fp16 (as minimind saves them) and kept in fp32."""
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    return hf


@pytest.mark.parametrize("wrap", ["bare", "resume"])
def test_minimind_fp16_state_dict_and_resume_file(tmp_path, wrap):
    """minimind-3's naming: Qwen3 names with model., QK-norm, a tied head saved twice, rope 1e6, eps 1e-6."""
    hf = hf_model("qwen3", head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    sd = {k: v.half() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in sd and sd["lm_head.weight"].dtype == torch.float16
    obj = sd if wrap == "bare" else {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4}]},
                                     "epoch": 0, "step": 3, "world_size": 1, "wandb_id": None,
                                     "scaler": {"scale": 65536.0, "growth_factor": 2.0}}
    torch.save(obj, tmp_path / "pretrain_64.pth")
    model, meta = load_any(tmp_path / "pretrain_64.pth")
    cfg = model.cfg
    assert meta["format"] == "minimind" and meta["n_heads"] == "4"
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.tie_weights) == (4, 2, 16, True, True)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.context_length, cfg.intermediate_size) == (1e6, 1e-6, 512, 96)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_model(model, fp16_rounded(hf))


def test_minimind2_state_dict_needs_the_head_count(tmp_path, capsys):
    """MiniMind2: Llama names without QK-norm, eps 1e-5; the head count is not in the tensors."""
    hf = hf_model("llama", rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.save({k: v.half() for k, v in hf.state_dict().items()}, tmp_path / "pretrain_512.pth")
    capsys.readouterr()
    code, out, err = run(["convert", str(tmp_path / "pretrain_512.pth"), "--to", "gptforge", str(tmp_path / "g")],
                         capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pretrain_512.pth: the number of attention heads is not stored" in err and "--n-heads N" in err
    model, meta = load_any(tmp_path / "pretrain_512.pth", n_heads=4)
    assert (model.cfg.n_kv_heads, model.cfg.norm_eps, model.cfg.qk_norm) == (2, 1e-5, False)
    assert_same_model(model, fp16_rounded(hf))
    code, out, err = run(["convert", str(tmp_path / "pretrain_512.pth"), "--to", "gptforge", str(tmp_path / "g"),
                          "--n-heads", "4"], capsys)  # a .pth carries no tokenizer: convert asks for one
    assert code == 1 and "pretrain_512.pth: carries no tokenizer; pass --tokenizer" in err, err
    assert not (tmp_path / "g").exists()  # refused before anything was written


def test_gptforge_names_untied_fp32_state_dict(tmp_path):
    """A state dict of gptforge's own Llama (no model. prefix), untied head, q/k/v bias, compiled-prefix keys."""
    cfg = LlamaConfig(vocab_size=V, emb_dim=64, n_heads=4, n_kv_heads=4, n_layers=2, intermediate_size=96,
                      qkv_bias=True, tie_weights=False, context_length=512, rope_theta=1e6, norm_eps=1e-5)
    torch.manual_seed(1)
    ours = Llama(cfg).eval()
    torch.save({"_orig_mod." + k: v for k, v in ours.state_dict().items()}, tmp_path / "model.pth")
    model, _ = load_any(tmp_path / "model.pth", n_heads=4)
    assert model.cfg == cfg
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- refusals, one line each


def cli_error(capsys, source) -> str:
    capsys.readouterr()  # transformers' progress bar from saving the source
    code, out, err = run(["convert", str(source), "--to", "gptforge", str(source.parent / "out")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind, key, value, message", [
    ("llama", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
     "rope_scaling.rope_type is 'yarn'"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
     "rope_parameters.rope_type is 'llama3'"),
    ("qwen3", "rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.type is 'linear'"),
    ("llama", "hidden_act", "gelu", "hidden_act is 'gelu'"),
    ("qwen2", "use_sliding_window", True, "use_sliding_window is true"),
    ("qwen3", "layer_types", ["sliding_attention", "full_attention"], "layer_types holds 'sliding_attention'"),
    ("qwen2", "num_experts", 4, "num_experts is 4"),
    ("llama", "num_local_experts", 8, "num_local_experts is 8"),
    ("llama", "mlp_bias", True, "mlp_bias is true"),
    ("llama", "attention_bias", True, "attention_bias is true, which puts a bias on o_proj too"),
])
def test_configs_gptforge_cannot_compute_are_refused_by_key(tmp_path, capsys, kind, key, value, message):
    hf_model(kind).save_pretrained(tmp_path / "src")
    conf = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**conf, key: value}))
    err = cli_error(capsys, tmp_path / "src")
    assert "config.json: " + message in err


def test_partial_and_foreign_state_dicts_are_refused(tmp_path, capsys):
    sd = {k: v.half() for k, v in hf_model("qwen3", head_dim=16).state_dict().items()}
    torch.save({k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"}, tmp_path / "partial.pth")
    err = cli_error(capsys, tmp_path / "partial.pth")
    assert "partial.pth: tensor 'model.layers.1.mlp.down_proj.weight' is missing (expected shape (64, 96))" in err
    torch.save({k: v for k, v in sd.items() if ".layers.0.mlp." not in k}, tmp_path / "nomlp.pth")
    assert "'model.layers.0.mlp.gate_proj.weight' is missing: a partial" in cli_error(capsys, tmp_path / "nomlp.pth")
    moe = {**sd, "model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(96, 64, dtype=torch.float16)}
    torch.save(moe, tmp_path / "moe.pth")
    assert "'model.layers.0.mlp.gate.weight' is missing" in cli_error(capsys, tmp_path / "moe.pth")  # a partial MoE
    torch.save({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, tmp_path / "obias.pth")
    assert "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'" in cli_error(capsys, tmp_path / "obias.pth")


# ----------------------------------------------------------------------------- gptforge runs out to transformers


def tiny_run(text_file, out, tokenizer="gpt2", **model_kw):
    vocab = get_tokenizer(tokenizer).vocab_size
    model = LlamaConfig(vocab_size=vocab, context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                        drop_rate=0.1, **model_kw)
    t = TrainConfig(batch_size=4, max_steps=3, eval_every=3, eval_batches=1, log_every=1, sample_tokens=2, lr=2e-3,
                    warmup_steps=1, seed=5, device="cpu", progress=False)
    train(RunConfig(model=model, data=DataConfig(val_fraction=0.1, tokenizer=str(tokenizer)), train=t,
                    inputs=[str(text_file)]), out, log=lambda *_: None)
    return out


def test_trained_run_exports_to_qwen3_with_its_tokenizer(tmp_path, text_file, capsys):
    """QK-norm on: Qwen3ForCausalLM, loaded with no custom code; the BPE loads in AutoTokenizer with the same ids."""
    bpe = train_bpe(text_file.read_text().split("\n\n"), vocab_size=300)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(bpe.json)
    run_dir = tiny_run(text_file, tmp_path / "run", tmp_path / "tok" / "tokenizer.json", qk_norm=True)
    code, out, err = run(["convert", str(run_dir), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["Qwen3ForCausalLM"] and conf["head_dim"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is transformers.Qwen3ForCausalLM and hf.config.rope_parameters["rope_theta"] == 1e6
    ours, meta = load_any(run_dir)
    assert_same_model(ours, hf, vocab=300)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sentence = "Every effort moves you, and the module's statements run."
    assert tok(sentence)["input_ids"] == bpe.encode(sentence) and tok.eos_token == "<|endoftext|>"
    back, meta = load_any(tmp_path / "hf")  # and back: the same config and weights, exactly
    assert back.cfg == ours.cfg and meta["tokenizer"] == str(tmp_path / "hf" / "tokenizer.json")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    code, out, err = run(["generate", str(tmp_path / "hf"), "--prompt", "Every", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", str(tmp_path / "hf"), str(text_file), "--max-batches", "1", "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["tokens"] > 0, err


def test_trained_run_exports_to_llama_and_qwen2(tmp_path, text_file, capsys):
    """QK-norm off: LlamaForCausalLM (GPT-2 tokenizer, untied); with a q/k/v bias: Qwen2ForCausalLM."""
    run_dir = tiny_run(text_file, tmp_path / "run", tie_weights=False, rope_theta=10000.0, norm_eps=1e-5)
    code, out, err = run(["convert", str(run_dir), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is transformers.LlamaForCausalLM and "lm_head.weight" in load_file(tmp_path / "hf" /
                                                                                        "model.safetensors")
    ours, _ = load_any(run_dir)
    assert_same_model(ours, hf, vocab=50257)
    back, meta = load_any(tmp_path / "hf")
    assert back.cfg == ours.cfg and meta["tokenizer"] == "gpt2"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("Hello world")["input_ids"] == [15496, 995]

    cfg = LlamaConfig(vocab_size=V, context_length=48, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, qkv_bias=True)
    torch.manual_seed(2)
    qwen2 = Llama(cfg).eval()
    to_hf(qwen2, tmp_path / "qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    assert type(hf) is transformers.Qwen2ForCausalLM and "lm_head.weight" not in load_file(tmp_path / "qwen2" /
                                                                                            "model.safetensors")
    assert_same_model(qwen2, hf)
    both = Llama(LlamaConfig(vocab_size=V, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=True, qk_norm=True))
    with pytest.raises(WeightsError, match="both qk_norm and qkv_bias has no transformers class"):
        to_hf(both, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_init_from_a_rotary_source_keeps_its_shape_and_takes_any_length(tmp_path):
    hf_model("qwen3", head_dim=24).save_pretrained(tmp_path)
    cfg = init_model_config(str(tmp_path), {"context_length": 256, "drop_rate": 0.1})
    assert (cfg.context_length, cfg.drop_rate, cfg.head_dim, cfg.qk_norm) == (256, 0.1, 24, True)  # above its 64
    with pytest.raises(Exception, match=re.escape("--n-kv-heads 4: the model in") + ".*only --context-length may "
                                        "change"):
        init_model_config(str(tmp_path), {"n_kv_heads": 4})
    model, _ = load_any(tmp_path, context_length=256)
    assert model.cfg.context_length == 256


def test_cli_train_init_from_a_minimind_pth(tmp_path, text_file, capsys):
    hf = hf_model("qwen3", head_dim=16, vocab_size=50257, tie_word_embeddings=True)
    torch.save({k: v.half() for k, v in hf.state_dict().items()}, tmp_path / "full_sft_64.pth")
    capsys.readouterr()
    code, out, err = run(["train", str(text_file), "--init-from", str(tmp_path / "full_sft_64.pth"), "--max-steps", "2",
                          "--batch-size", "2", "--context-length", "24", "--eval-every", "2", "--eval-batches", "1",
                          "--sample-tokens", "2", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
                         capsys)
    assert code == 0, err
    model, _ = load_any(tmp_path / "run")
    cfg = model.cfg
    assert (cfg.context_length, cfg.head_dim, cfg.qk_norm, cfg.rope_theta) == (24, 16, True, 1e6)
    src = hf.model.embed_tokens.weight.detach().half().float()
    assert 0 < (model.embed_tokens.weight - src).abs().max() < 5e-3  # two small steps away from the source
