import pytest
import torch

from gptforge.models.gpt2 import GPT
from gptforge.training.optim import lr_at, param_groups


def test_warmup_and_cosine_endpoints():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 111
    assert lr_at(0, lr, min_lr, warmup, total) == pytest.approx(lr / warmup)
    assert lr_at(warmup - 1, lr, min_lr, warmup, total) == pytest.approx(lr)
    assert lr_at(warmup, lr, min_lr, warmup, total) == pytest.approx(lr)
    assert lr_at(total - 1, lr, min_lr, warmup, total) == pytest.approx(min_lr)
    assert lr_at(total + 50, lr, min_lr, warmup, total) == pytest.approx(min_lr)
    mid = warmup + (total - 1 - warmup) // 2
    assert lr_at(mid, lr, min_lr, warmup, total) == pytest.approx((lr + min_lr) / 2)
    values = [lr_at(s, lr, min_lr, warmup, total) for s in range(total)]
    assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))  # falling
    assert lr_at(3, lr, min_lr, 0, 1) == min_lr and lr_at(0, lr, min_lr, 0, 1) == lr


def test_weight_decay_only_on_matrices(tiny_cfg):
    model = GPT(tiny_cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # every parameter once, the tied head included once
    names = {id(p): name for name, p in model.named_parameters()}
    matrices = ["wte.weight", "wpe.weight"] + [f"h.{i}.{m}.weight" for i in range(tiny_cfg.n_layers)
                                               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(matrices)  # the tied head is wte itself


def test_optimizer_is_adamw(tiny_cfg):
    from gptforge.training.optim import make_optimizer

    opt = make_optimizer(GPT(tiny_cfg), 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
