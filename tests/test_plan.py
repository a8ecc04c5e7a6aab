"""`gptforge plan` and `gptforge train --minutes`: the choice as a pure function of measured speeds (injected here,
never timed), the CLI's table and JSON line, bad input, and the planned length recorded for --resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import run

import gptforge.training.ladder as rungs
import gptforge.training.plan as plan
from gptforge.config import ConfigError, tomllib
from gptforge.errors import DataError
from gptforge.models.llama import PRESETS as LLAMA_PRESETS
from gptforge.training.config import resolve_train_config
from gptforge.training.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
JSON_KEYS = {"data_tokens", "params", "shape", "batch_size", "context_length", "steps", "tokens", "epochs", "lr",
             "minutes", "device"}
LOTS = 10**9  # training tokens: the epoch cap never binds


def ladder(data_tokens=LOTS, arch="llama", vocab=4096):
    return rungs.candidates(arch, RECIPES["modern"] if arch == "llama" else {}, vocab, data_tokens)


def by_size(cands, scale=1e12):
    """Speeds that fall with the parameter count: what a device shows, without timing one."""
    return [scale / c.params for c in cands]


def pick(minutes, speeds, cands, data_tokens=LOTS):
    return plan.choose(data_tokens, minutes, speeds, cands, lr=3e-3, base_width=128)


def test_the_ladder_spans_small_to_large_and_holds_llama_mini():
    cands = ladder()
    params = [c.params for c in cands]
    assert params == sorted(params) and params[0] < 200_000 and params[-1] > 100_000_000
    mini = LLAMA_PRESETS["llama-mini"]
    rung = next(c for c in cands if c.shape["emb_dim"] == 128)
    assert {k: rung.shape[k] for k in ("n_layers", "n_heads", "n_kv_heads", "intermediate_size")} == \
        {k: mini[k] for k in ("n_layers", "n_heads", "n_kv_heads", "intermediate_size")}
    assert [c.context_length for c in cands][:4] == [128] * 4 and cands[-1].context_length == 1024
    assert all(c.config.qk_norm for c in cands)  # the recipe's model settings come along
    small = ladder(data_tokens=64 * 40)  # the context stays within what the text fills
    assert max(c.context_length for c in small) == 32
    gpt = ladder(arch="gpt2")
    assert [c.shape["emb_dim"] for c in gpt] == [c.shape["emb_dim"] for c in cands]


def test_too_little_text_to_plan_is_a_data_error():
    with pytest.raises(DataError, match="too few to plan"):
        ladder(data_tokens=500)


def test_the_choice_is_deterministic_given_the_speeds():
    cands = ladder()
    speeds = by_size(cands)
    a, b = pick(3, speeds, cands), pick(3, speeds, cands)
    assert a.summary("dev") == b.summary("dev") and set(a.summary("dev")) == JSON_KEYS


def test_tokens_per_parameter_grow_from_the_measured_small_runs_to_chinchillas_twenty():
    (small_tokens, small), (large_tokens, large) = plan.TOKENS_PER_PARAM
    assert large == 20 and small < 5  # Hoffmann et al.'s ratio at scale; far fewer in minutes on a CPU
    assert plan.tokens_per_param(small_tokens / 10) == pytest.approx(small)
    assert plan.tokens_per_param(large_tokens * 10) == pytest.approx(large)
    middle = (small_tokens * large_tokens) ** 0.5  # log-log: the geometric means meet
    assert plan.tokens_per_param(middle) == pytest.approx((small * large) ** 0.5)
    ratios = [plan.tokens_per_param(10.0**k) for k in range(3, 12)]
    assert ratios == sorted(ratios)


@pytest.mark.parametrize("minutes", [0.5, 1, 5, 30, 300])
def test_the_largest_candidate_that_gets_its_tokens_per_parameter_is_chosen(minutes):
    cands = ladder()
    speeds = by_size(cands)
    p = pick(minutes, speeds, cands)

    def enough(c, s):  # the ratio a run of that many tokens calls for, on the blocks' parameters
        tokens = s * 60 * minutes
        return tokens >= plan.tokens_per_param(tokens) * c.block_params

    fitting = [i for i, (c, s) in enumerate(zip(cands, speeds)) if enough(c, s)]
    assert p.chosen == max(fitting)
    if p.chosen + 1 < len(cands):  # the next one up would get too few
        assert not enough(cands[p.chosen + 1], speeds[p.chosen + 1])
    assert p.steps * p.batch_size * p.context_length == p.tokens <= p.rows[p.chosen].tokens
    assert p.minutes <= minutes and not p.capped


def test_parameters_are_counted_in_the_blocks():
    rung = ladder()[0]  # 1 x 32 with 4,096 ids: the embedding is most of the model, none of its blocks
    assert rung.params - rung.block_params >= 4096 * 32 and rung.block_params < 0.2 * rung.params


@pytest.mark.parametrize("minutes", [1, 10, 1000])
def test_on_a_small_text_the_largest_model_that_passes_over_it_epochs_times_in_the_time(minutes):
    data_tokens = 60_000
    cands = ladder(data_tokens)
    speeds = by_size(cands)
    p = pick(minutes, speeds, cands, data_tokens)
    assert p.capped and plan.MIN_EPOCHS * 0.98 <= p.epochs <= plan.EPOCHS
    chosen = p.rows[p.chosen]
    assert chosen.tokens >= plan.MIN_EPOCHS * data_tokens  # it can pass over the text MIN_EPOCHS times in the time
    # EPOCHS passes end the run, or the time does (a shape passing over the text 2.5 to 3 times)
    assert p.epochs == pytest.approx(min(plan.EPOCHS, chosen.tokens / data_tokens), rel=0.02)
    assert p.minutes <= minutes * 1.0001
    assert p.candidate.block_params <= plan.MAX_PARAMS_PER_TEXT_TOKEN * data_tokens
    if p.chosen + 1 < len(p.rows):  # and the next one up cannot, or is too big for the text
        assert not p.rows[p.chosen + 1].fits_text
    assert "the text is the limit" in plan.describe_plan(p, minutes)


def test_when_the_text_is_the_limit_a_shape_passing_over_it_min_epochs_times_is_enough():
    # the docstrings' 3-minute grid (benchmarks/plan_quality_runs.json): ms per step of batch 8 x 128, 396K tokens;
    # 5 x 160 passes 2.85 times in the time and was the best shape there, 4 x 128 (3.7 passes) worse
    data_tokens = 396_124
    cands = ladder(data_tokens)[:7]
    speeds = [8 * 128 / (ms / 1000) for ms in (31.9, 37.2, 64.6, 126.7, 163.2, 232.7, 478.7)]
    p = pick(3, speeds, cands, data_tokens)
    assert p.capped and p.candidate.describe() == "5 x 160"
    assert plan.MIN_EPOCHS < p.epochs < plan.EPOCHS and p.minutes == pytest.approx(3, rel=0.01)  # the time ends it
    note = plan.describe_plan(p, 3)
    assert "the text is the limit" in note and f"fewer than {plan.MIN_EPOCHS:g} times" in note
    assert plan.row_note(p, p.rows[5]).strip() == f"too slow for {plan.MIN_EPOCHS:g} passes over the text"


def test_on_plenty_of_text_the_time_is_the_limit():
    cands = ladder()
    p = pick(1, by_size(cands), cands)
    assert not p.capped and p.epochs < plan.EPOCHS and p.minutes == pytest.approx(1, rel=0.02)


def test_a_bigger_budget_never_picks_a_smaller_model():
    cands = ladder()
    profiles = [by_size(cands), by_size(cands, 1e10), [5e4] * len(cands),  # and speeds that do not fall evenly
                [1e6 / (1 + (i % 3)) / (i + 1) for i in range(len(cands))]]
    for speeds in profiles:
        for data_tokens in (LOTS, 2_000_000):
            params = [pick(m, speeds, cands, data_tokens).candidate.params
                      for m in (0.1, 0.3, 1, 3, 10, 30, 100, 1000)]
            assert params == sorted(params), params


def test_batches_grow_with_the_run_and_keep_enough_steps():
    cands = ladder()
    plans = [pick(m, by_size(cands), cands) for m in (0.2, 1, 10, 100, 1000)]
    for p in plans:
        assert p.batch_size in plan.BATCH_SIZES
        assert p.steps >= plan.MIN_STEPS or p.batch_size == plan.BATCH_SIZES[0]
    tokens_per_step = [p.batch_size * p.context_length for p in plans]
    assert tokens_per_step == sorted(tokens_per_step) and tokens_per_step[-1] > tokens_per_step[0]


def test_adamw_lr_scales_down_for_wide_models_only():
    assert plan.scaled_lr(3e-3, 128, 128) == 3e-3 and plan.scaled_lr(3e-3, 64, 128) == 3e-3
    assert plan.scaled_lr(3e-3, 512, 128) == 1.5e-3
    cands = ladder()
    wide = pick(10**5, by_size(cands, 1e15), cands)
    assert wide.candidate.shape["emb_dim"] > 128 and wide.lr < 3e-3


def test_measuring_stops_after_the_first_shape_that_is_too_big(monkeypatch):
    cands = ladder(data_tokens=LOTS)
    built = []
    monkeypatch.setattr(plan.RandomSteps, "setup", lambda cfg, *a, **k: built.append(cfg) or cfg)
    monkeypatch.setattr(plan, "time_steps", lambda cfg, *a, **k: [rungs.count_params(cfg)[0] * 1e-9] * 3)
    t = plan.build(plan.TrainConfig, {"batch_size": 8})
    small_enough = lambda c, s: plan.worth_measuring(c.block_params, plan.run_tokens(s, 1), LOTS)  # noqa: E731
    speeds = plan.measure_speeds(cands, t, torch.device("cpu"), small_enough, log=lambda *_: None)
    assert len(speeds) == len(built) < len(cands)
    assert all(small_enough(c, s) for c, s in zip(cands, speeds[:-1])) and not small_enough(cands[len(speeds) - 1],
                                                                                              speeds[-1])
    built.clear()  # a time too short for every rung: only the first is timed
    speeds = plan.measure_speeds(cands, t, torch.device("cpu"), lambda c, s: plan.worth_measuring(
        c.block_params, plan.run_tokens(s, 1e-6), LOTS), log=lambda *_: None)
    assert len(speeds) == len(built) == 1


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture
def fake_speeds(monkeypatch):
    """measure_speeds without timing: speeds falling with size, the first three rungs measured."""
    calls = []

    def measure(cands, t, device, small_enough, eot_id=None, log=print):
        calls.append(cands)
        return by_size(cands[:3], 1e9)

    monkeypatch.setattr(plan, "measure_speeds", measure)
    return calls


def test_plan_prints_a_table_a_train_command_and_a_json_line(text_file, capsys, fake_speeds):
    code, out, err = run(["plan", str(text_file), "--minutes", "2", "--tokenizer-vocab", "300"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == JSON_KEYS
    assert set(result["shape"]) == {"n_layers", "emb_dim", "n_heads", "n_kv_heads", "head_dim", "intermediate_size"}
    assert sum("<- chosen" in line for line in lines) == 1
    command = next(line for line in lines if line.startswith("train it: "))
    shape = result["shape"]
    for flag, value in (("--recipe", "modern"), ("--tokenizer-vocab", "300"), ("--n-layers", shape["n_layers"]),
                        ("--emb-dim", shape["emb_dim"]), ("--batch-size", result["batch_size"]),
                        ("--context-length", result["context_length"]), ("--max-steps", result["steps"]),
                        ("--lr", result["lr"])):
        assert f" {flag} {value}" in command, flag
    assert result["tokens"] == result["steps"] * result["batch_size"] * result["context_length"]
    assert result["epochs"] <= plan.EPOCHS and result["device"].startswith("cpu")
    assert fake_speeds[0][0].config.vocab_size == 300


def test_plan_of_the_built_in_corpus_counts_its_training_split(capsys, fake_speeds):
    code, out, err = run(["plan", "--minutes", "1", "--val-fraction", "0.2"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert 50_000 < result["data_tokens"] < 150_000  # ~110K tokens of the 4,096-id BPE, 80% of them
    assert "--val-fraction 0.2" in out and fake_speeds[0][0].config.vocab_size == 4096


def test_plan_of_a_prepared_directory_counts_its_manifest(text_file, tmp_path, capsys, fake_speeds):
    code, _, err = run(["prepare", str(text_file), "--out", str(tmp_path / "prep"), "--workers", "0"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    code, out, err = run(["plan", str(tmp_path / "prep"), "--minutes", "1"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data_tokens"] == manifest["splits"]["train"]["tokens"]
    assert fake_speeds[0][0].config.vocab_size == 50257 and "--tokenizer-vocab" not in out  # the data's own tokenizer


def test_too_little_text_to_plan_is_one_line(tmp_path, capsys, fake_speeds):
    small = tmp_path / "small.txt"
    small.write_text("a few words, not enough for a plan.\n" * 20)
    code, out, err = run(["plan", str(small), "--minutes", "1", "--tokenizer-vocab", "300"], capsys)
    assert code == 1 and "too few to plan a run" in err and len(err.strip().splitlines()) == 1, err
    assert not fake_speeds


@pytest.mark.parametrize("args,message", [
    (["--minutes", "0"], "--minutes must be above 0"),
    (["--minutes", "-1"], "--minutes must be above 0"),
    ([], "give --minutes"),
    (["no-such-file.txt", "--minutes", "1"], "no-such-file.txt: no such file or directory"),
    (["--minutes", "1", "--tokenizer", "gpt2", "--tokenizer-vocab", "300"], "give only one"),
])
def test_bad_plan_input_is_one_line(args, message, capsys, fake_speeds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["plan", *args], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not fake_speeds  # refused before anything was timed


# ----------------------------------------------------------------------------- train --minutes


def test_minutes_settings_resolve(text_file, tmp_path):
    calls = []

    def planner(inputs, values):
        calls.append(values)
        return {"n_layers": 1, "emb_dim": 32, "n_heads": 1, "n_kv_heads": 1, "head_dim": 32,
                "intermediate_size": 96, "batch_size": 4, "lr": 1e-3, "max_tokens": 12345, "tokenizer_vocab": 300}

    data = [str(text_file)]
    cfg, _ = resolve_train_config(data, None, None, None, {"minutes": 0.5, "out": str(tmp_path / "a")},
                                  planner=planner)
    assert len(calls) == 1 and calls[0]["recipe"] == "modern" and calls[0]["minutes"] == 0.5
    assert (cfg.recipe, cfg.model.emb_dim, cfg.train.batch_size, cfg.train.max_tokens) == ("modern", 32, 4, 12345)
    assert cfg.data.tokenizer_vocab == 300 == cfg.model.vocab_size  # the vocabulary follows the plan's tokenizer
    assert cfg.train.optimizer == "muon"  # the recipe's settings stay under the plan's
    cfg, _ = resolve_train_config(data, None, None, None, {"minutes": 0.5, "lr": 2e-3, "batch_size": 16,
                                                           "out": str(tmp_path / "b")}, planner=planner)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.model.emb_dim) == (2e-3, 16, 32)  # flags win over the plan
    for named in ({"preset": "llama-tiny"}, {"emb_dim": 48}, {"n_layers": 3}):
        preset = named.pop("preset", None)
        cfg, _ = resolve_train_config(data, None, None, preset, {"minutes": 0.5, "out": str(tmp_path / "c"), **named},
                                      planner=planner)
        assert len(calls) == 2 and cfg.train.minutes == 0.5  # the shape is named: only the length is planned
    # the length: --minutes on the command line replaces a --config file's, and the other way round
    conf = tmp_path / "run.toml"
    conf.write_text("[train]\nminutes = 2.0\nmax_steps = 7\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"run.toml: minutes and max_steps both set the run's length"):
        resolve_train_config(data, str(conf), None, "mini", {"out": str(tmp_path / "d")}, planner=planner)
    cfg, _ = resolve_train_config(data, str(conf), None, "mini", {"max_steps": 3, "out": str(tmp_path / "d")})
    assert (cfg.train.max_steps, cfg.train.minutes) == (3, None)
    cfg, _ = resolve_train_config(data, str(conf), None, "mini", {"minutes": 1.0, "out": str(tmp_path / "d")})
    assert (cfg.train.max_steps, cfg.train.minutes) == (None, 1.0)


@pytest.mark.parametrize("args,message", [
    (["--minutes", "0"], "--minutes must be above 0"),
    (["--minutes", "-1"], "--minutes must be above 0"),
    (["--minutes", "1", "--max-steps", "5"], "--minutes 1 and --max-steps 5 both set the run's length"),
    (["--minutes", "1", "--max-tokens", "500"], "--minutes 1 and --max-tokens 500 both set"),
    (["--minutes", "1", "--epochs", "2"], "--minutes 1 and --epochs 2 both set"),
    (["missing.txt", "--minutes", "1"], "missing.txt: no such file or directory"),
])
def test_bad_train_minutes_input_is_one_line(args, message, capsys, fake_speeds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["train", *args, "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not fake_speeds and not (tmp_path / "run").exists()


TINY = ["--tokenizer-vocab", "300", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture
def step_seconds(monkeypatch):
    """The calibration's measured seconds per step, fixed (the real calibration still runs, on a throwaway model)."""
    real = plan.seconds_per_step
    calls = []

    def fixed(cfg, eot_id, device):
        calls.append(real(cfg, eot_id, device))
        return 0.5

    monkeypatch.setattr(plan, "seconds_per_step", fixed)
    return calls


