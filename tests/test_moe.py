"""The llama family's mixture-of-experts layer: routing and the load-balancing loss by hand, the sorted dispatch
against a per-expert loop written here, minimind's parameter counts, and training through the CLI."""

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from clirun import run

from gptforge import checkpoint as ckpt
from gptforge.config import ConfigError
from gptforge.data import DataConfig
from gptforge.distributed import checkpoint_blocks
from gptforge.generate import SampleConfig, generate
from gptforge.models import get_spec, preset_arch
from gptforge.models.llama import PRESETS, Llama, LlamaConfig
from gptforge.models.moe import MoE, dispatch, load_balancing_loss, route
from gptforge.runs.report import load_runs, render
from gptforge.training import RunConfig, TrainConfig, train
from gptforge.training.experts import CollapseWatch
from gptforge.training.optim import hidden_matrices
from gptforge.weights import load_any

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

# four tokens, three experts: fixed router logits whose softmax and top-2 are worked out by hand below
LOGITS = torch.tensor([[2.0, 1.0, 0.0],
                       [0.0, 3.0, 1.0],
                       [1.0, 1.5, 2.0],
                       [0.5, 0.0, -0.5]])


def softmax_by_hand(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_router_chooses_the_top_k_probabilities_and_renormalises_them():
    probs, chosen, weights = route(LOGITS, 2, norm_topk_prob=True)
    by_hand = [softmax_by_hand(r) for r in LOGITS.tolist()]
    torch.testing.assert_close(probs, torch.tensor(by_hand))
    assert chosen.tolist() == [[0, 1], [1, 2], [2, 1], [0, 1]]
    for n, (a, b) in enumerate(chosen.tolist()):
        pa, pb = by_hand[n][a], by_hand[n][b]
        torch.testing.assert_close(weights[n], torch.tensor([pa / (pa + pb), pb / (pa + pb)]))
    _, _, raw = route(LOGITS, 2, norm_topk_prob=False)
    torch.testing.assert_close(raw, probs.gather(1, chosen))  # without renormalising: the probabilities
    _, top1, w1 = route(LOGITS, 1, norm_topk_prob=True)
    assert top1.flatten().tolist() == [0, 1, 2, 0] and torch.equal(w1, torch.ones(4, 1))


def test_bias_changes_the_choice_but_not_the_weights():
    bias = torch.tensor([0.0, 0.0, 1.0])  # expert 2 wins every top-1 choice
    probs, chosen, weights = route(LOGITS, 1, norm_topk_prob=False, bias=bias)
    assert chosen.flatten().tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(weights.flatten(), probs[:, 2])  # weights are the unbiased probabilities


def test_load_balancing_loss_is_minimind_formula_by_hand():
    probs, chosen, _ = route(LOGITS, 2, norm_topk_prob=True)
    by_hand = [softmax_by_hand(r) for r in LOGITS.tolist()]
    # routed slots per token: expert 0 twice, expert 1 four times, expert 2 twice, over 4 tokens
    f = [2 / 4, 4 / 4, 2 / 4]
    p_mean = [sum(r[e] for r in by_hand) / 4 for e in range(3)]
    want = 0.01 * 3 * sum(fe * pe for fe, pe in zip(f, p_mean))
    assert load_balancing_loss(probs, chosen, 0.01).item() == pytest.approx(want, rel=1e-6)
    # minimind's own expression: one_hot(topk_idx).float().mean(0) * scores.mean(0), summed, times E and coef
    minimind = (F.one_hot(chosen, 3).float().mean(0) * probs.mean(0)).sum() * 3 * 0.01
    torch.testing.assert_close(load_balancing_loss(probs, chosen, 0.01), minimind)


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The per-expert loop minimind runs: each expert on the tokens that chose it, weighted, index-added back."""
    flat = x.reshape(-1, x.size(-1))
    _, chosen, weights = route(layer.gate(flat), layer.k, layer.norm_topk_prob)
    y = torch.zeros_like(flat)
    for e, expert in enumerate(layer.experts):
        token, slot = torch.where(chosen == e)
        y = y.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
    return y.view_as(x)


@pytest.mark.parametrize("k, norm", [(1, True), (2, True), (2, False), (4, False)])
def test_sorted_dispatch_equals_the_per_expert_loop_in_values_and_gradients(k, norm):
    torch.manual_seed(0)
    layer = MoE(32, 48, 4, k, norm_topk_prob=norm, aux_loss_coef=0.0, balance="aux", bias_speed=0.0, drop_rate=0.0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    ours = layer(x)
    grads = torch.autograd.grad(ours.square().sum(), [x, *layer.parameters()])
    ref = naive_moe(layer, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert layer.load.sum().item() == 21 * k


def test_an_expert_no_token_chose_still_gets_a_zero_gradient():
    torch.manual_seed(0)
    layer = MoE(16, 32, 3, 1, norm_topk_prob=True, aux_loss_coef=0.0, balance="aux", bias_speed=0.0, drop_rate=0.0)
    chosen = torch.zeros(5, 1, dtype=torch.long)  # every token to expert 0
    x = torch.randn(5, 16)
    y = dispatch(x, chosen, torch.ones(5, 1), layer.experts, torch.bincount(chosen.flatten(), minlength=3))
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.experts[2].parameters())


def test_bias_moves_towards_equal_load():
    layer = MoE(8, 16, 4, 1, norm_topk_prob=True, aux_loss_coef=0.0, balance="bias", bias_speed=0.01, drop_rate=0.0)
    layer.update_bias(torch.tensor([10, 2, 2, 2]))
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert "expert_bias" in layer.state_dict()  # a buffer: saved with the weights, not trained


def test_model_adds_the_layers_aux_losses_in_training_only():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, emb_dim=32, n_heads=4, n_layers=2, n_experts=4, experts_per_token=2,
                      router_aux_loss_coef=0.1)
    model = Llama(cfg)
    x = torch.randint(0, 50, (2, 8))
    model.train()
    total = model(x, targets=x)
    aux = sum(block.mlp.aux for block in model.layers)
    ce = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    torch.testing.assert_close(total, ce + aux)
    assert aux.item() > 0
    model.eval()
    torch.testing.assert_close(model(x, targets=x), ce)


def test_minimind_3_moe_has_the_parameter_count_of_minimind_code():
    """minimind's code (use_moe=True: 4 experts of 2432, top-1) counts 198,416,640; minimind-3 63,912,192."""
    with torch.device("meta"):
        moe, dense = (Llama(LlamaConfig(**PRESETS[n])) for n in ("minimind-3-moe", "minimind-3"))
    assert moe.num_params() == 198_416_640 and dense.num_params() == 63_912_192
    assert moe.num_params(active=True) == 63_912_192 + 8 * 4 * 768  # one expert and the routers
    assert preset_arch("minimind-3-moe") == "llama"


def test_flops_count_the_active_experts():
    spec = get_spec("llama")
    dense = LlamaConfig(vocab_size=50, emb_dim=32, n_heads=4, n_layers=2, intermediate_size=64)
    moe = LlamaConfig(vocab_size=50, emb_dim=32, n_heads=4, n_layers=2, intermediate_size=64, n_experts=8,
                      experts_per_token=2)
    assert spec.matmul_params(moe) == spec.matmul_params(dense) + 2 * (3 * 32 * 64 + 8 * 32)
    assert spec.flops_per_token(moe, 16) - spec.flops_per_token(dense, 16) == 6 * 2 * (3 * 32 * 64 + 8 * 32)


@pytest.mark.parametrize("values, message", [
    (dict(n_experts=2, experts_per_token=3), "--experts-per-token 3 must be at most --n-experts 2"),
    (dict(n_experts=-1), "--n-experts must be at least 0"),
    (dict(router_balance="sigmoid"), "--router-balance must be one of aux, bias"),
])
def test_bad_expert_settings_are_refused_with_the_flag_named(values, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**values)


def tiny_moe_run(text_file, balance: str, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=5, eval_every=3, eval_batches=1, log_every=1, sample_tokens=0, lr=1e-2,
             warmup_steps=1, seed=3, device="cpu", progress=False, save_every=2, keep_last=0)
    t.update(train_kw)
    model = LlamaConfig(context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, intermediate_size=32,
                        n_experts=4, experts_per_token=2, router_balance=balance, router_aux_loss_coef=0.01,
                        router_bias_speed=0.01, drop_rate=0.1)
    return RunConfig(model=model, data=DataConfig(val_fraction=0.1), train=TrainConfig(**t), inputs=[str(text_file)])


def train_records(run_dir):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == "train"]


