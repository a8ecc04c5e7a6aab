import math

import pytest
import torch

from gptforge.models.gpt2 import GPT, GPTConfig
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
    decay, no_decay = param_groups(model.parameters(), 0.1)
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


def assert_resume_from_step_4_is_exact(cfg, tmp_path, records):
    """The run in tmp_path/full, copied with its checkpoints after step 4 removed and resumed, logs the same."""
    import shutil

    from gptforge import checkpoint as ckpt
    from gptforge.training import train

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for d in ckpt.checkpoint_dirs(tmp_path / "cut"):
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    train(cfg, tmp_path / "cut", resume=True, log=lambda *_: None)
    assert records(tmp_path / "cut") == records(tmp_path / "full")


def test_wsd_run_resumes_bit_for_bit(text_file, tmp_path):
    import json

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
    assert_resume_from_step_4_is_exact(cfg, tmp_path, records)


# ----------------------------------------------------------------------------- Muon


def newton_schulz_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's orthogonalisation from its definition: the quintic iteration X <- aX + (bA + cA^2)X, A = XX^T,
    from X = G / |G|_F on the wide orientation, in float64 (torch computes it in bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / max(x.norm(), 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


def muon_reference_step(p, g, buf, lr, momentum, weight_decay, nesterov=True):
    """One Muon step from the definition: buf = mu buf + (1 - mu) g; Nesterov: (1 - mu) g + mu buf;
    p <- p (1 - lr wd) - lr sqrt(max(1, rows / cols)) NS(update)."""
    buf = momentum * buf + (1 - momentum) * g
    update = (1 - momentum) * g + momentum * buf if nesterov else buf
    scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
    return p * (1 - lr * weight_decay) - lr * scale * newton_schulz_reference(update).to(p.dtype), buf


def test_muon_step_is_torch_muon_and_its_definition():
    from gptforge.training.optim import Muon

    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16)]  # tall (lr x sqrt(3)), wide, square
    params = [torch.randn(s) for s in shapes]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    refs, bufs = [p.clone() for p in params], [torch.zeros(s) for s in shapes]
    wrong, wrong_bufs = [p.clone() for p in params], [torch.zeros(s) for s in shapes]  # without Nesterov
    kwargs = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    opt_ours, opt_theirs = Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for group, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
        for i, g in enumerate(grads):
            refs[i], bufs[i] = muon_reference_step(refs[i], g, bufs[i], **kwargs)
            wrong[i], wrong_bufs[i] = muon_reference_step(wrong[i], g, wrong_bufs[i], nesterov=False, **kwargs)
        for a, b, r in zip(ours, theirs, refs):
            assert torch.equal(a, b)  # torch's own Muon, bit for bit
            torch.testing.assert_close(a.detach(), r, rtol=0, atol=1e-3)  # bf16 iteration vs float64
    # the tolerance has teeth: classical momentum (no Nesterov) misses it
    assert all((a.detach() - w).abs().max() > 3e-3 for a, w in zip(ours, wrong))


