"""--tokenizer-vocab: a byte-level BPE trained on the run's training text when the run starts, and the default
run (no DATA) that uses it with the modern recipe."""

from __future__ import annotations

import json
import shutil

import pytest
from clirun import run

from gptforge import checkpoint as ckpt
from gptforge.config import ConfigError
from gptforge.data import read_texts
from gptforge.tokenizer import get_tokenizer, train_bpe
from gptforge.training import train
from gptforge.training.config import DEFAULT_CORPUS_RUN, resolve_train_config
from gptforge.training.state import training_text

TINY = ["--arch", "llama", "--preset", "llama-tiny", "--context-length", "32", "--batch-size", "4", "--device", "cpu",
        "--no-progress", "--sample-tokens", "0", "--log-every", "1"]


def train_records(run_dir):
    return [(r["step"], r["lr"], r["train_loss"]) for r in map(json.loads, open(run_dir / ckpt.METRICS))
            if r["event"] == "train"]


def test_training_text_is_the_first_share_of_the_characters():
    texts = ["abcdefghij", "klmnopqrst"]
    assert training_text(texts, 0.25) == ["abcdefghij", "klmno"]
    assert training_text(texts, 0.0) == texts
    assert "".join(training_text(["x" * 999], 0.1)) == "x" * 899


def test_run_trains_its_tokenizer_keeps_it_and_resumes_with_it(text_file, tmp_path, capsys):
    full = tmp_path / "full"
    code, out, err = run(["train", str(text_file), "--out", str(full), "--tokenizer-vocab", "300", "--max-steps", "8",
                          "--save-every", "2", "--keep-last", "0", "--eval-every", "4", *TINY], capsys)
    assert code == 0, err
    # the file is the BPE trained on the train split's share of the text, and the model has its ids
    expected = train_bpe(training_text(read_texts([text_file]), 0.1), 300)
    assert (full / ckpt.RUN_TOKENIZER).read_text(encoding="utf-8") == expected.json
    assert train_bpe(training_text(read_texts([text_file]), 0.1), 300).json == expected.json  # deterministic
    cfg, _ = resolve_train_config((), None, str(full), None, {})
    assert cfg.data.tokenizer_vocab == 300 and cfg.model.vocab_size == 300
    # the checkpoint carries the tokenizer: eval needs nothing else (bits per byte through its byte table)
    code, out, err = run(["eval", str(full), str(text_file), "--json"], capsys)
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    code, out, err = run(["eval", str(full), str(text_file), "--json", "--tokenizer", str(full / "tokenizer.json")],
                         capsys)
    assert code == 0, err
    assert scores["bpb"] is not None and json.loads(out.strip().splitlines()[-1]) == scores

    # resumed from step 4: the same losses; also when tokenizer.json was deleted (trained again, identically)
    for name, delete in (("cut", False), ("cut-deleted", True)):
        cut = tmp_path / name
        shutil.copytree(full, cut)
        for d in ckpt.checkpoint_dirs(cut):
            if int(d.name.split("-")[1]) > 4:
                shutil.rmtree(d)
        if delete:
            (cut / ckpt.RUN_TOKENIZER).unlink()
        cfg, run_dir = resolve_train_config((), None, str(cut), None, {})
        train(cfg, run_dir, resume=True, log=lambda *_: None)
        assert train_records(cut) == train_records(full)
        assert (cut / ckpt.RUN_TOKENIZER).read_text(encoding="utf-8") == expected.json


