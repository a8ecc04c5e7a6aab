"""The best checkpoint: kept whatever --keep-last says, named in best.json, resumed exactly, used by the commands
that take a run as SOURCE; the overfitting line and --early-stop.

The loop's bookkeeping is tested against a scripted evaluation (val and train loss per step, set on the record the
real evaluation returns), so a "rising val loss" is certain on any machine; the model still trains for real."""

import json

import pytest
import torch
from clirun import run
from rundirs import cut_after
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt
from gptforge.config import ConfigError
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.training import train
from gptforge.training.best import PATIENCE, Best
from gptforge.training.config import RunConfig, TrainConfig
from gptforge.training.loop import Evaluator

# val loss falls to its best at step 4, then rises while the train loss keeps falling
RISING = {2: (5.0, 6.0), 4: (4.0, 5.0), 6: (4.5, 4.5), 8: (4.6, 4.0), 10: (4.7, 3.8), 12: (4.8, 3.5)}


@pytest.fixture
def small_text(tmp_path):
    """~900 GPT-2 tokens: 5 batches of 4 windows per epoch, so a dozen steps are a few epochs."""
    from pydoc_data.topics import topics

    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:3])[:3500], encoding="utf-8")
    return path


@pytest.fixture
def scripted(monkeypatch):
    """Evaluations report the (val_loss, train_loss) a script gives for their step (others as measured)."""

    def install(script: dict[int, tuple[float, float]]):
        real = Evaluator.__call__

        def evaluate(self, model, state):
            record = real(self, model, state)
            if state.step in script:
                val, trained = script[state.step]
                record = dict(record, val_loss=val, val_bpb=val / 2, train_loss=trained)
            return record

        monkeypatch.setattr(Evaluator, "__call__", evaluate)

    return install


def tiny(text, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=12, eval_every=2, eval_batches=1, log_every=1, sample_tokens=0, lr=2e-3,
             warmup_steps=1, seed=5, device="cpu", progress=False, save_every=4, keep_last=1)
    t.update(train_kw)
    return RunConfig(model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1),
                     data=DataConfig(val_fraction=0.2), train=TrainConfig(**t), inputs=[str(text)])


def steps_kept(run_dir) -> list[int]:
    return [int(d.name[5:]) for d in ckpt.checkpoint_dirs(run_dir)]


def quiet(*_):
    pass


# ----------------------------------------------------------------------------- Best on its own


def observe_all(best: Best, curve, epochs=3.0, early_stop=None):
    return [best.observe(dict(step=s, tokens=s * 10, val_loss=v, train_loss=t), epochs, early_stop)
            for s, (v, t) in curve.items()]


def test_a_falling_val_loss_never_warns_and_every_evaluation_is_a_new_best():
    falling = {s: (5.0 - 0.1 * s, 6.0 - 0.2 * s) for s in range(2, 40, 2)}
    verdicts = observe_all(Best(), falling)
    assert all(v.new_best and v.message is None and v.stop is None for v in verdicts)


def test_the_overfitting_line_comes_once_per_episode():
    curve = {**RISING, 14: (3.9, 3.3), 16: (4.2, 3.2), 18: (4.3, 3.1), 20: (4.4, 3.0)}
    best = Best()
    verdicts = observe_all(best, curve)
    warned = [s for s, v in zip(curve, verdicts) if v.message]
    assert warned == [4 + 2 * PATIENCE, 14 + 2 * PATIENCE]  # after PATIENCE evaluations without a new best
    assert "best 4.0000 (step 4)" in verdicts[3].message and "3.0 epochs" in verdicts[3].message
    assert (best.step, best.val_loss, best.stale) == (14, 3.9, 3)


def test_no_overfitting_line_when_train_loss_did_not_fall_or_within_the_first_epoch():
    flat_train = {s: (v, 5.0) for s, (v, _) in RISING.items()}
    assert not any(v.message for v in observe_all(Best(), flat_train))
    assert not any(v.message for v in observe_all(Best(), RISING, epochs=0.9))


def test_early_stop_after_n_evaluations_without_a_new_best():
    verdicts = observe_all(Best(), RISING, early_stop=3)
    assert [v.stop is not None for v in verdicts] == [False, False, False, False, True, True]
    assert "--early-stop 3" in verdicts[4].stop and "best 4.0000 at step 4" in verdicts[4].stop


