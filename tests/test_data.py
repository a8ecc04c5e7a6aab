import gzip

import numpy as np
import pytest
import torch

from gptforge.data import (
    Batches,
    DataError,
    TokenWindows,
    check_windows,
    read_texts,
    split_tokens,
    tokenize_documents,
)
from gptforge.tokenizer import GPT2Tokenizer


def test_targets_are_inputs_shifted_by_one_and_stride_respected():
    tokens = np.arange(100, dtype=np.uint16)
    w = TokenWindows(tokens, context_length=10, stride=7)
    assert len(w) == (100 - 11) // 7 + 1
    for i in range(len(w)):
        x, y = w[i]
        assert x.tolist() == list(range(7 * i, 7 * i + 10))
        assert y.tolist() == list(range(7 * i + 1, 7 * i + 11))
    x, y = w.batch(np.array([0, 3]))
    assert x.shape == (2, 10) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_default_stride_is_context_length_and_last_window_fits():
    tokens = np.arange(41, dtype=np.uint16)
    w = TokenWindows(tokens, context_length=10)
    assert len(w) == 4  # starts 0, 10, 20, 30; the last target is token 40
    assert w[3][1][-1].item() == 40
    assert len(TokenWindows(tokens[:10], context_length=10)) == 0


def test_windows_share_one_token_array():
    tokens = np.arange(1000, dtype=np.uint16)
    w = TokenWindows(tokens, context_length=8, stride=1)
    assert w.tokens is tokens  # no copy, no tensor per window


def test_shuffle_is_seeded_and_drop_last():
    w = TokenWindows(np.arange(1001, dtype=np.uint16), context_length=10)  # 100 windows
    a = Batches(w, batch_size=32, shuffle=True, drop_last=True, seed=1)
    b = Batches(w, batch_size=32, shuffle=True, drop_last=True, seed=1)
    c = Batches(w, batch_size=32, shuffle=True, drop_last=True, seed=2)
    assert len(a) == 3
    assert [x.tolist() for x, _ in a.epoch(0)] == [x.tolist() for x, _ in b.epoch(0)]
    assert not np.array_equal(a.order(0), c.order(0))
    assert not np.array_equal(a.order(0), a.order(1))  # a new order each epoch
    assert sorted(a.order(0).tolist()) == list(range(100))
    assert len(Batches(w, 32, shuffle=False, drop_last=False)) == 4
    # resuming mid-epoch yields exactly the remaining batches
    full = [x for x, _ in a.epoch(1)]
    rest = [x for x, _ in a.epoch(1, start=1)]
    assert all(torch.equal(p, q) for p, q in zip(full[1:], rest))


def test_split_and_document_separator(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    tok = GPT2Tokenizer()
    tokens = tokenize_documents(read_texts([tmp_path]), tok)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode("first document") + [50256] + tok.encode("second document")
    train, val = split_tokens(np.arange(100), 0.1)
    assert len(train) == 90 and val.tolist() == list(range(90, 100))
    train, val = split_tokens(np.arange(100), 0.0)
    assert len(train) == 100 and len(val) == 0


def test_too_little_text_names_the_counts():
    w = TokenWindows(np.arange(50, dtype=np.uint16), context_length=64)
    with pytest.raises(DataError, match=r"train split has 50 tokens.*needs context_length \+ 1 = 65"):
        check_windows(w, 50, "train", 4, drop_last=True)
    w = TokenWindows(np.arange(200, dtype=np.uint16), context_length=64)
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        check_windows(w, 200, "train", 8, drop_last=True)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_texts([tmp_path / "missing.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_texts([empty])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: invalid UTF-8 at byte 12 \(line 2\)"):
        read_texts([bad])
    d = tmp_path / "nothing"
    d.mkdir()
    (d / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="holds no text files"):
        read_texts([d])


def test_unreadable_file_and_special_files(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.txt: not a regular file"):
        read_texts([fifo])
    f = tmp_path / "secret.txt"
    f.write_text("x")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root can read anything, so simulate the refusal
    with pytest.raises(DataError, match=r"secret.txt: cannot read file \(Permission denied\)"):
        read_texts([f])


def test_default_corpus_when_no_inputs():
    texts = read_texts([])
    assert len(texts) == 1 and len(texts[0]) > 400_000


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("name, content, says", [
    ("a.jsonl", b'{"text": "hello"}\n', "a.jsonl: a JSON Lines file; only gptforge prepare reads those: gptforge "
                                        "prepare"),
    ("a.json", b'{"text": "hello"}', "a.json: a JSON Lines file"),
    ("a.txt.gz", gzip.compress(b"hello"), "a.txt.gz: a gzip-compressed file"),
    ("a.txt.zst", _zstd(b"hello"), "a.txt.zst: a zstd-compressed file"),
    ("a.parquet", b"PAR1", "a.parquet: a Parquet file"),
    ("nul.txt", b"\0" * 100, r"nul.txt: a binary file, not text (a NUL byte at byte 0)"),
    ("utf16.txt", "hello".encode("utf-16"), "utf16.txt: a binary file, not text (a NUL byte at byte 3); give UTF-8 "
                                            "text (a UTF-16 file: convert it with iconv -f utf-16 -t utf-8)"),
    ("controls.txt", bytes(range(1, 9)) * 20 + b"some text", "controls.txt: a binary file, not text (95% of its "
                                                             "bytes are control characters); give UTF-8 text"),
])
def test_files_that_are_not_plain_text_are_refused(tmp_path, name, content, says):
    """train and eval read plain UTF-8 text; other formats point to prepare, binary files are not taken for text."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        read_texts([tmp_path / name])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_text_with_tabs_escapes_and_form_feeds_is_text(tmp_path):
    text = "col\tcol\r\n\x1b[1mbold\x1b[0m\x0cpage two\n"
    (tmp_path / "a.txt").write_text(text)
    assert read_texts([tmp_path / "a.txt"]) == [text]


def test_directory_of_prepare_formats_points_to_prepare(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(_zstd(b'{"text": "hello"}\n'))
    with pytest.raises(DataError, match=r"holds no text files .*; it holds a.jsonl.zst and the like, which gptforge "
                                        r"prepare reads: gptforge prepare .* --out DIR, then give DIR"):
        read_texts([tmp_path])
