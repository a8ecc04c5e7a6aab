"""A run directory and prepared data written by release 0.1.0 still resume, evaluate, generate and convert.

tests/data/release-0.1 was made by that release's own code (tests/data/make_release_run.py, commit
59ce805): a 320-id tokenizer, prepared shards, a 6-step run trained on them, and what the
release's eval and generate printed for it.
"""

import json
import shutil
from pathlib import Path

import pytest
from clirun import run

RELEASE = Path(__file__).parent / "data" / "release-0.1"


@pytest.fixture
def release(tmp_path, monkeypatch):
    root = tmp_path / "release"
    shutil.copytree(RELEASE, root)
    monkeypatch.chdir(root)  # the run's config.toml names its data by relative path
    return root, json.loads((root / "expected.json").read_text())


def test_release_run_evaluates_and_generates_as_it_did(release, capsys):
    root, expected = release
    code, out, err = run(["eval", "run", "data", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["tokens"] == expected["eval"]["tokens"]
    assert got["loss"] == pytest.approx(expected["eval"]["loss"], abs=1e-6)
    code, out, err = run(["generate", "run", "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    assert out == expected["generate"]


def test_release_run_resumes_and_its_history_is_kept(release, capsys):
    root, _ = release
    before = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    code, out, err = run(["train", "--resume", "run", "--max-steps", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming run from step 6" in out and "done: step 8" in out
    after = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before and after[-1]["step"] == 8


def test_release_data_trains_a_new_run_and_converts(release, capsys, tmp_path):
    code, out, err = run(["train", "data", "--out", "new", "--preset", "tiny", "--context-length", "32",
                          "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "0",
                          "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run(["convert", "run", "--to", "hf", "hf"], capsys)
    assert code == 0, err
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained("hf")
    assert model.config.vocab_size == 320 and model.config.n_embd == 16
