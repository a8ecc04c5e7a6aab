import json

import pytest
import torch
from click.testing import CliRunner

from gptforge.cli import cli
from gptforge.models import get_spec
from gptforge.models.gpt2 import GPT, PRESETS, GPTConfig
from gptforge.perf import gpu_peak_flops, mfu


def test_flops_per_token_by_hand_for_gpt2_small_at_256():
    cfg = GPTConfig(**{**PRESETS["gpt2-small"], "context_length": 256})
    spec = get_spec("gpt2")
    # per layer: q,k,v 768x2304, attention out 768x768, MLP 768x3072 and 3072x768; head 50257x768
    per_layer = 768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768
    n = 12 * per_layer + 50257 * 768
    assert spec.matmul_params(cfg) == n == 123_532_032
    assert spec.flops_per_token(cfg) == 6 * n + 12 * 12 * 12 * 64 * 256 == 769_503_744
    # every Linear weight counted, embeddings not: the model agrees with the formula
    with torch.device("meta"):
        model = GPT(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == n
    # 70 tokens/s against an 80 GFLOP/s peak
    assert mfu(spec.flops_per_token(cfg), 70.0, 80e9) == pytest.approx(70 * 769_503_744 / 80e9)
    assert mfu(1.0, 1.0, None) is None


def test_gpu_peak_table_by_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12  # TF32
    assert gpu_peak_flops("NVIDIA H200", "bf16") == gpu_peak_flops("NVIDIA GH200 480GB", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 NVL", "bf16") == 835e12
    assert gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12 and gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080", "bf16") is None  # unknown: no guess


def test_bench_train_quick(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "train", "--preset", "tiny", "--context-length", "16", "--batch-size", "2",
                                 "--device", "cpu", "--steps", "2", "--warmup", "1", "--profile"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert set(result) == {"tokens_per_s", "ms_per_step", "mfu", "peak_mem_bytes", "device"}
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / (result["ms_per_step"] / 1000), rel=1e-3)
    assert 0 < result["mfu"] < 1 and result["peak_mem_bytes"] > 0 and result["device"].startswith("cpu")
    assert "aten::mm" in r.output  # the profiled step's op table


def test_bench_generate_quick():
    r = CliRunner().invoke(cli, ["bench", "generate", "--preset", "tiny", "--device", "cpu", "--batch-size", "2",
                                 "--max-new-tokens", "6", "--prompt-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert "cached and uncached outputs identical: True" in r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert set(result) == {"prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_no_cache", "device"}
    assert all(result[k] > 0 for k in result if k != "device")


def test_cpu_peak_measurement_leaves_the_training_rng_alone():
    """Measuring the peak at the start of a resumed run must not shift its dropout stream."""
    import torch

    from gptforge.perf import measure_cpu_peak

    measure_cpu_peak.cache_clear()
    before = torch.get_rng_state()
    measure_cpu_peak(sizes=(64,), repeats=1)
    assert torch.equal(before, torch.get_rng_state())


def test_compare_train_benchmark_quick():
    """benchmarks/compare_train.py in a quick mode: the gptforge side always, the book's side when its
    package is installed (pip install --no-deps llms-from-scratch; not a dev dependency)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_train.py"
    spec = importlib.util.spec_from_file_location("compare_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    impls = ["gptforge"] + (["book"] if importlib.util.find_spec("llms_from_scratch") else [])
    for impl in impls:
        times = bench.run_one(impl, steps=2, warmup=1, layers=1, batch=1, context=16)
        assert len(times) == 2 and all(t > 0 for t in times), impl
