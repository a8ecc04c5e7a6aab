"""Text in: finding and reading text files (UTF-8, refused when binary), the built-in corpus, tokenizing documents
into one flat token array, and the train/val split of such an array."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer
from .config import COMPRESSIONS, JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES


def find_text_files(paths: Sequence[str | Path], include: Sequence[str] | None = None) -> list[Path]:
    """Files as given, and files found recursively in directories, sorted: text files (*.txt, *.md,
    *.text), or those whose lower-cased name matches one of the `include` patterns."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            if include is None:
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
                wanted = f"text files ({', '.join(TEXT_SUFFIXES)})"
            else:
                found = sorted(f for f in p.rglob("*")
                               if f.is_file() and any(fnmatch.fnmatch(f.name.lower(), pat) for pat in include))
                wanted = f"file matching {', '.join(include)}; set --include"
            if not found:
                others = [] if include is not None else sorted(
                    f for f in p.rglob("*") if f.is_file() and file_format(f) != ("text", None))
                raise DataError(f"{p}: directory holds no {wanted}" + (
                    f"; it holds {others[0].name} and the like, which gptforge prepare reads: gptforge prepare {p} "
                    "--out DIR, then give DIR" if others else ""))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file or directory")
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def file_format(path: Path) -> tuple[str, str | None]:
    """('text' | 'jsonl' | 'parquet', 'gzip' | 'zstd' | None) from the file name."""
    name, compression = path.name.lower(), None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], comp
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet", compression
    return "text", compression


_FORMAT_NAMES = {"jsonl": "JSON Lines", "parquet": "Parquet", "gzip": "gzip-compressed", "zstd": "zstd-compressed"}


def _control_bytes() -> np.ndarray:
    """A read-only table of the 256 byte values: True for those no text holds (C0 controls but tab, newlines,
    vertical tab, form feed and escape; DEL)."""
    table = np.isin(np.arange(256), [*range(0, 9), *range(14, 27), *range(28, 32), 127])
    table.setflags(write=False)
    return table


_CONTROL = _control_bytes()


def not_text(path: Path, why: str) -> DataError:
    """The error for a binary file where text is read (a NUL byte: often UTF-16)."""
    utf16 = " (a UTF-16 file: convert it with iconv -f utf-16 -t utf-8)" if "NUL" in why else ""
    return DataError(f"{path}: a binary file, not text ({why}); give UTF-8 text{utf16}")


def read_text_file(path: Path) -> str:
    """A file's text as UTF-8; a clear error for unreadable files, other formats, binary files and invalid bytes."""
    kind, compression = file_format(path)
    if kind != "text" or compression:
        raise DataError(f"{path}: a {_FORMAT_NAMES[compression or kind]} file; only gptforge prepare reads those: "
                        f"gptforge prepare {path} --out DIR, then give DIR instead of the file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
    if (nul := raw.find(b"\0")) >= 0:
        raise not_text(path, f"a NUL byte at byte {nul}")
    if (control := float(_CONTROL[np.frombuffer(raw, dtype=np.uint8)].mean()) if raw else 0.0) > 0.1:
        raise not_text(path, f"{control:.0%} of its bytes are control characters")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: invalid UTF-8 at byte {e.start} (line {line}); convert the file to UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None


def default_corpus() -> str:
    """English text that ships with CPython (pydoc's help topics, about 465 KB): no download needed.

    Layout is tidied so the text reads as prose: indentation and runs of spaces are collapsed,
    reStructuredText underlines dropped, and blank-line runs shortened to one blank line.
    """
    return "\n\n".join(default_documents())


def default_documents() -> list[str]:
    """The default corpus's documents (one per help topic, sorted by topic), tidied as default_corpus says."""
    docs = []
    for key in sorted(topics):
        lines = [" ".join(line.split()) for line in topics[key].splitlines()]
        lines = [line for line in lines if not (line and set(line) <= set("*=-^~"))]
        docs.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    return docs


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The documents in the given files and directories; the default corpus when none given."""
    if not paths:
        return [default_corpus()]
    texts = []
    for f in find_text_files(paths):
        text = read_text_file(f)
        if text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"no text found in {', '.join(map(str, paths))}: all input files are empty")
    return texts


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """One flat token array; documents separated by the end-of-text token when the tokenizer has one."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(text))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.asarray(ids, dtype=dtype)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train = the first (1 - val_fraction) of the tokens, val = the rest (views, not copies)."""
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def split_texts(texts: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The documents' first int((1 - val_fraction) x their characters) and the rest, cut inside the document where
    the count ends (the book's `text[:split_idx]`, `text[split_idx:]` for one document)."""
    budget, train, val = int(sum(map(len, texts)) * (1 - val_fraction)), [], []
    for text in texts:
        head, tail = text[:max(budget, 0)], text[max(budget, 0):]
        budget -= len(head)
        if head:
            train.append(head)
        if tail:
            val.append(tail)
    return train, val


def text_splits(texts: Sequence[str], tokenizer: Tokenizer, val_fraction: float, by: str = "tokens"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Train and val tokens of text documents: the tokens cut at val_fraction (split_tokens), or (by="characters")
    the characters cut (split_texts) and each side tokenized on its own."""
    if by == "characters":
        train, val = split_texts(texts, val_fraction)
        return tokenize_documents(train, tokenizer), tokenize_documents(val, tokenizer)
    return split_tokens(tokenize_documents(texts, tokenizer), val_fraction)
