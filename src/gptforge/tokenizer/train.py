"""`gptforge tokenizer train`: a byte-level BPE trained on a corpus, read as `gptforge prepare` reads it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import check_fields, opt
from ..data.prepare import PrepareConfig, _where, check_out
from ..data.shards import TOKENIZER_FILE, _atomic_write, written_name
from ..data.sources import file_kind, find_inputs, read_items
from ..data.workers import BAD, OK, record_text
from ..errors import DataError
from . import train_bpe


@dataclass
class TokenizerTrainConfig:
    """`gptforge tokenizer train`'s settings (CORPUS... is its argument)."""

    vocab_size: int | None = opt(None, "Number of ids, <|endoftext|> and the 256 bytes included.", required=True)
    out: str | None = opt(None, "Directory to write tokenizer.json to.", required=True)
    text_field: str = opt("text", "Text field of JSON Lines / Parquet records.")
    include: str | None = opt(None, "Comma-separated file name patterns searched for in directories.")
    min_frequency: int = opt(2, "Merge only pairs seen at least this often.", low=0)
    overwrite: bool = opt(False, "Replace the tokenizer.json that OUT holds.")

    def __post_init__(self) -> None:
        check_fields(self)


def document_texts(files: list[Path], kinds: list, text_field: str = "text",
                   skip_bad_lines: bool = True) -> Iterator[str]:
    """The texts of every document (pieces of large text files) in the files, streamed."""
    for item, payload in read_items(files, kinds, text_field):
        status, text, _, _ = record_text(kinds[item.file][0], payload, item.first, item.last, text_field)
        if status == OK:
            yield text
        elif status == BAD and not skip_bad_lines:
            raise DataError(f"{_where(files[item.file], kinds[item.file][0], item)}: {text}")


def train_tokenizer(inputs: Sequence[str | Path], out: str | Path, vocab_size: int, text_field: str = "text",
                    include: str | None = None, min_frequency: int = 2, overwrite: bool = False) -> Path:
    """Train a byte-level BPE on the inputs and save it as out/tokenizer.json.

    The inputs and `out` are checked before training starts (which can take minutes): `out` must be
    writable and hold nothing but a tokenizer.json, which is replaced only with `overwrite`.
    """

    TokenizerTrainConfig(vocab_size, str(out), text_field, include, min_frequency, overwrite)  # the checks
    files = find_inputs(inputs, PrepareConfig(include=include).include_patterns())
    kinds = [file_kind(f) for f in files]
    out = Path(out)
    path = out / TOKENIZER_FILE
    check_out(out, lambda name: written_name(name) == TOKENIZER_FILE, "gptforge tokenizer train")
    if path.exists() and not overwrite:
        raise DataError(f"--out {out}: already holds {TOKENIZER_FILE}; pass --overwrite to replace it, or choose "
                        "another --out")
    n = 0

    def texts():
        nonlocal n
        for text in document_texts(files, kinds, text_field):
            n += 1
            yield text

    tok = train_bpe(texts(), vocab_size, min_frequency)
    if n == 0:
        raise DataError(f"no text found in {', '.join(map(str, inputs))}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    _atomic_write(path, tok.json)
    return path