@pytest.mark.parametrize("balance, optimizer, checkpoint_format", [("aux", "adamw", "full"), ("bias", "muon", "full"),
                                                                   ("bias", "adamw", "sharded")])
def test_moe_run_logs_expert_load_and_resumes_bit_for_bit(text_file, tmp_path, balance, optimizer, checkpoint_format):
    cfg = tiny_moe_run(text_file, balance, grad_accum=2, optimizer=optimizer, checkpoint_format=checkpoint_format)
    full = tmp_path / "full"
    train(cfg, full, log=lambda *_: None)
    records = train_records(full)
    for r in records:  # per layer, the fraction of the step's routed slots each expert took
        assert len(r["expert_load"]) == 2 and all(len(row) == 4 for row in r["expert_load"])
        assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in r["expert_load"])
        assert ("aux_loss" in r) == (balance == "aux")
    if balance == "aux":  # two layers near balance: about coef · k each
        assert 0.02 < records[0]["aux_loss"] < 0.08
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name.split("-")[1]) > 2:
            shutil.rmtree(d)
    train(cfg, cut, resume=True, log=lambda *_: None)
    assert train_records(cut) == [{**r, "tokens_per_s": r2["tokens_per_s"], "mfu": r2["mfu"]}
                                  for r, r2 in zip(records, train_records(cut))]
    a, b = (load_any(ckpt.latest_checkpoint(r))[0].state_dict() for r in (full, cut))  # full or sharded
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bias = "layers.0.mlp.expert_bias"
    assert (bias in a) == (balance == "bias")
    if balance == "bias":  # moved by the load, not the optimizer: 5 steps of +-speed, an odd multiple of it
        steps = a[bias] / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and (steps.round().abs() % 2 == 1).all()


