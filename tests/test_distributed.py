"""torchrun on CPU (gloo): 2 processes train what 1 process trains with the same global batch."""

import json
import shutil
import subprocess
import sys

import pytest

from gptforge import checkpoint as ckpt

pytestmark = pytest.mark.multiprocess

COMMON = ["--preset", "tiny", "--context-length", "32", "--drop-rate", "0", "--grad-accum", "2", "--max-steps", "4",
          "--eval-every", "2", "--save-every", "2", "--keep-last", "0", "--eval-batches", "2", "--sample-tokens", "3",
          "--device", "cpu", "--no-progress", "--log-every", "1"]


def gptforge(*args):
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def records(run_dir, event):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == event]


def assert_same_losses(a, b, tol):
    for event in ("train", "eval"):
        ra, rb = records(a, event), records(b, event)
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
        for x, y in zip(ra, rb):
            for key in ("train_loss", "val_loss"):
                if key in x:
                    assert abs(x[key] - y[key]) <= tol, (event, x["step"], key, x[key], y[key])


def assert_resumes_exactly(run, cut):
    """A copy of the 4-step 2-process run, cut after step 2 and resumed with 2 processes, ends exactly where it did."""
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    gptforge("--resume", cut, "--nproc", "2")

    def losses(r):
        return [(x["step"], x["train_loss"], x["grad_norm"]) for x in records(r, "train")]

    assert losses(cut) == losses(run)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("dist")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    gptforge(text, "--out", d / "single", "--batch-size", "4", *COMMON)
    return d, text


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(single, parallel):
    d, text = single
    run = d / parallel
    out = gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", "--parallel", parallel, *COMMON)
    assert f"2 processes x 2, {parallel}" in out  # only rank 0 prints
    assert out.count("done: step 4") == 1
    assert_same_losses(d / "single", run, tol=1e-5)

    # a 2-process run cut after step 2 and resumed with 2 processes ends exactly where it ended
    assert_resumes_exactly(run, d / f"{parallel}-cut")


LLAMA = ["--preset", "llama-tiny", "--n-heads", "4", "--n-kv-heads", "2", "--qk-norm", *COMMON[2:]]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_llama_family_two_processes_equal_one(single, parallel):
    """Grouped-query attention, QK-norm and rotary positions under DDP and FSDP2: 2 gloo processes = 1 process."""
    d, text = single
    one = d / "llama-single"
    if not one.exists():
        gptforge(text, "--out", one, "--batch-size", "4", *LLAMA)
    run = d / f"llama-{parallel}"
    gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", "--parallel", parallel, *LLAMA)
    assert_same_losses(one, run, tol=1e-5)


MOE = [*LLAMA, "--n-experts", "4", "--experts-per-token", "2", "--moe-intermediate-size", "32", "--router-balance",
       "bias", "--router-bias-speed", "0.01"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_mixture_of_experts_two_processes_equal_one(single, parallel):
    """Sorted dispatch under DDP and FSDP2 (every expert gets a gradient on every rank), the step's expert load
    summed over ranks, and the routing biases moved by it alike on every rank: 2 gloo processes = 1 process.
    (--router-balance bias: minimind's aux loss is computed per micro-batch, so other micro-batches change it.)"""
    d, text = single
    one = d / "moe-single"
    if not one.exists():
        gptforge(text, "--out", one, "--batch-size", "4", *MOE)
    run = d / f"moe-{parallel}"
    gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", "--parallel", parallel, *MOE)
    assert_same_losses(one, run, tol=1e-5)
    assert [r["expert_load"] for r in records(one, "train")] == [r["expert_load"] for r in records(run, "train")]
    assert_resumes_exactly(run, d / f"moe-{parallel}-cut")


MUON = ["--optimizer", "muon", "--weight-decay-on", "all", "--schedule", "wsd", *COMMON]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_two_processes_equal_one(single, parallel):
    """Muon + AdamW: DDP steps on all-reduced gradients; FSDP2 orthogonalises each matrix whole
    (distributed.whole_matrix) and keeps its shard. Both equal 1 process, and resume exactly.

    The tolerance is wider than AdamW's: the bf16 Newton–Schulz iteration turns the float32 rounding
    differences of a reduced gradient into bf16 ones, ~2e-4 in the loss after 4 steps here; orthogonalising
    each FSDP shard on its own instead is ~6e-3 off at step 2 already (the whole matrix, bit for bit: below).
    """
    d, text = single
    one = d / "muon-single"
    if not one.exists():
        out = gptforge(text, "--out", one, "--batch-size", "4", *MUON)
        assert "optimizer: muon for 8 matrices" in out
    run = d / f"muon-{parallel}"
    gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", "--parallel", parallel, *MUON)
    assert_same_losses(one, run, tol=1e-3)

    assert_resumes_exactly(run, d / f"muon-{parallel}-cut")


SHARDED_MUON = """
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gptforge.training.optim import Muon

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
shapes = [(24, 8), (7, 12), (16, 16)]  # 7 rows: shards of 4 and 3
whole = [torch.randn(s) for s in shapes]
sharded = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in whole]  # as FSDP2 holds them
plain = [torch.nn.Parameter(p.clone()) for p in whole]
opts = [Muon(sharded, lr=0.02, weight_decay=0.1), Muon(plain, lr=0.02, weight_decay=0.1)]
for _ in range(3):
    grads = [torch.randn(s) for s in shapes]
    for p, q, g in zip(sharded, plain, grads):
        p.grad, q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]), g.clone()
    for o in opts:
        o.step()
for p, q in zip(sharded, plain):
    assert isinstance(opts[0].state[p]["momentum_buffer"], DTensor)  # each rank keeps momentum for its shard
    assert torch.equal(p.full_tensor(), q.detach()), (p.shape, (p.full_tensor() - q).abs().max())
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # torch 2.13 with a DeviceMesh on gloo sometimes aborts in interpreter teardown, after all is done
"""


def test_muon_on_fsdp_shards_steps_as_on_the_whole_matrix(tmp_path):
    """Muon on parameters sharded on dim 0 (FSDP2's DTensors, shards of unequal rows too) equals Muon on the
    whole matrices bit for bit: Newton–Schulz sees the whole matrix."""
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_MUON)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_resume_on_a_different_world_size(single):
    d, text = single
    run = d / "resize"
    gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", *COMMON)
    out = gptforge("--resume", run, "--max-steps", "6")
    assert "resuming with 1 process(es) x batch 2 (was 2 x 2)" in out and "done: step 6" in out
    assert ckpt.load_state(ckpt.latest_checkpoint(run))["world_size"] == 1


