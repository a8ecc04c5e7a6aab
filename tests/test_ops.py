"""The CPU training kernels (ops.py) against PyTorch's own ops, and the model using them against fp64."""

import math
import resource

import pytest
import torch
import torch.nn.functional as F

from gptforge import ops
from gptforge.models import build, get_spec, with_cpu_kernels
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.perf import keep_freed_cpu_memory


@pytest.mark.parametrize("vocab,rows,n", [(50257, 50257, 37), (1000, 1024, 16), (97, 97, 5)])
def test_head_cross_entropy_equals_cross_entropy(vocab, rows, n):
    g = torch.Generator().manual_seed(vocab)
    h = torch.randn(n, 24, generator=g, requires_grad=True)
    w = (torch.randn(rows, 24, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    loss = ops.head_cross_entropy(h, w, y, vocab)
    (loss * 2.5).backward()  # a non-unit upstream gradient
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref[:vocab].t(), y)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(w.grad[vocab:] == 0)  # padding rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(ops.head_cross_entropy(h, w, y, vocab), ref.detach(), rtol=1e-6, atol=1e-5)


def test_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    x = torch.full((400, 1000), 2.0, requires_grad=True)
    out = ops.dropout(x, 0.1, True)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.9) < 5 * math.sqrt(0.9 * 0.1 / x.numel())  # within 5 sigma of Binomial(n, 0.9)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(2.0 / 0.9)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach() / 2.0)  # d(out)/dx is the scaled mask
    assert ops.dropout(x, 0.1, False) is x and ops.dropout(x, 0.0, True) is x


def test_causal_attention_is_sdpa_with_the_drawn_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = ops.causal_attention(q, k, v, 0.2)
    torch.manual_seed(5)
    keep = (torch.rand(6, 16, 16) >= 0.2).view(2, 3, 16, 16)  # the mask the kernel drew
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(torch.ones(16, 16).triu(1).bool(), -math.inf)
    ref = (weights.softmax(-1) * keep / 0.8) @ v
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ops.causal_attention(q, k, v, 0.0),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("pad_vocab", [False, True])
def test_model_loss_and_gradients_match_fp64_reference(pad_vocab):
    """The fp32 CPU path (fused head loss, sparse tied embedding gradient, own attention) against the
    same model in fp64, which runs PyTorch's plain ops (embedding, SDPA, cross_entropy) throughout."""
    cfg = GPTConfig(vocab_size=211, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    pad_vocab=pad_vocab)
    torch.manual_seed(0)
    model = with_cpu_kernels(GPT(cfg))
    ref = GPT(cfg).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 211, (3, 16)), torch.randint(0, 211, (3, 16))
    assert ops.use_cpu_kernels(model.wte.weight) and not ops.use_cpu_kernels(ref.wte.weight)
    loss = model(x, targets=y)
    loss.backward()
    ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad.float(), rtol=1e-4, atol=1e-6, msg=name)
    assert not grads["wte.weight"].grad.is_sparse
    model.eval()  # eval: the same loss without gradients
    with torch.no_grad():
        assert abs(model(x, targets=y).item() - ref_loss.item()) < 1e-5


def test_keep_freed_cpu_memory_reuses_pages():
    if not keep_freed_cpu_memory():
        pytest.skip("glibc malloc not available here")

    def faults_of_touching_64mb() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 * 2**20)  # 64 MB, written, then freed
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [faults_of_touching_64mb() for _ in range(8)]  # the first ones may still grow the heap
    assert sum(faults[-3:]) < 1000, faults  # a fresh mmap each time would fault 3 x 16,384 pages


@pytest.mark.parametrize("out_features,shape,bias", [(50257, (1, 1, 64), False), (96, (3, 2, 64), True),
                                                     (97, (1, 64), True), (64, (20, 64), True)])