def test_step_zero_and_runs_without_val_have_no_best():
    best = Best()
    assert not best.observe(dict(step=0, tokens=0, val_loss=1.0, train_loss=1.0), 0.0, None).new_best
    assert not best.observe(dict(step=2, tokens=8, train_loss=1.0), 0.1, None).new_best
    assert best.step is None


# ----------------------------------------------------------------------------- in a run


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_best_checkpoint_survives_keep_last_1(small_text, tmp_path, scripted, capsys, fmt):
    scripted(RISING)
    run_dir = tmp_path / "run"
    summary = train(tiny(small_text, checkpoint_format=fmt), run_dir)
    assert steps_kept(run_dir) == [4, 12]  # the best (saved though --save-every 4 would too) and the newest
    best = json.loads((run_dir / ckpt.BEST).read_text())
    assert best == {"step": 4, "val_loss": 4.0, "val_bpb": 2.0, "tokens": 4 * 4 * 32,
                    "checkpoint": "checkpoints/step-00000004"}
    assert summary["best"]["step"] == 4
    out = capsys.readouterr().out
    assert out.count("overfitting:") == 1  # at step 8: two evaluations without a new best, train loss falling
    ckpt.verify_checkpoint(run_dir / best["checkpoint"])


def test_a_new_best_saves_whatever_save_every_says(small_text, tmp_path, scripted):
    scripted({2: (5.0, 6.0), 4: (4.0, 5.0), 6: (3.0, 4.0), 8: (3.5, 3.0), 10: (3.6, 2.0), 12: (3.7, 1.0)})
    run_dir = tmp_path / "run"
    train(tiny(small_text, save_every=100, keep_last=0), run_dir, log=quiet)
    assert steps_kept(run_dir) == [2, 4, 6, 12]  # each new best, and the end


def test_resumed_run_keeps_its_best_bit_for_bit(small_text, tmp_path, scripted):
    scripted(RISING)
    cfg = tiny(small_text, save_every=2, keep_last=2)
    full = tmp_path / "full"
    train(cfg, full, log=quiet)
    cut = cut_after(full, tmp_path / "cut", 6)
    (cut / ckpt.BEST).unlink()  # a kill can leave best.json behind its checkpoint: the resume rewrites it
    train(cfg, cut, resume=True, log=quiet)
    assert (cut / ckpt.BEST).read_text() == (full / ckpt.BEST).read_text()
    assert steps_kept(cut) == steps_kept(full) == [4, 10, 12]
    a, b = (load_file(str(d / "checkpoints/step-00000012" / ckpt.WEIGHTS)) for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_ends_the_run_and_resume_does_not_restart_it(small_text, tmp_path, scripted, capsys):
    scripted(RISING)
    run_dir = tmp_path / "run"
    summary = train(tiny(small_text, early_stop=3, max_steps=40), run_dir)
    assert summary["steps"] == 10 and "--early-stop 3" in summary["stopped_by"]
    assert steps_kept(run_dir) == [4, 10]  # the best and the checkpoint where it stopped
    assert "stopped early at step 10" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="ended early at step 10"):
        train(tiny(small_text, early_stop=3, max_steps=40), run_dir, resume=True, log=quiet)
    summary = train(tiny(small_text, early_stop=0, max_steps=14), run_dir, resume=True, log=quiet)
    assert summary["steps"] == 14 and summary["stopped_by"] is None


