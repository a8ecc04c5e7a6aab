"""Memory is estimated before it is taken: perf.training_bytes against the peak a few real training steps reach."""

import json
import subprocess
import sys

import pytest
import torch

from gptforge.models.gpt2 import GPTConfig
from gptforge.models.llama import LlamaConfig
from gptforge.training.config import TrainConfig

# a fresh process per shape: the growth of its peak resident memory from just before the model is built to after
# a warmup and 3 optimizer steps (CPU, fp32); the import of torch and gptforge is not counted
PROBE = """
import json, sys
import torch
from gptforge import perf
from gptforge.config import build
from gptforge.models import build as build_model, get_spec
from gptforge.training.config import TrainConfig
from gptforge.training.step import RandomSteps, time_steps

arch, shape, train = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
perf.keep_freed_cpu_memory()  # as train() and bench train run on a CPU
cfg, t = build(get_spec(arch).config_class, shape), build(TrainConfig, train)
with torch.device("meta"):
    params = sum(p.numel() for p in build_model(cfg).parameters())
def status(key):  # kB in /proc/self/status; ru_maxrss would keep the peak of the forked parent (pytest) across exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS:")
time_steps(RandomSteps.setup(cfg, t, torch.device("cpu")), 3, 1, torch.device("cpu"))
peak = status("VmHWM:") - before
print(json.dumps({"estimate": perf.training_bytes(params, cfg, t.batch_size), "peak": peak}))
"""

SHAPES = {  # GPT-2 with its vocabulary and dropout; Llama with Muon; a narrow GPT-2 with many heads
    "gpt2-50k-vocab": ("gpt2", dict(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=4),
                       dict(batch_size=8)),
    "llama-muon": ("llama", dict(vocab_size=4096, context_length=512, emb_dim=384, n_heads=6, n_kv_heads=3,
                                 n_layers=6, intermediate_size=1152, qk_norm=True), dict(batch_size=8,
                                                                                          optimizer="muon")),
    "gpt2-many-heads": ("gpt2", dict(vocab_size=8192, context_length=512, emb_dim=256, n_heads=8, n_layers=6),
                        dict(batch_size=4)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_estimate_is_within_30_percent_of_the_peak(name):
    arch, shape, train = SHAPES[name]
    argv = [sys.executable, "-c", PROBE, arch, json.dumps(shape), json.dumps({**train, "device": "cpu"})]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.7 <= got["estimate"] / got["peak"] <= 1.3, got


def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated(monkeypatch):
    from gptforge import perf
    from gptforge.config import ConfigError
    from gptforge.training import state

    monkeypatch.setattr(perf, "available_memory", lambda device: 100 * 10**6)  # 100 MB free
    cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=4)
    with pytest.raises(ConfigError, match=r"training needs about 1.39 GB of memory on cpu \(16,087,808 parameters x 16 "
                                          r"bytes, .*\) and 100 MB is free: reduce the model"):
        state.check_memory(cfg, TrainConfig(batch_size=8), torch.device("cpu"))
    state.check_memory(LlamaConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1),
                       TrainConfig(batch_size=2), torch.device("cpu"))  # a small one passes


def test_a_kv_cache_or_model_that_cannot_fit_is_refused_before_allocation(monkeypatch, tmp_path):
    """generate, serve and bench generate size their KV cache (exactly: 2 x layers x batch x kv heads x positions x
    head width x dtype bytes) against the free memory first; a model is refused before its weights are read."""
    import importlib

    from gptforge import perf, weights
    from gptforge.config import ConfigError
    from gptforge.models import KVCache, build

    gen = importlib.import_module("gptforge.generate")
    cfg = LlamaConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_kv_heads=1, n_layers=2)
    torch.manual_seed(0)
    model = build(cfg)
    assert KVCache.nbytes(cfg, torch.float32, 3, 1000) == 2 * 2 * 3 * 1 * 1000 * 16 * 4
    cache = gen.new_cache(model, 3, 1000)  # what the estimate counts is what is allocated
    assert cache.k.nbytes + cache.v.nbytes == KVCache.nbytes(cfg, torch.float32, 3, 1000)
    monkeypatch.setattr(perf, "available_memory", lambda device: 100_000)  # 100 KB free
    allocated = []

    class Recorded(KVCache):
        def __init__(self, *args, **kwargs):
            allocated.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gen, "KVCache", Recorded)
    with pytest.raises(ConfigError, match=r"the KV cache \(3 x 1000 positions, 2 layers\) needs about 768 KB of memory "
                                          r"on cpu and 100 KB is free: lower --max-new-tokens"):
        gen.new_cache(model, 3, 1000)
    assert not allocated
    gen.new_cache(model, 1, 100)  # 25.6 KB: fits
    path = weights.to_gptforge(model, tmp_path / "m.safetensors", "gpt2")
    monkeypatch.setattr(perf, "available_memory", lambda device: 10_000)
    with pytest.raises(ConfigError, match=r"the model \(.* parameters, float32\) needs about .* and 10 KB is free"):
        weights.load_any(path)
