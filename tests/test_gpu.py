"""On a CUDA GPU: the number formats, compile, FlexAttention (backward included), the KV cache, exact resume, pinned
batches, eval / generate / serve, DDP and FSDP2 over nccl. Marked `gpu` (deselected by default: pyproject's addopts
say -m 'not slow and not gpu'), and skipped without CUDA: `pytest -m gpu tests/test_gpu.py -rs`.
benchmarks/gpu_check.py runs them first.

Tolerances are stated where the comparison is not exact: bf16 keeps 8 bits of mantissa (a relative rounding of
4e-3 per operation), fp16 11 bits (5e-4), TF32 matmuls (which Precision turns on for CUDA) 11 bits too.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_document_mask import EOT, packed_batch
from test_train import losses, tiny_run, weights

from gptforge import checkpoint as ckpt
from gptforge.evaluate import loss_batch, segments_of
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.training import train
from gptforge.training.config import TrainConfig
from gptforge.training.step import Precision, RandomSteps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
MODELS = {
    "gpt2": lambda: GPT(GPTConfig(vocab_size=53, context_length=24, emb_dim=64, n_heads=4, n_layers=2,
                                  drop_rate=0.0)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=53, context_length=24, emb_dim=64, n_heads=4, n_kv_heads=2,
                                       n_layers=2, qk_norm=True)),
}


@pytest.fixture
def exact_matmuls():
    """fp32 matmuls in fp32 (not TF32) inside the test, as they were after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_run(text_file, **kw):
    cfg = tiny_run(text_file, device="cuda", sample_tokens=0, **kw)
    cfg.model.drop_rate = 0.0
    return cfg


def run_losses(text_file, tmp_path, name, **kw):
    train(cuda_run(text_file, **kw), tmp_path / name, log=lambda *_: None)
    return losses(tmp_path / name)


