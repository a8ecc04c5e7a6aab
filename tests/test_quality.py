"""Recipes, --init torch, and `gptforge bench quality` / benchmarks/time_to_quality.py (quick mode)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from clirun import run

from gptforge.config import ConfigError
from gptforge.models import build
from gptforge.models.gpt2 import GPTConfig
from gptforge.models.layers import torch_default_init
from gptforge.models.llama import LlamaConfig
from gptforge.quality import block_params, gpt2_block_params, matched_llama_shape, split_holdout
from gptforge.training.config import resolve_train_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from time_to_quality import time_to_reach  # noqa: E402


def test_holdout_keeps_every_character_and_holds_out_whole_documents():
    docs = [f"document {i} " * (10 + i) for i in range(10)]
    train, held = split_holdout(docs, 0.25)
    assert train + held == docs
    total = sum(map(len, docs))
    assert sum(map(len, held)) >= 0.25 * total > sum(map(len, held[1:]))  # just enough whole documents
    one = ["first paragraph.\n\nsecond one.\n\nthird and last paragraph, a longer one than the others."]
    train, held = split_holdout(one, 0.5)
    assert train[0] + held[0] == one[0] and held[0].startswith("third")  # cut where a paragraph starts


@pytest.mark.parametrize("emb_dim,head_dim", [(128, 32), (96, 16), (256, 64)])
def test_matched_llama_blocks_have_gpt2_block_weights(emb_dim, head_dim):
    gpt = build(GPTConfig(vocab_size=300, context_length=16, emb_dim=emb_dim, n_heads=emb_dim // head_dim,
                          n_layers=2, qkv_bias=False))
    llama = build(LlamaConfig(vocab_size=300, context_length=16, emb_dim=emb_dim, n_layers=2,
                              **matched_llama_shape(emb_dim, head_dim)))
    gpt_weights = sum(p.numel() for b in gpt.h for p in b.parameters() if p.dim() == 2)
    llama_weights = sum(p.numel() for b in llama.layers for p in b.parameters() if p.dim() == 2)
    assert gpt_weights == 2 * gpt2_block_params(emb_dim)
    assert abs(llama_weights - gpt_weights) / gpt_weights < 0.01
    assert abs(block_params(llama) - block_params(gpt)) / block_params(gpt) < 0.01


def test_torch_init_is_pytorch_module_defaults():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, context_length=16, emb_dim=64, n_heads=4, n_layers=2, tie_weights=False)
    model = build(cfg)
    torch_default_init(model)
    # nn.Embedding: N(0, 1); nn.Linear: U(+-1/sqrt(fan_in)) for weights and biases; LayerNorm: ones, zeros
    assert abs(model.wte.weight.std().item() - 1.0) < 0.05 and abs(model.wpe.weight.std().item() - 1.0) < 0.2
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            assert module.weight.abs().max() <= bound
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # a uniform's std
            if module.bias is not None:
                assert module.bias.abs().max() <= bound and module.bias.abs().max() > 0
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    tied = build(GPTConfig(vocab_size=500, context_length=16, emb_dim=64, n_heads=4, n_layers=2))
    torch_default_init(tied)
    assert tied.lm_head.weight is tied.wte.weight and abs(tied.wte.weight.std().item() - 1.0) < 0.05


def test_torch_init_through_train_config(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world, " * 200)
    cfg, _ = resolve_train_config([str(text)], None, None, "tiny", {"out": str(tmp_path / "r"), "init": "torch"})
    from gptforge.training.state import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, torch.device("cpu"), False, lambda *a: None)
    assert abs(model.wte.weight.std().item() - 1.0) < 0.05  # not GPT-2's 0.02


def test_book_recipe_settings_and_layering(tmp_path):
    text = tmp_path / "the-verdict.txt"
    text.write_text("I HAD always thought Jack Gisburn rather a cheap genius. " * 50)
    cfg, _ = resolve_train_config([str(text)], None, None, None, {"out": str(tmp_path / "r")}, recipe="book")
    t, m = cfg.train, cfg.model
    assert (m.emb_dim, m.n_layers, m.n_heads, m.context_length, m.qkv_bias, m.tie_weights, m.drop_rate) == \
        (768, 12, 12, 256, False, False, 0.1)
    assert (t.lr, t.beta1, t.beta2, t.weight_decay, t.schedule, t.warmup_steps, t.grad_clip, t.init, t.epochs,
            t.batch_size) == (4e-4, 0.9, 0.999, 0.1, "constant", 0, 0.0, "torch", 10, 2)
    assert cfg.recipe == "book" and cfg.to_toml()["recipe"] == "book"
    cfg, _ = resolve_train_config([str(text)], None, None, "tiny", {"out": str(tmp_path / "s"), "lr": 1e-3},
                                  recipe="book")  # a preset and flags win over the recipe
    assert cfg.model.emb_dim == 64 and cfg.train.lr == 1e-3 and cfg.train.beta2 == 0.999
    with pytest.raises(ConfigError, match="recipe 'book' trains a gpt2 model, not --arch llama"):
        resolve_train_config([str(text)], None, None, None, {"out": str(tmp_path / "t")}, arch="llama", recipe="book")


def test_time_to_reach_interpolates_between_points():
    curve = [dict(seconds=10, val_bpb=3.0), dict(seconds=20, val_bpb=2.0), dict(seconds=30, val_bpb=1.5)]
    assert time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert time_to_reach(curve, 3.5) == 10
    assert time_to_reach(curve, 1.0) is None


QUICK = ["--emb-dim", "32", "--n-layers", "1", "--head-dim", "16", "--context-length", "32", "--batch-size", "2",
         "--points", "2", "--minutes", "0.002", "--holdout", "0.005"]


@pytest.mark.parametrize("recipe", ["nanogpt", "modern", "modern-moe"])
def test_bench_quality_reports_held_out_bpb(recipe, tmp_path, capsys):
    extra = ["--tokenizer-vocab", "300"] if recipe.startswith("modern") else []
    code, out, err = run(["bench", "quality", "--recipe", recipe, *QUICK, *extra, "--out", str(tmp_path / "q")],
                         capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"recipe", "minutes", "steps", "tokens", "val_loss", "val_bpb", "device"} <= set(result)
    assert result["recipe"] == recipe and result["steps"] >= 1
    assert result["tokens"] == result["steps"] * 2 * 32
    assert 0 < result["val_bpb"] < 30 and result["curve"][-1]["val_bpb"] == result["val_bpb"]
    best = min(result["curve"], key=lambda point: point["val_bpb"])  # the final and the best along the curve
    assert (result["best_val_bpb"], result["best_seconds"], result["best_step"]) == \
        (best["val_bpb"], best["seconds"], best["step"])
    # the held-out text is the same whatever the recipe: the last documents of the built-in corpus
    held = sorted((tmp_path / "q" / "heldout").iterdir())
    assert held and held[-1].read_text() .strip()


def test_time_to_quality_quick_mode_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--quick",
                           "--recipes", "nanogpt", "modern"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    corpus = result["corpora"][0]
    assert set(corpus["final_bpb"]) == set(corpus["best_bpb"]) == {"nanogpt", "modern"}
    assert "modern_vs_nanogpt_bpb" in corpus and "modern_vs_nanogpt_best_bpb" in corpus
    assert all(corpus["best_bpb"][r] <= corpus["final_bpb"][r] for r in ("nanogpt", "modern"))