@pytest.mark.parametrize("parallel, data", [("ddp", ["--document-mask", "--tokenizer-vocab", "300"]),
                                            ("fsdp", ["--packing", "pad"])])
def test_document_mask_and_pad_packing_two_processes_equal_one(tmp_path, parallel, data):
    """The segments reach the model through DDP's and FSDP2's forward; the scored-token count adds up over ranks.
    With --tokenizer-vocab, rank 0 trains the tokenizer and every rank uses its copy."""
    from pydoc_data.topics import topics

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, key in enumerate(sorted(topics)[:30]):  # short documents: several per window, padding per row
        (docs / f"{i:02d}.txt").write_text(topics[key][: 80 + 10 * i], encoding="utf-8")
    gptforge(docs, "--out", tmp_path / "one", "--batch-size", "4", *data, *COMMON)
    gptforge(docs, "--out", tmp_path / "two", "--batch-size", "2", "--nproc", "2", "--parallel", parallel, *data,
             *COMMON)
    assert_same_losses(tmp_path / "one", tmp_path / "two", tol=1e-5)


FSDP_POLICY = """
import os

import torch
import torch.distributed as dist

from gptforge import distributed
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.training.step import Precision

device = distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
model = Llama(LlamaConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2))
model = distributed.wrap(model, device, "fsdp", "bf16")
seen = []
model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
x = torch.randint(0, 64, (2, 16))
with Precision("bf16", device).autocast:
    loss = model(x, targets=x)
loss.backward()
assert seen == [torch.bfloat16], seen  # gathered in bf16 for the forward
assert all(p.dtype == torch.float32 for p in model.parameters())  # the sharded master weights
assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # reduced in fp32
assert model.layers[0]._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
dist.barrier()
distributed.cleanup()
os._exit(0)
"""


def test_fsdp_bf16_gathers_bf16_parameters_and_keeps_fp32_masters(tmp_path):
    """--parallel fsdp --precision bf16: the MixedPrecisionPolicy is applied to every block and the root (bf16
    weights in forward), while the sharded parameters and their reduced gradients stay fp32."""
    script = tmp_path / "fsdp_policy.py"
    script.write_text(FSDP_POLICY)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_fsdp_bf16_run_equals_the_fp32_run_within_bf16_tolerance(single):
    """A 2-process FSDP2 bf16 run (bf16 parameters in compute, fp32 reduction and master weights) follows the
    1-process fp32 run: 4 steps of the tiny model, every train and val loss within 2e-3 (measured: at most 2e-4 at
    losses near 10.8; bf16 keeps 8 bits of mantissa, 4e-3 relative rounding per operation, mostly averaging out over
    the batch's tokens). It is not the fp32 run: the losses differ."""
    d, text = single
    run = d / "fsdp-bf16"
    gptforge(text, "--out", run, "--batch-size", "2", "--nproc", "2", "--parallel", "fsdp", "--precision", "bf16",
             *COMMON)
    assert_same_losses(d / "single", run, tol=2e-3)
    assert [r["train_loss"] for r in records(run, "train")] != [r["train_loss"] for r in records(d / "single", "train")]