# ----------------------------------------------------------------------------- number formats


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    """The train losses of 20 fp32 (TF32) steps, the reference of the half-precision runs."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("fp32")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")  # conftest's text_file
    return run_losses(text, d, "fp32", max_steps=20, precision="fp32")


@pytest.mark.parametrize("precision, rel", [("bf16", 0.02), ("fp16", 0.01)])
def test_half_precision_training_follows_fp32(text_file, tmp_path, fp32_losses, precision, rel):
    """20 steps under autocast follow the fp32 (TF32) run: every train loss within 2% (bf16) or 1% (fp16,
    with its GradScaler) of fp32's; the rounding compounds over the steps but stays well below the loss's fall."""
    base = fp32_losses
    half = run_losses(text_file, tmp_path, precision, max_steps=20, precision=precision)
    assert base.keys() == half.keys()
    for step in base:
        assert half[step] == pytest.approx(base[step], rel=rel), (step, half[step], base[step])
    assert base[20] < base[1] - 0.5  # it learned


def test_grad_scaler_skips_an_overflowing_step():
    """fp16: a loss scaled past fp16's range makes infinite gradients; the step is skipped (weights unchanged)
    and the scale halves."""
    torch.manual_seed(0)
    model = MODELS["gpt2"]().to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = Precision("fp16", CUDA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = amp.scaler.get_scale()
    x = torch.randint(0, 53, (2, 24), device=CUDA)
    amp.backward(model, x, x, grad_accum=1e-30)  # the loss x 1e30: its fp16 gradients overflow
    grad_norm = amp.clip(model, optimizer, 1.0)
    amp.update(optimizer)
    assert not torch.isfinite(torch.tensor(grad_norm))
    assert amp.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_equals_eager():
    """torch.compile's fused kernels round differently, nothing more: 5 AdamW steps of the same model on the same
    batches (fp32 with TF32 matmuls, as Precision sets CUDA up) give losses within 1e-3 relative."""
    seen = {}
    for compile in (False, True):
        t = TrainConfig(device="cuda", precision="fp32", compile=compile, batch_size=4, seed=1)
        step = RandomSteps.setup(MODELS["llama"]().cfg, t, CUDA)
        seen[compile] = [step() for _ in range(5)]
    assert seen[True] == pytest.approx(seen[False], rel=1e-3)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flex_equals_the_dense_mask_values_and_gradients(name, exact_matmuls):
    """FlexAttention (compiled, block mask of the documents) against scaled_dot_product_attention with the dense
    mask: the loss within 1e-4 and every gradient within 1e-3 (fp32; a kernel compiled earlier under TF32 rounds
    at that level)."""
    torch.manual_seed(0)
    model = MODELS[name]().to(CUDA)
    x = packed_batch().to(CUDA)
    y = torch.roll(x, -1, dims=1)
    out = {}
    for kind in ("sdpa", "flex"):
        model.attention = kind
        loss = loss_batch(model, x, y, EOT)
        out[kind] = (loss, torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(out["flex"][1], out["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_auto_trains_packed_documents_with_flex_under_bf16():
    """On CUDA auto builds a BlockMask for packed documents; a bf16 step through it (rotated fp32 q and k, bf16 v)
    gives finite gradients, and its loss is the sdpa path's within bf16's rounding (3e-2)."""
    from gptforge.models.layers import BlockMask, packed_mask

    torch.manual_seed(0)
    model = MODELS["llama"]().to(CUDA)
    x = packed_batch().to(CUDA)
    assert isinstance(packed_mask(segments_of(x, EOT), "auto", 0.0), BlockMask)
    amp, loss = Precision("bf16", CUDA), {}
    for kind in ("sdpa", "auto"):
        model.attention = kind
        loss[kind] = amp.backward(model, x, x, 1, EOT)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss["auto"] == pytest.approx(loss["sdpa"], abs=3e-2)


def test_grouped_query_attention_without_repeated_keys_equals_repeated(exact_matmuls):
    """On CUDA, sdpa(..., enable_gqa=True) takes 2 key/value heads for 8 query heads: equal to repeating them."""
    import torch.nn.functional as F

    from gptforge.models.layers import repeat_kv, sdpa

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 32, 16, device=CUDA, generator=g)
    k, v = (torch.randn(2, 2, 32, 16, device=CUDA, generator=g) for _ in "kv")
    ref = F.scaled_dot_product_attention(q, repeat_kv(k, 8), repeat_kv(v, 8), is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kv_cache_decoding_equals_no_cache(name, exact_matmuls):
    """Prefill 5 tokens, a 3-token chunk, then single tokens: the logits equal one full forward pass (1e-4), and
    greedy tokens with the cache equal those without it."""
    from gptforge.generate import SampleConfig, generate
    from gptforge.models import KVCache

    torch.manual_seed(5)
    model = MODELS[name]().to(CUDA).eval()
    x = torch.randint(0, 53, (2, 12), device=CUDA)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, CUDA, torch.float32)
        parts = [model(x[:, :5], cache), model(x[:, 5:8], cache)]
        parts += [model(x[:, t:t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    cfg = SampleConfig(max_new_tokens=10)
    assert generate(model, x[:, :5], cfg) == generate(model, x[:, :5], cfg, use_cache=False)


# ----------------------------------------------------------------------------- the training loop


@pytest.fixture
def deterministic(monkeypatch):
    """cuBLAS and attention kernels that give the same bits every time (torch's deterministic algorithms)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def test_resume_is_bit_for_bit_on_the_gpu(text_file, tmp_path, deterministic):
    """Stop after step 4, resume on the GPU (bf16, its RNG states restored), compare losses and weights bit for bit."""
    cfg = cuda_run(text_file, max_steps=8, save_every=2, keep_last=0, precision="bf16")
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, log=lambda *_: None)
    shutil.copytree(full, cut)
    for d in ckpt.checkpoint_dirs(cut):
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    train(cfg, cut, resume=True, log=lambda *_: None)
    assert losses(cut) == losses(full)
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_come_from_pinned_memory(monkeypatch):
    """RunState.next_batch pins each batch (page-locked host memory) before its non-blocking copy to the GPU."""
    from gptforge.training.state import RunState

    pinned = []
    real = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or real(t, *a))

    class Batches:
        def __len__(self):
            return 2

        def batch(self, epoch, i):
            return torch.full((2, 8), i), torch.full((2, 8), i + 1)

    state = RunState()
    x, y = state.next_batch(Batches(), CUDA)
    assert len(pinned) == 2 and x.is_cuda and y.is_cuda and int(y[0, 0]) == 1
    assert state.batch == 1


def test_train_eval_generate_and_serve_on_cuda(text_file, tmp_path):
    """A run trained on the GPU (default precision: bf16 autocast) is read back on the GPU by eval (the CPU's loss
    within 1e-3), generate (the CPU's greedy text) and serve's engine (the same text)."""
    from gptforge.evaluate import EvalConfig, evaluate_text
    from gptforge.generate import GenerateConfig, SampleConfig, generate_text
    from gptforge.serve import load_engine

    run = tmp_path / "run"
    summary = train(cuda_run(text_file, max_steps=6), run, log=lambda *_: None)
    assert summary["steps"] == 6
    result = {d: evaluate_text(str(run), [str(text_file)], EvalConfig(device=d, max_batches=2))
              for d in ("cpu", "cuda")}
    assert result["cuda"].loss == pytest.approx(result["cpu"].loss, rel=1e-3)
    sample = SampleConfig(max_new_tokens=12)
    text = {d: generate_text(str(run), GenerateConfig(prompt="The", device=d), sample) for d in ("cpu", "cuda")}
    assert text["cuda"] == text["cpu"]
    engine = load_engine(run, "cuda")
    reply = engine.complete(engine.parse(b'{"prompt": "The", "max_tokens": 12, "temperature": 0}'))
    assert engine.device.type == "cuda" and reply["choices"][0]["text"] == text["cuda"][0]


