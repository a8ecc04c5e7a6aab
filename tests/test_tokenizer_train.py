"""Your own tokenizer: byte-level BPE training, round trips, and the tokenizer travelling with data and checkpoints."""

import json

import pytest
from clirun import run

from gptforge.config import ConfigError
from gptforge.tokenizer import ENDOFTEXT, HFTokenizer, get_tokenizer, tokenizer_from_metadata, train_bpe
from gptforge.weights import load_model

ROUND_TRIP = [
    "Every effort moves you",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand   runs     of      spaces",
    "unicode: héllo wörld, naïve café, 東京タワー, Ελληνικά, emoji 🤖🚀 and ZWJ 👩‍👩‍👧",
    "code: def f(x):\n    return x**2  # comment\n",
    "first document<|endoftext|>second document",
    "",
]


@pytest.fixture(scope="module")
def corpus_texts():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:30]]


@pytest.fixture(scope="module")
def bpe(corpus_texts):
    return train_bpe(corpus_texts, vocab_size=400)




def test_trained_bpe_has_the_size_asked_and_an_end_of_text_token(bpe):
    assert bpe.vocab_size == 400
    assert bpe.encode(ENDOFTEXT) == [bpe.eot_id] and bpe.decode([bpe.eot_id]) == ENDOFTEXT
    assert len(bpe.encode("the statement")) < len(b"the statement")  # it learned merges


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_trained_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_training_is_deterministic_and_the_name_is_the_content_hash(corpus_texts, bpe, tmp_path):
    again = train_bpe(corpus_texts, vocab_size=400)
    assert again.json == bpe.json and again.name == bpe.name
    (tmp_path / "tokenizer.json").write_text(bpe.json)
    loaded = get_tokenizer(str(tmp_path))  # a directory holding tokenizer.json, or the file itself
    assert loaded.name == get_tokenizer(str(tmp_path / "tokenizer.json")).name == bpe.name
    assert train_bpe(corpus_texts, vocab_size=300).name != bpe.name


def test_bad_tokenizer_specs():
    with pytest.raises(ConfigError, match="unknown tokenizer 'gpt3'"):
        get_tokenizer("gpt3")
    with pytest.raises(ConfigError, match="vocab-size 100 is too small"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ConfigError, match="not a Hugging Face tokenizer.json"):
        HFTokenizer("{}")


def test_tokenizer_travels_from_training_to_data_to_checkpoint(tmp_path, corpus_texts, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "a.jsonl", "w") as f:
        for t in corpus_texts:
            f.write(json.dumps({"text": t}) + "\n")
    code, out, err = run(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")],
                         capsys)
    assert code == 0, err
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 300

    code, out, err = run(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok"),
                          "--val-docs", "3", "--no-progress", "--workers", "1"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == tok.name and manifest["vocab_size"] == 300
    assert (tmp_path / "data" / "tokenizer.json").read_text() == tok.json

    args = ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny", "--context-length",
            "32", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1",
            "--sample-tokens", "4", "--device", "cpu", "--no-progress"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    model, meta = load_model(tmp_path / "run")
    assert model.cfg.vocab_size == 300  # the model's vocabulary follows the tokenizer when not set
    assert tokenizer_from_metadata(meta).name == tok.name  # the checkpoint alone rebuilds the tokenizer

    (tmp_path / "tok" / "tokenizer.json").unlink()
    code, out, err = run(["generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "5",
                          "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("The"), err
    code, out, err = run(["eval", str(tmp_path / "run"), str(tmp_path / "data"), "--device", "cpu", "--json"],
                         capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["tokens"] > 0

    # a model and data made with different tokenizers: one clear line, no traceback
    code, out, err = run(["prepare", str(corpus), "--out", str(tmp_path / "gpt2data"), "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", str(tmp_path / "run"), str(tmp_path / "gpt2data"), "--device", "cpu"], capsys)
    *note, error = err.strip().splitlines()  # the checkpoint the run directory means, then the one error line
    assert note == [f"gptforge: using {tmp_path / 'run/checkpoints/step-00000002'}: best val loss {meta_best(tmp_path)}"
                    " at step 2; newest is step 2"]
    assert code == 1 and "was tokenized with gpt2" in error and tok.name in error and "Traceback" not in err
    code, out, err = run(args[:1] + [str(tmp_path / "gpt2data"), "--out", str(tmp_path / "run2"), "--tokenizer",
                                     str(tmp_path / "data")] + args[4:], capsys)
    assert code == 1 and "was tokenized with gpt2" in err
    code, out, err = run(args[:1] + [str(tmp_path / "data"), "--out", str(tmp_path / "run3"), "--vocab-size", "200"]
                         + args[4:], capsys)
    assert code == 1 and "vocab_size 200 is smaller than the tokenizer's 300" in err


def test_out_is_checked_before_training_and_kept_without_overwrite(tmp_path, corpus_texts, capsys, read_only_dir,
                                                                    monkeypatch):
    from gptforge import tokenizer
    from gptforge.tokenizer import train as tokenizer_train

    corpus = tmp_path / "a.txt"
    corpus.write_text("\n".join(corpus_texts[:5]))
    args = ["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out"]
    code, out, err = run(args + [str(tmp_path / "tok")], capsys)
    assert code == 0, err
    first = (tmp_path / "tok" / "tokenizer.json").read_text()

    real_train_bpe = tokenizer.train_bpe
    trained = []  # train_tokenizer's own reference to train_bpe is the one that trains
    monkeypatch.setattr(tokenizer_train, "train_bpe", lambda *a, **k: trained.append(1) or real_train_bpe(*a, **k))
    for where, says in ((tmp_path / "tok", "already holds tokenizer.json; pass --overwrite to replace it"),
                        (read_only_dir / "tok", f"cannot write in {read_only_dir} ("),
                        (corpus, "is a file, not a directory")):
        code, out, err = run(args + [str(where)], capsys)
        assert code == 1 and err.count("\n") == 1 and says in err, err
    assert not trained  # refused before training started
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == first

    code, out, err = run(args[:4] + ["400", "--out", str(tmp_path / "tok"), "--overwrite"], capsys)
    assert code == 0 and trained, err
    assert get_tokenizer(str(tmp_path / "tok")).vocab_size == 400


def meta_best(tmp_path) -> str:
    return f"{json.loads((tmp_path / 'run/best.json').read_text())['val_loss']:.4f}"