def test_muon_takes_the_blocks_matrices_adamw_the_rest():
    from gptforge.models import build, get_spec
    from gptforge.training import TrainConfig
    from gptforge.training.optim import Combined, build_optimizer, describe_optimizer

    gpt2 = [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    llama = [f"layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    cases = [("tiny", {"n_layers": 2}, gpt2, ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]),
             ("llama-tiny", {"n_layers": 2, "qk_norm": True}, llama, ["embed_tokens.weight", "norm.weight"]),
             ("llama-tiny", {"n_layers": 2, "tie_weights": False}, llama,
              ["embed_tokens.weight", "norm.weight", "lm_head.weight"])]
    for preset, changes, matrices, outside in cases:
        spec = get_spec("gpt2" if preset == "tiny" else "llama")
        model = build(spec.config_class(**{**spec.presets[preset], **changes}))
        opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
        assert isinstance(opt, Combined) and isinstance(opt.optimizers["muon"], torch.optim.Muon)
        names = {id(p): name for name, p in model.named_parameters()}
        muon = [names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]]
        adamw = [names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]]
        assert sorted(muon) == sorted(matrices), preset
        assert set(outside) <= set(adamw) and len(muon) + len(adamw) == len(names)  # each parameter once
        assert all(name.endswith((".bias", "norm.weight", "ln_1.weight", "ln_2.weight")) or name in outside
                   for name in adamw), adamw
        n_muon = sum(p.numel() for name, p in model.named_parameters() if name in matrices)
        line = describe_optimizer(opt, 4e-4)
        assert line.startswith(f"optimizer: muon for {len(matrices)} matrices (") and "lr 0.02), adamw for " \
            f"{len(adamw)} tensors (" in line and line.endswith("parameters, lr 0.0004)")
        assert f"{n_muon / 1e3:.1f}K parameters" in line or f"{n_muon / 1e6:.1f}M parameters" in line


def test_the_schedule_scales_each_part_from_its_own_peak():
    from gptforge.training import TrainConfig
    from gptforge.training.optim import build_optimizer, set_lr

    opt = build_optimizer(GPT(GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2)),
                          TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), torch.device("cpu"))
    set_lr(opt, 5e-4)  # half the peak
    assert [g["lr"] for g in opt.optimizers["adamw"].param_groups] == [5e-4, 5e-4]
    assert [g["lr"] for g in opt.optimizers["muon"].param_groups] == [pytest.approx(0.025, rel=1e-12)]
    assert len(opt.param_groups) == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.025, rel=1e-12)


def test_weight_decay_on_all_decays_norms_and_biases_as_adamw_over_all_parameters(tiny_cfg):
    from gptforge.training.optim import make_optimizer

    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    twins = {on: GPT(tiny_cfg) for on in ("matrices", "all", "torch")}
    for twin in twins.values():
        twin.load_state_dict(model.state_dict())
    opts = {on: make_optimizer(twins[on], 1e-2, 0.5, (0.9, 0.95), torch.device("cpu"), on)
            for on in ("matrices", "all")}
    opts["torch"] = torch.optim.AdamW(twins["torch"].parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.5,
                                      fused=True)
    for on, twin in twins.items():
        for p in twin.parameters():
            p.grad = torch.zeros_like(p)  # no gradient: the step is the decay alone
        opts[on].step()
    before = dict(model.named_parameters())
    for name, p in twins["all"].named_parameters():
        assert torch.equal(p, dict(twins["torch"].named_parameters())[name])  # as torch decays all parameters
        assert torch.allclose(p, before[name] * (1 - 1e-2 * 0.5))
        kept = dict(twins["matrices"].named_parameters())[name]
        assert torch.equal(kept, before[name]) == (p.dim() < 2)  # matrices only: norms and biases kept
    with pytest.raises(Exception, match="--weight-decay-on must be one of matrices, all"):
        from gptforge.training import TrainConfig

        TrainConfig(weight_decay_on="none")


def test_combined_optimizer_under_the_fp16_grad_scaler(tiny_cfg):
    """GradScaler's unscale_ / step / update and clipping (Precision) see the Combined optimizer as one: its
    update equals the parts stepped on the unscaled gradients, and an overflow skips every part."""
    from gptforge.training import TrainConfig
    from gptforge.training.optim import build_optimizer
    from gptforge.training.step import Precision

    torch.manual_seed(0)
    models = [GPT(tiny_cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    t, cpu = TrainConfig(optimizer="muon"), torch.device("cpu")
    opts = [build_optimizer(m, t, cpu) for m in models]
    amp = Precision("fp16", cpu)
    assert amp.scaler.is_enabled()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    for _ in range(2):
        for i, m in enumerate(models):
            loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten())
            (amp.scaler.scale(loss) if i == 0 else loss).backward()
        norm = amp.clip(models[0], opts[0], 0.5)
        assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.5)), rel=1e-5)
        amp.update(opts[0])
        opts[1].step()
        for o in opts:
            o.zero_grad()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    scale = amp.scaler.get_scale()
    before = [p.clone() for p in models[0].parameters()]
    for p in models[0].parameters():
        p.grad = torch.full_like(p, float("inf"))
    amp.clip(models[0], opts[0], 0.5)
    amp.update(opts[0])  # skipped: no part moves, the scale halves
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), before))
    assert amp.scaler.get_scale() == scale / 2