def test_bench_train_reports_mfu_on_a_known_gpu():
    from gptforge.bench import BenchConfig, bench_train
    from gptforge.perf import gpu_peak_flops

    t = TrainConfig(device="cuda", batch_size=4)
    out = bench_train(MODELS["gpt2"]().cfg, t, BenchConfig(steps=2, warmup=1), log=lambda *_: None)
    assert out["tokens_per_s"] > 0 and out["peak_mem_bytes"] > 0
    assert (out["mfu"] is None) == (gpu_peak_flops(torch.cuda.get_device_name(), "bf16") is None)


# ----------------------------------------------------------------------------- nccl


def gptforge_train(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path]))}
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


NCCL_RUN = ["--preset", "tiny", "--context-length", "32", "--drop-rate", "0", "--max-steps", "4", "--eval-every", "2",
            "--eval-batches", "2", "--sample-tokens", "0", "--device", "cuda", "--no-progress", "--log-every", "1",
            "--precision", "bf16", "--grad-accum", "2"]


def train_records(run_dir):
    return [r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == "train"]


NCCL_ONE = """
import sys

import torch

from gptforge import distributed
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.training.step import Precision

parallel = sys.argv[1]
device = torch.device("cuda", 0)
torch.distributed.init_process_group("nccl", device_id=device)
distributed.is_distributed = lambda: True  # a world of one: gptforge would run the model unwrapped
cfg = LlamaConfig(vocab_size=64, context_length=32, emb_dim=64, n_heads=4, n_kv_heads=2, n_layers=2)
torch.manual_seed(0)
x = torch.randint(0, 64, (4, 32), device=device)
losses = {}
for name in ("plain", parallel):
    torch.manual_seed(1)
    model = Llama(cfg).to(device)
    if name != "plain":
        model = distributed.wrap(model, device, parallel, "bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = Precision("bf16", device)
    losses[name] = []
    for _ in range(5):
        with distributed.grad_sync(model, sync=True):
            losses[name].append(amp.backward(model, x, x))
        amp.clip(model, optimizer, 1.0)
        amp.update(optimizer)
        optimizer.zero_grad(set_to_none=True)
    (total,) = distributed.all_sum([losses[name][-1]], device)  # an nccl all-reduce of one rank
    assert total == losses[name][-1]
# DDP: the same arithmetic (attention's backward may add in any order); FSDP2: bf16 weights instead of autocast's casts
tol = 1e-4 if parallel == "ddp" else 2e-2
assert all(abs(a - b) <= tol for a, b in zip(losses["plain"], losses[parallel])), losses
assert losses[parallel][-1] < losses[parallel][0]
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ddp_and_fsdp_over_nccl_in_a_world_of_one(tmp_path, parallel):
    """torchrun with one process on the GPU, the nccl group joined and the model wrapped by distributed.wrap (DDP,
    or FSDP2 with its bf16 mixed-precision policy): 5 bf16 steps follow the unwrapped model's (DDP within 1e-4,
    FSDP2 within bf16's 2e-2)."""
    script = tmp_path / "nccl_one.py"
    script.write_text(NCCL_ONE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           str(script), parallel], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_all_visible_gpus_equal_one_with_the_same_global_batch(text_file, tmp_path, parallel):
    """nccl over every visible GPU (FSDP2 with its bf16 mixed-precision policy) follows 1 GPU at the same global
    batch within bf16's rounding (2e-2)."""
    n = torch.cuda.device_count()
    gptforge_train(text_file, "--out", tmp_path / "one", "--batch-size", str(2 * n), *NCCL_RUN)
    out = gptforge_train(text_file, "--out", tmp_path / "all", "--batch-size", "2", "--nproc", str(n), "--parallel",
                         parallel, *NCCL_RUN)
    assert f"{n} processes x 2, {parallel}" in out
    assert train_records(tmp_path / "all") == pytest.approx(train_records(tmp_path / "one"), abs=2e-2)
