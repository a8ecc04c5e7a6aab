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


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    lrs = [lr_at(s, 1.0, 0.1, 2, 20, "wsd", 0.25) for s in range(22)]
    assert lrs[:2] == [0.5, 1.0]  # warmup
    assert lrs[2:15] == [1.0] * 13  # stable until the last 25% (5 steps: 15..19)
    assert lrs[15:20] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])  # linear, min_lr at the last step
    assert lrs[20:] == [0.1, 0.1]
    # extended to 40 steps: still stable where the 20-step run was decaying
    assert [lr_at(s, 1.0, 0.1, 2, 40, "wsd", 0.25) for s in range(15, 30)] == [1.0] * 15
    assert [lr_at(s, 1.0, 0.1, 2, 20, "constant") for s in range(2, 25)] == [1.0] * 23


def test_max_tokens_sets_the_run_length_in_whole_global_batches(text_file, tmp_path):
    from gptforge.config import ConfigError
    from gptforge.training import TrainConfig
    from gptforge.training.state import Schedule

    t = TrainConfig(max_tokens=1000, batch_size=4, grad_accum=2)
    assert Schedule.plan(t, batches_per_epoch=99, tokens_per_step=4 * 2 * 32).total_steps == 4  # 1000 / 256, up
    with pytest.raises(ConfigError, match="--max-steps 5 and --max-tokens 1000 both set the run's length"):
        TrainConfig(max_tokens=1000, max_steps=5)
    with pytest.raises(ConfigError, match="--warmup-steps 9 must not exceed the run's 4 steps"):
        Schedule.plan(TrainConfig(max_tokens=1000, warmup_steps=9), 99, 256)
    with pytest.raises(ConfigError, match="--schedule must be one of cosine, wsd, constant"):
        TrainConfig(schedule="linear")


def test_wsd_run_resumes_bit_for_bit(text_file, tmp_path):
    import json
    import shutil

    from gptforge import checkpoint as ckpt
    from gptforge.data import DataConfig
    from gptforge.models.gpt2 import GPTConfig
    from gptforge.training import RunConfig, TrainConfig, train

    cfg = RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2),
                    data=DataConfig(val_fraction=0.1), inputs=[str(text_file)],
                    train=TrainConfig(batch_size=4, max_tokens=8 * 4 * 32, schedule="wsd", decay_fraction=0.5,
                                      save_every=2, keep_last=0, eval_every=4, eval_batches=2, log_every=1,
                                      sample_tokens=0, seed=5, device="cpu", progress=False))

    def records(run):
        return [(r["step"], r["lr"], r["train_loss"]) for r in map(json.loads, open(run / "metrics.jsonl"))
                if r["event"] == "train"]

    train(cfg, tmp_path / "full", log=lambda *_: None)
    lrs = [lr for _, lr, _ in records(tmp_path / "full")]
    assert len(lrs) == 8 and lrs[1:4] == [cfg.train.lr] * 3 and lrs[-1] == pytest.approx(cfg.train.lr / 10)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for d in ckpt.checkpoint_dirs(tmp_path / "cut"):
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    train(cfg, tmp_path / "cut", resume=True, log=lambda *_: None)
    assert records(tmp_path / "cut") == records(tmp_path / "full")