def test_a_run_without_val_split_writes_no_best(small_text, tmp_path):
    cfg = tiny(small_text)
    cfg.data = DataConfig(val_fraction=0.0)
    train(cfg, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run" / ckpt.BEST).exists()


# ----------------------------------------------------------------------------- the commands use the best


@pytest.fixture
def rising_run(small_text, tmp_path, scripted):
    scripted(RISING)
    run_dir = tmp_path / "run"
    train(tiny(small_text, save_every=2, keep_last=3), run_dir, log=quiet)
    assert steps_kept(run_dir) == [4, 8, 10, 12]
    return run_dir


def eval_loss(args, capsys):
    code, out, err = run(["eval", *args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["loss"], err


def test_eval_uses_and_names_the_best_checkpoint(rising_run, small_text, capsys):
    run_dir, text = str(rising_run), str(small_text)
    loss, err = eval_loss([run_dir, text], capsys)
    assert "step-00000004: best val loss 4.0000 at step 4; newest is step 12" in err
    assert loss == eval_loss([f"{run_dir}/checkpoints/step-00000004", text], capsys)[0]
    latest, err = eval_loss([run_dir, text, "--checkpoint", "latest"], capsys)
    assert "the newest checkpoint (--checkpoint latest)" in err
    assert latest == eval_loss([f"{run_dir}/checkpoints/step-00000012", text], capsys)[0] != loss
    assert eval_loss([run_dir, text, "--checkpoint", "10"], capsys)[0] == \
        eval_loss([f"{run_dir}/checkpoints/step-00000010", text], capsys)[0]
    code, _, err = run(["eval", run_dir, text, "--checkpoint", "6"], capsys)
    assert code == 1 and "no checkpoint of step 6 (it has steps 4, 8, 10, 12)" in err and err.count("\n") == 1
    code, _, err = run(["eval", f"{run_dir}/checkpoints/step-00000004", text, "--checkpoint", "best"], capsys)
    assert code == 1 and "not a run directory" in err
    code, _, err = run(["eval", run_dir, text, "--checkpoint", "newest"], capsys)
    assert code == 1 and "choose best, latest or a step number" in err


def test_a_run_from_an_earlier_release_means_its_newest(rising_run, small_text, capsys):
    (rising_run / ckpt.BEST).unlink()
    loss, err = eval_loss([str(rising_run), str(small_text)], capsys)
    assert "step-00000012: the newest checkpoint (the run has no best.json" in err
    assert loss == eval_loss([f"{rising_run}/checkpoints/step-00000012", str(small_text)], capsys)[0]


def test_a_damaged_best_falls_back_to_the_newest_with_a_warning(rising_run, small_text, capsys):
    weights = rising_run / "checkpoints/step-00000004" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    _, err = eval_loss([str(rising_run), str(small_text)], capsys)
    assert "warning: the best checkpoint is unusable" in err and "step-00000012" in err


def test_generate_convert_serve_and_init_from_take_the_best(rising_run, small_text, tmp_path, capsys, monkeypatch):
    code, _, err = run(["generate", str(rising_run), "--prompt", "The", "--max-new-tokens", "3"], capsys)
    assert code == 0 and "best val loss 4.0000 at step 4" in err
    code, _, err = run(["convert", str(rising_run), "--to", "gptforge", str(tmp_path / "out"), "--checkpoint", "8"],
                       capsys)
    assert code == 0 and "step 8 (--checkpoint 8)" in err
    assert (load_file(str(tmp_path / "out" / ckpt.WEIGHTS))["wte.weight"] ==
            load_file(str(rising_run / "checkpoints/step-00000008" / ckpt.WEIGHTS))["wte.weight"]).all()
    served = []
    monkeypatch.setattr("gptforge.cli.run_server", lambda source, settings, log: served.append(source))
    assert run(["serve", str(rising_run)], capsys)[0] == 0
    assert served == [str(rising_run / "checkpoints/step-00000004")]
    code, _, err = run(["train", str(small_text), "--init-from", str(rising_run), "--out", str(tmp_path / "ft"),
                        "--max-steps", "1", "--batch-size", "2", "--sample-tokens", "0", "--device", "cpu",
                        "--no-progress"], capsys)
    assert code == 0, err
    assert "--init-from: using" in err and "step-00000004" in err
    assert f'init_from = "{rising_run / "checkpoints/step-00000004"}"' in (tmp_path / "ft/config.toml").read_text()


def test_a_diverging_run_is_told_once_and_a_sound_one_never(small_text, tmp_path, capsys):
    """A train loss above 1.5 x ln V (guessing every token alike) says the run diverged, once, naming the lr; the
    same run at a sound lr says nothing."""
    from gptforge.training.best import diverging

    assert diverging(10.9, 1, 50257, 4e-4) is None  # an untrained model (the book's init starts at 10.98)
    assert diverging(float("nan"), 1, 50257, 4e-4) is None  # non-finite: the step itself stops the run
    assert "train loss 17 at step 3 is above 1.5 x 10.82" in diverging(17.0, 3, 50257, 1.0)
    train(tiny(small_text, lr=50.0, grad_clip=0.0, max_steps=6, eval_every=6), tmp_path / "hot", log=quiet)
    out = capsys.readouterr().out
    assert out.count("diverging: train loss") == 1 and "the learning rate 50 is likely too high" in out
    train(tiny(small_text, max_steps=6, eval_every=6), tmp_path / "sound", log=quiet)
    assert "diverging" not in capsys.readouterr().out