def test_muon_needs_a_torch_that_has_it(monkeypatch):
    from gptforge.config import ConfigError
    from gptforge.training.optim import check_optimizer

    check_optimizer("muon")
    monkeypatch.delattr(torch.optim, "Muon")
    check_optimizer("adamw")
    with pytest.raises(ConfigError, match=r"--optimizer muon needs torch.optim.Muon \(torch 2.9 or newer\)"):
        check_optimizer("muon")


def test_muon_run_resumes_bit_for_bit_and_keeps_its_optimizer(text_file, tmp_path):
    import json

    from gptforge import checkpoint as ckpt
    from gptforge.config import ConfigError
    from gptforge.data import DataConfig
    from gptforge.models.gpt2 import GPTConfig
    from gptforge.training import RunConfig, TrainConfig, train

    cfg = RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2),
                    data=DataConfig(val_fraction=0.1), inputs=[str(text_file)],
                    train=TrainConfig(batch_size=4, max_steps=8, schedule="wsd", decay_fraction=0.5, optimizer="muon",
                                      weight_decay_on="all", save_every=2, keep_last=0, eval_every=4, eval_batches=2,
                                      log_every=1, sample_tokens=0, seed=5, device="cpu", progress=False))

    def records(run):
        return [(r["step"], r["lr"], r["train_loss"], r["grad_norm"])
                for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == "train"]

    lines = []
    train(cfg, tmp_path / "full", log=lines.append)
    assert any(line.startswith("optimizer: muon for 8 matrices") for line in lines)
    assert_resume_from_step_4_is_exact(cfg, tmp_path, records)
    state = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "full"))
    assert state["optimizer_kind"] == "muon" and set(state["optimizer"]) == {"muon", "adamw"}
    assert len(state["optimizer"]["muon"]["state"]) == 8  # a momentum buffer per matrix
    cfg.train.optimizer = "adamw"
    with pytest.raises(ConfigError, match="the run trains with --optimizer muon .* resume with --optimizer muon"):
        train(cfg, tmp_path / "cut", resume=True, log=lambda *_: None)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_resumed_optimizer_keeps_the_settings_it_was_built_with(tiny_cfg, kind):
    """Moments and step counts come from the checkpoint; weight decay, betas and momentum from the resumed run's
    config (a flag changed on --resume takes effect instead of being silently replaced by the saved one)."""
    from gptforge.distributed import load_optimizer_state
    from gptforge.training import TrainConfig
    from gptforge.training.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    before = TrainConfig(optimizer=kind, weight_decay=0.1, beta2=0.95, muon_momentum=0.95, muon_weight_decay=0.01)
    opt = build_optimizer(model, before, torch.device("cpu"))
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 2, 8))
    model(x, targets=y).backward()
    opt.step()
    saved = opt.state_dict()
    after = TrainConfig(optimizer=kind, weight_decay=0.3, beta2=0.99, muon_momentum=0.9, muon_weight_decay=0.05)
    resumed = build_optimizer(model, after, torch.device("cpu"))
    load_optimizer_state(model, resumed, saved)
    wanted = build_optimizer(model, after, torch.device("cpu")).param_groups
    assert [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in wanted]
    for p in model.parameters():  # the moments are the checkpoint's
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[p][key], value)