def test_muon_takes_the_experts_but_not_the_router():
    model = Llama(LlamaConfig(vocab_size=50, emb_dim=32, n_heads=4, n_layers=1, n_experts=3))
    hidden = {id(p) for p in hidden_matrices(model)}
    names = {n for n, p in model.named_parameters() if id(p) in hidden}
    assert "layers.0.mlp.experts.2.down_proj.weight" in names and "layers.0.mlp.gate.weight" not in names
    assert len(names) == 4 + 3 * 3  # q, k, v, o and three matrices of each expert


def tiny_moe(**kw) -> Llama:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, n_experts=4,
               experts_per_token=2, qk_norm=True)
    return Llama(LlamaConfig(**{**cfg, **kw}))


def test_kv_cache_generation_equals_the_uncached_path():
    model = tiny_moe().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.size(0) == 4:  # routers: decisive choices
                p.mul_(50)
    idx = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    sample = SampleConfig(max_new_tokens=12)
    assert generate(model, idx, sample) == generate(model, idx, sample, use_cache=False)


def test_activation_checkpointing_and_document_masks_keep_loss_and_gradients():
    model = tiny_moe(router_aux_loss_coef=0.1).train()
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])

    def loss_and_grads():
        loss = model(x, targets=x) + model(x, targets=x, segments=segments)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    loss, grads = loss_and_grads()
    checkpoint_blocks(model)
    loss2, grads2 = loss_and_grads()
    assert torch.equal(loss, loss2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, rtol=1e-6, atol=1e-7)