def test_linear_few_rows_equals_f_linear(out_features, shape, bias):
    """The split matrix-vector path (decode steps) against F.linear; 97 rows and 20-row inputs fall back."""
    g = torch.Generator().manual_seed(out_features)
    w, x = torch.randn(out_features, 64, generator=g), torch.randn(*shape, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ops.linear(x1, w, b).sum().backward()  # with gradients: F.linear itself, to the bit
    F.linear(x2, w, b).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("nh,nkv,length", [(8, 4, 300), (4, 4, 1), (6, 2, 17)])
def test_decode_attention_equals_sdpa_over_repeated_heads(nh, nkv, length):
    """One query per sequence over grouped keys and values = scaled_dot_product_attention over repeated ones."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(3, nh, 1, 16, generator=g)
    k, v = (torch.randn(3, nkv, length, 16, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1))
    torch.testing.assert_close(ops.decode_attention(q, k, v), want, rtol=1e-5, atol=1e-6)


class FakeClock:
    """A clock whose steps take the seconds a table gives for the current thread count (no real time passes)."""

    def __init__(self, seconds_per_threads: dict[int, float]):
        self.cost, self.now, self.started = seconds_per_threads, 0.0, None

    def __call__(self) -> float:
        if self.started is None:  # the start of a step: its end will be this step's cost later
            self.started = self.now
        else:
            self.now, self.started = self.now + self.cost[torch.get_num_threads()], None
        return self.now


def test_decode_threads_picks_the_faster_and_probes_the_other():
    before = torch.get_num_threads()
    clock = FakeClock({2: 0.010, 1: 0.018})  # a quiet machine: two threads win
    chooser = ops.DecodeThreads(threads=2, probe_every=4, max_interval=16, clock=clock)

    def steps(n: int, threads: int) -> list[int]:  # the indices of the next n steps that ran on `threads`
        first = chooser.steps
        return [first + i for i, t in enumerate([chooser.run(torch.get_num_threads) for _ in range(n)]) if t == threads]

    # both tried first; then probes of one thread 4, 8, 16 and 16 (the most) steps after the one before
    assert steps(50, 1) == [1, 6, 15, 32, 49]
    assert torch.get_num_threads() == before  # the caller's thread count is back after every step
    clock.cost = {2: 0.200, 1: 0.020}  # another process takes a core: two threads now wait
    # step 50 runs on two (the mean of 0.010 and 0.200 already loses to 0.018): one thread from then on,
    # probed 4 steps later, then 8 and 16
    assert steps(40, 2) == [50, 55, 64, 81]
    clock.cost = {2: 0.010, 1: 0.020}  # quiet again: the next probe (step 98) brings two threads back
    assert steps(23, 1) == list(range(90, 98)) + [103, 112]


def test_decode_threads_with_one_thread_never_changes_it():
    chooser = ops.DecodeThreads(threads=1, clock=FakeClock({1: 0.01}))
    assert [chooser.run(torch.get_num_threads) for _ in range(5)] == [1] * 5


@pytest.mark.parametrize("arch,settings", [
    ("gpt2", dict(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, drop_rate=0.0)),
    ("llama", dict(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   intermediate_size=96, qk_norm=True)),
    ("llama", dict(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   intermediate_size=96, n_experts=4, experts_per_token=2, moe_intermediate_size=48)),
])
def test_cached_decoding_gives_the_same_numbers_on_one_and_two_threads(arch, settings):
    """DecodeThreads may switch a step between two threads and one: every logit must be the same bit for bit."""
    from gptforge.generate import new_cache

    torch.manual_seed(0)
    model = build(get_spec(arch).config_class(**settings)).eval()
    idx = torch.randint(0, 300, (2, 5))
    before, runs = torch.get_num_threads(), []
    try:
        for threads in (2, 1):
            torch.set_num_threads(2)  # the prefill runs on the caller's threads: only decode steps switch
            cache, logits = new_cache(model, 2, 30), []
            with torch.no_grad():
                logits.append(model(idx, cache)[:, -1])
                torch.set_num_threads(threads)
                for _ in range(20):
                    logits.append(model(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
            runs.append(torch.stack(logits))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("arch,settings", [
    ("gpt2", dict(vocab_size=300, context_length=32, emb_dim=64, n_layers=2, n_heads=4, drop_rate=0.2,
                  tie_weights=True)),
    ("llama", dict(vocab_size=300, context_length=32, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   intermediate_size=96, drop_rate=0.2, n_experts=4, experts_per_token=2, moe_intermediate_size=48,
                   tie_weights=True)),
])
def test_cpu_kernels_are_swapped_in_from_outside(arch, settings):
    """build() = the family's class + with_cpu_kernels: same parameters and state dict, CPU classes for the layers
    that have kernels, the kernels' numbers (their dropout masks), and plain PyTorch again off the fp32 CPU path."""
    cfg = get_spec(arch).config_class(**settings)
    torch.manual_seed(0)
    plain = get_spec(arch).model_class(cfg)
    torch.manual_seed(0)
    model = build(cfg)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"CPULinear", "CPUDropout", "CPUAttention", "CPUEmbedding"} <= kinds, kinds
    assert not any(n.startswith("CPU") for n in {type(m).__name__ for m in plain.modules()})
    assert (arch == "llama") == ("CPURouter" in kinds)  # subclasses of nn.Linear keep their own class under it
    params = [id(p) for p in model.parameters()]
    assert with_cpu_kernels(model) is model and [id(p) for p in model.parameters()] == params  # twice = once
    assert not any(type(m).__name__.startswith("CPUCPU") for m in model.modules())

    x = torch.randint(0, 300, (2, 16))
    model.train(), plain.train()
    torch.manual_seed(1)
    with_kernels = model(x, targets=x)
    torch.manual_seed(1)
    assert not torch.equal(with_kernels, plain(x, targets=x))  # the kernels draw dropout masks their own way
    drop = next(m for m in model.modules() if type(m).__name__ == "CPUDropout")
    torch.manual_seed(1)
    mask = drop(torch.ones(5000))
    torch.manual_seed(1)
    assert torch.equal(mask, ops.dropout(torch.ones(5000), drop.p, True))
    model.eval(), plain.eval()  # eval in fp64: the CPU kernels stand aside, so both are plain PyTorch to the bit
    assert torch.equal(model.double()(x), plain.double()(x))