def read_config(run_dir):
    return tomllib.loads((run_dir / "config.toml").read_text())


def test_train_minutes_records_the_planned_steps_and_resume_keeps_them(text_file, tmp_path, capsys, fake_speeds,
                                                                       step_seconds, monkeypatch):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", str(text_file), "--minutes", "0.05", *TINY, "--out", str(run_dir)], capsys)
    assert code == 0, err
    saved = read_config(run_dir)
    assert saved["train"]["max_steps"] == 6 and saved["train"]["minutes"] == 0.05  # 3 s at 0.5 s per step
    assert "max_tokens" not in saved["train"] and saved["recipe"] == "modern"
    assert saved["model"]["emb_dim"] in (32, 64, 96) and saved["data"]["tokenizer_vocab"] == 300  # the plan's
    assert "<- chosen" in out and "-> 6 steps in 0.05 minutes" in out and len(step_seconds) == 1
    # a resumed run keeps its steps: it is done at 6, and grows only with --max-steps, never timed again
    monkeypatch.setattr(plan, "seconds_per_step", lambda *a: pytest.fail("a resumed run was planned again"))
    code, out, err = run(["train", "--resume", str(run_dir)], capsys)
    assert code == 1 and "already finished at step 6" in err
    code, out, err = run(["train", "--resume", str(run_dir), "--minutes", "1"], capsys)
    assert code == 1 and "a resumed run keeps the max_steps" in err
    code, out, err = run(["train", "--resume", str(run_dir), "--max-steps", "8"], capsys)
    assert code == 0, err
    assert read_config(run_dir)["train"]["max_steps"] == 8 and "done: step 8" in out