def test_cli_trains_a_mixture_of_experts_and_says_its_active_parameters(text_file, tmp_path, capsys):
    code, out, err = run(["train", str(text_file), "--preset", "llama-tiny", "--n-experts", "4",
                          "--experts-per-token", "2", "--moe-intermediate-size", "32", "--no-norm-topk-prob",
                          "--router-balance", "bias", "--context-length", "16", "--max-steps", "2", "--batch-size", "2",
                          "--eval-every", "2", "--sample-tokens", "0", "--device", "cpu", "--no-progress",
                          "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert re.search(r"M parameters \(tied head; [\d.]+M active, 2 of 4 experts per token\)", out), out
    toml = (tmp_path / "run" / "config.toml").read_text()
    assert "n_experts = 4" in toml and 'router_balance = "bias"' in toml and "norm_topk_prob = false" in toml
    code, out, err = run(["eval", str(tmp_path / "run"), str(text_file), "--max-batches", "1", "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["tokens"] > 0, err
    code, out, err = run(["generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    code, out, err = run(["train", str(text_file), "--preset", "llama-tiny", "--n-experts", "2",
                          "--experts-per-token", "3", "--out", str(tmp_path / "bad")], capsys)
    assert code != 0 and err.strip().splitlines() == [
        "gptforge: error: --experts-per-token 3 must be at most --n-experts 2 (each token goes to that many different "
        "experts)"]


def test_a_collapsed_router_gets_one_warning_after_three_evaluations():
    watch = CollapseWatch(experts_per_token=2)
    healthy = [{"event": "train", "expert_load": [[0.25, 0.25, 0.25, 0.25], [0.3, 0.2, 0.3, 0.2]]}]
    collapsed = [{"event": "train", "expert_load": [[0.25, 0.25, 0.25, 0.25], [0.47, 0.43, 0.05, 0.05]]},
                 {"event": "eval", "val_loss": 3.0}]
    seen = [watch.observe(r) for r in (collapsed, collapsed, healthy, collapsed, collapsed, collapsed, collapsed)]
    assert seen[:5] == [None] * 5 and seen[6] is None
    assert seen[5].startswith("warning: the router of layer 1 has collapsed: expert 0 took 94% of its tokens")
    assert CollapseWatch().observe([{"event": "train", "train_loss": 1.0}]) is None  # a dense model


def test_report_plots_the_expert_load(tmp_path):
    run_dir = tmp_path / "moe"
    run_dir.mkdir()
    records = [{"event": "train", "step": s, "tokens": 64 * s, "lr": 1e-3, "train_loss": 5.0 - s / 10,
                "aux_loss": 0.001, "expert_load": [[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = render(load_runs([run_dir]))
    assert "busiest expert" in page and "(aux_loss)" in page
    assert "busiest expert" not in render(load_runs([write_dense_run(tmp_path / "dense")]))


def write_dense_run(run_dir):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "tokens": 64, "train_loss": 5.0})
                                           + "\n")
    return run_dir


def test_block_params_count_the_active_experts():
    """What `plan` and `bench quality` size models by: a mixture of experts' active block parameters."""
    from gptforge.models import block_params
    dense, moe = tiny_moe(n_experts=0), tiny_moe(n_experts=4, experts_per_token=2)
    expert = 3 * 32 * moe.cfg.moe_intermediate_size
    assert moe.cfg.moe_intermediate_size == dense.cfg.intermediate_size  # an expert is the dense MLP's size
    assert block_params(moe) == block_params(dense) + 2 * (expert + 4 * 32)  # per layer 2 experts, not 1, a router


def test_grad_accumulation_equals_the_whole_batch(text_file, tmp_path):
    """--router-balance bias: the loss is the cross-entropy alone, and the bias moves by the step's load over
    all micro-batches, so 2 micro-batches of 2 train as 1 batch of 4. (minimind's aux loss is per micro-batch.)"""
    runs = {}
    for name, batch, accum in (("whole", 4, 1), ("accum", 2, 2)):
        cfg = tiny_moe_run(text_file, "bias", batch_size=batch, grad_accum=accum)
        cfg.model.drop_rate = 0.0
        train(cfg, tmp_path / name, log=lambda *_: None)
        runs[name] = train_records(tmp_path / name)
    for a, b in zip(runs["whole"], runs["accum"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5) and a["expert_load"] == b["expert_load"]


@pytest.mark.slow
def test_compiled_model_gives_the_same_loss_and_gradients():
    model = tiny_moe(router_aux_loss_coef=0.1).train()
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    loss = model(x, targets=x)
    grads = torch.autograd.grad(loss, params)
    compiled = torch.compile(model)
    loss2 = compiled(x, targets=x)
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, torch.autograd.grad(loss2, params)):
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-6)