def test_a_run_that_fails_before_training_leaves_its_directory_reusable(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", str(text_file), "--out", str(out), "--tokenizer-vocab", "300", "--max-steps", "2",
                        *TINY, "--context-length", "50000"], capsys)  # longer than the text: refused at the data
    assert code == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written: the same --out works once fixed
    code, _, err = run(["train", str(text_file), "--out", str(out), "--tokenizer-vocab", "300", "--max-steps", "2",
                        *TINY], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer", "TOK"], "--tokenizer .* and --tokenizer-vocab both choose the tokenizer; give only one"),
    (["--tokenizer-vocab", "200"], "--tokenizer-vocab 200 is too small: a byte-level BPE needs at least 257 ids"),
])
def test_tokenizer_vocab_refusals(text_file, tmp_path, extra, message, capsys):
    tok = tmp_path / "tok.json"
    tok.write_text(train_bpe(["some text to train on, " * 20], 300).json, encoding="utf-8")
    args = [a.replace("TOK", str(tok)) for a in extra]
    if "--tokenizer-vocab" not in args:
        args += ["--tokenizer-vocab", "300"]
    code, _, err = run(["train", str(text_file), "--out", str(tmp_path / "r"), *args, *TINY], capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_tokenizer_vocab_is_refused_for_prepared_data_and_init_from(text_file, tmp_path, capsys):
    code, _, err = run(["prepare", str(text_file), "--out", str(tmp_path / "data")], capsys)
    assert code == 0, err
    with pytest.raises(ConfigError, match="is prepared with its own tokenizer: leave --tokenizer-vocab out"):
        resolve_train_config([str(tmp_path / "data")], None, None, None,
                             {"out": str(tmp_path / "a"), "tokenizer_vocab": 300})
    code, _, err = run(["train", str(text_file), "--out", str(tmp_path / "b"), "--max-steps", "1", "--preset", "tiny",
                        "--context-length", "16", "--no-progress", "--sample-tokens", "0"], capsys)
    assert code == 0, err
    with pytest.raises(ConfigError, match="--init-from .* brings its model's own vocabulary"):
        resolve_train_config([str(text_file)], None, None, None, {"out": str(tmp_path / "c"), "tokenizer_vocab": 300},
                             init_from=str(tmp_path / "b"))


def test_the_default_run_is_the_modern_recipe_with_a_trained_tokenizer(tmp_path):
    cfg, _ = resolve_train_config((), None, None, None, {"out": str(tmp_path / "a")})
    assert cfg.recipe == "modern" and cfg.model.qk_norm and cfg.train.optimizer == "muon"
    assert cfg.data.tokenizer_vocab == DEFAULT_CORPUS_RUN["tokenizer_vocab"] == cfg.model.vocab_size
    # a model named by the user: no recipe; the built-in corpus's settings stay
    cfg, _ = resolve_train_config((), None, None, "mini", {"out": str(tmp_path / "b")})
    assert cfg.recipe is None and cfg.train.optimizer == "adamw" and cfg.model.vocab_size == 4096
    # the user's tokenizer replaces the trained one, and the vocabulary follows it
    cfg, _ = resolve_train_config((), None, None, None, {"out": str(tmp_path / "c"), "tokenizer": "gpt2"})
    assert cfg.data.tokenizer_vocab is None and cfg.model.vocab_size == get_tokenizer("gpt2").vocab_size
    # --packing pad replaces the recipe's document mask (one document per row has nothing to mask)
    cfg, _ = resolve_train_config((), None, None, None, {"out": str(tmp_path / "e"), "packing": "pad"})
    assert cfg.recipe == "modern" and cfg.data.packing == "pad" and not cfg.data.document_mask
    # with DATA, the default tokenizer is GPT-2's, as before
    cfg, _ = resolve_train_config(["x.txt"], None, None, None, {"out": str(tmp_path / "d")})
    assert cfg.recipe is None and cfg.data.tokenizer_vocab is None and cfg.model.vocab_size == 50257


def test_the_default_run_benchmark_quick_mode(tmp_path):
    """`gptforge train` with no DATA, end to end (6 steps): the trained tokenizer, the llama model, bpb."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "default_run.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["recipe"] == "modern" and result["steps"] == 6
    assert result["val_bpb_end"] < result["val_bpb_start"]
    assert (tmp_path / "run" / ckpt.RUN_TOKENIZER).is_file()
