"""--logger: trackers get the run's metrics; their records are read back with each tracker's own files/reader."""

import importlib.util
import json

import pytest

from gptforge.cli import main
from gptforge.models.gpt2 import GPTConfig
from gptforge.runs.trackers import LOGGERS, check_loggers, open_trackers, scalars
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig

INSTALLED = [name for name in LOGGERS if importlib.util.find_spec(name) is not None]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 6-step tiny run logging to every installed tracker, in offline mode."""
    from pydoc_data.topics import topics

    mp = pytest.MonkeyPatch()
    for var in ("WANDB_MODE", "WANDB_API_KEY", "SWANLAB_MODE", "SWANLAB_API_KEY", "RANK"):
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_SILENT", "true")
    d = tmp_path_factory.mktemp("tracked")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    cfg = RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0),
                    train=TrainConfig(batch_size=4, max_steps=6, eval_every=3, eval_batches=2, log_every=2,
                                      sample_tokens=4, device="cpu", progress=False, logger=INSTALLED),
                    inputs=[str(text)])
    try:
        train(cfg, d / "run", log=lambda *a: None)
    finally:
        mp.undo()
    return d / "run"


@pytest.mark.skipif("tensorboard" not in INSTALLED, reason="needs tensorboard: pip install 'gptforge[tensorboard]'")
def test_tensorboard_events_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tokens_seen",
                "eval/train_loss", "eval/val_loss", "eval/val_perplexity", "eval/train_bpb", "eval/val_bpb"):
        assert tag in tags, (tag, tags)
    records = [json.loads(line) for line in open(tracked_run / "metrics.jsonl")]
    val = [(r["step"], r["val_loss"]) for r in records if r["event"] == "eval"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/val_loss")] == val
    bpb = [(r["step"], r["val_bpb"]) for r in records if r["event"] == "eval"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/val_bpb")] == bpb
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert any(tag.startswith("system/") for tag in tags)  # peak memory
    # samples as text, the config as text and as hyperparameters
    assert "samples" in "".join(acc.Tags()["tensors"])
    samples = [e for e in acc.Tensors("samples/text_summary")]
    assert len(samples) == 3 and b"Every effort moves you" in samples[0].tensor_proto.string_val[0]
    assert "_hparams_/session_start_info" in acc.summary_metadata


@pytest.mark.skipif("swanlab" not in INSTALLED, reason="needs swanlab: pip install 'gptforge[swanlab]'")
def test_swanlab_offline_records(tracked_run):
    runs = list((tracked_run / "swanlog").glob("run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("*.swanlab")).read_bytes()
    for tag in (b"train/loss", b"eval/val_loss", b"train/lr", b"samples"):
        assert tag in record, tag
    config = (runs[0] / "files" / "config.yaml").read_text()
    assert "max_steps" in config and "eval_every" in config
    texts = [p.read_text() for p in runs[0].rglob("media/**/*.txt")]
    assert any(t.startswith("Every effort moves you") for t in texts)


@pytest.mark.skipif("wandb" not in INSTALLED, reason="needs wandb: pip install 'gptforge[wandb]'")
def test_wandb_offline_records(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for tag in (b"train/loss", b"eval/val_loss", b"eval/val_perplexity", b"max_steps"):
        assert tag in record, tag
    tables = [json.loads(p.read_text()) for p in runs[0].rglob("samples_*.table.json")]
    last = max(tables, key=lambda t: len(t["data"]))
    assert last["columns"] == ["step", "sample"] and [row[0] for row in last["data"]] == [0, 3, 6]


def test_metrics_jsonl_always_written(tracked_run):
    events = {json.loads(line)["event"] for line in open(tracked_run / "metrics.jsonl")}
    assert events == {"train", "eval"}


def test_missing_tracker_is_a_one_line_error_before_training(tmp_path, capsys, monkeypatch, text_file):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    try:
        main(["train", str(text_file), "--out", str(tmp_path / "r"), "--logger", "wandb", "--device", "cpu"])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--logger wandb needs the wandb package: pip install 'gptforge[wandb]'" in err
    assert not (tmp_path / "r").exists()  # checked before anything was written


def test_logger_flag_choices_and_config_file(tmp_path, capsys, text_file):
    with pytest.raises(SystemExit) as e:
        main(["train", str(text_file), "--logger", "mlflow", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "'mlflow' is not one of" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text('[train]\nlogger = ["neptune"]\n')  # a config file is not checked by click's choices
    with pytest.raises(SystemExit) as e:
        main(["train", str(text_file), "--config", str(config), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.startswith("gptforge: error: --logger must be one of tensorboard, swanlab, wandb, got 'neptune'")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written
    with pytest.raises(Exception, match="logger must be a list"):
        check_loggers("tensorboard")
    with pytest.raises(Exception, match="unknown --logger 'neptune'"):
        check_loggers(["neptune"])


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    trackers = open_trackers(INSTALLED, tmp_path, {"train": {"lr": 1.0}})
    trackers.log({"event": "train", "step": 1, "train_loss": 1.0})
    trackers.close()
    assert trackers.trackers == [] and list(tmp_path.iterdir()) == []


def test_scalars_names_and_skips():
    s = scalars({"event": "eval", "step": 3, "tokens": 96, "train_loss": 2.0, "val_loss": 2.5,
                 "val_perplexity": float("inf"), "train_bpb": 1.25, "val_bpb": 1.5, "sample": "x", "mfu": 0.3})
    assert s == {"eval/tokens_seen": 96.0, "eval/train_loss": 2.0, "eval/val_loss": 2.5, "eval/train_bpb": 1.25,
                 "eval/val_bpb": 1.5, "eval/mfu": 0.3}
    moe = scalars({"event": "train", "step": 1, "aux_loss": 0.01, "expert_load": [[0.75, 0.25], [0.5, 0.5]]})
    assert {k: v for k, v in moe.items() if not k.startswith("system/")} == {
        "train/aux_loss": 0.01, "train/expert_load/layer0/expert0": 0.75, "train/expert_load/layer0/expert1": 0.25,
        "train/expert_load/layer1/expert0": 0.5, "train/expert_load/layer1/expert1": 0.5}


@pytest.mark.skipif("tensorboard" not in INSTALLED, reason="needs tensorboard: pip install 'gptforge[tensorboard]'")
def test_tensorboard_resume_replaces_the_interrupted_steps(tmp_path):
    """A run resumed from step 2 hides what the interrupted run logged after step 2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptforge.runs.trackers import TensorBoardTracker

    first = TensorBoardTracker(tmp_path, {"train": {"lr": 0.1}}, resume_step=None)
    for step in (1, 2, 3, 4):
        first.log({"event": "train", "step": step, "train_loss": 10.0 + step})
    first.close()
    again = TensorBoardTracker(tmp_path, {"train": {"lr": 0.1}}, resume_step=2)
    for step in (3, 4, 5):
        again.log({"event": "train", "step": step, "train_loss": float(step)})
    again.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0),
                                                                     (5, 5.0)]