def test_with_a_preset_or_shape_flags_only_the_length_is_planned(text_file, tmp_path, capsys, fake_speeds,
                                                                 step_seconds):
    for name, args, emb_dim in (("preset", ["--preset", "llama-tiny"], 64),
                                ("shape", ["--emb-dim", "48", "--n-layers", "1"], 48)):
        run_dir = tmp_path / name
        code, out, err = run(["train", str(text_file), "--minutes", "0.04", *args, *TINY, "--out", str(run_dir)],
                             capsys)
        assert code == 0, err
        saved = read_config(run_dir)
        assert (saved["model"]["emb_dim"], saved["train"]["max_steps"]) == (emb_dim, 4)
        assert "<- chosen" not in out and "recipe" not in saved
    assert not fake_speeds


def test_the_calibration_leaves_the_run_as_a_fixed_length_run_would_be(text_file, tmp_path, capsys, step_seconds):
    """The throwaway model's timing draws no random numbers of the run: --minutes giving 6 steps = --max-steps 6."""
    common = [str(text_file), "--preset", "llama-tiny", "--log-every", "1", *TINY]
    code, _, err = run(["train", *common, "--minutes", "0.05", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = run(["train", *common, "--max-steps", "6", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err

    def train_losses(run_dir):
        return [r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == "train"]

    assert len(train_losses(tmp_path / "a")) == 6 and train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_the_ranks_agree_on_the_plan_and_the_steps(text_file, tmp_path):
    """Rank 0 plans the shape and times the steps; a rank with another number would hang or fail the run."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", str(text_file), "--minutes", "0.02", "--nproc",
                           "2", *TINY, "--out", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = read_config(run_dir)["train"]["max_steps"]
    assert proc.stdout.count("<- chosen") == 1 and proc.stdout.count(" steps in 0.02 minutes") == 1
    assert f"done: step {steps}," in proc.stdout


@pytest.mark.slow
def test_plan_quality_benchmark_quick():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_quality.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["runs"] and {"corpus", "minutes", "plan_bpb", "grid_best_bpb", "ratio", "default_bpb"} <= \
        set(last["runs"][0])
