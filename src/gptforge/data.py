"""Text -> token ids -> train/val split -> windows of context_length tokens -> batches.

Tokens are stored once, as one flat array per split; a window is a start offset into it, never a
tensor of its own. Batches are gathered from those offsets, in a seeded order per epoch, so the
position in the data is two integers (epoch, batch) that a checkpoint can hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import opt
from .tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class DataConfig:
    """How text becomes training windows."""

    val_fraction: float = opt(0.1, "Share of the tokens, taken from the end, held out for validation.")
    stride: int | None = opt(None, "Step between window starts; default: the context length (no overlap).")
    tokenizer: str = opt("gpt2", "Tokenizer: gpt2 (OpenAI's GPT-2 BPE, offline).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride must be a positive integer, got {self.stride}")


class DataError(ValueError):
    """Input data a user must fix; the message says what and where."""


# ----------------------------------------------------------------------------- reading text


def find_text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and text files (*.txt, *.md) found recursively in directories, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{p}: directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file or directory")
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def read_text_file(path: Path) -> str:
    """A file's text as UTF-8; a clear error for unreadable files and invalid bytes."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
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
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        lines = [" ".join(line.split()) for line in topics[key].splitlines()]
        lines = [line for line in lines if not (line and set(line) <= set("*=-^~"))]
        docs.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    return "\n\n".join(docs)


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


# ----------------------------------------------------------------------------- windows and batches


class TokenWindows(torch.utils.data.Dataset):
    """Windows over one flat token array: window i is tokens[i*stride : i*stride + context_length + 1].

    Item i is (inputs, targets), targets being inputs shifted by one token. Works as a torch
    Dataset; `batch` gathers many windows at once.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, context_length: int, stride: int | None = None):
        self.tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens
        self.context_length = context_length
        self.stride = stride or context_length
        span = context_length + 1
        self.n = 0 if len(self.tokens) < span else (len(self.tokens) - span) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        x, y = self.batch(np.array([i % self.n]))
        return x[0], y[0]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) for the windows at the given indices."""
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        span = starts[:, None] + np.arange(self.context_length + 1)  # (B, T+1)
        w = torch.from_numpy(self.tokens[span].astype(np.int64))
        return w[:, :-1], w[:, 1:]


class Batches:
    """Batches of windows in a seeded order that is a pure function of (seed, epoch).

    Under torchrun each global batch holds batch_size * world windows, and rank r takes rows
    [r * batch_size, (r + 1) * batch_size): the ranks' shares are disjoint and together are what
    one process with batch_size * world would see.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.windows = windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        n, b = len(self.windows), self.batch_size * self.world
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.windows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.windows), generator=g).numpy()

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch `index` of `epoch`."""
        order = self.order(epoch) if order is None else order
        start = index * self.batch_size * self.world + self.rank * self.batch_size
        return self.windows.batch(order[start : start + self.batch_size])

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch, from batch number `start` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.batch(epoch, b, order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def check_windows(windows: TokenWindows, n_tokens: int, split: str, batch_size: int, drop_last: bool) -> None:
    """Raise a DataError that says what to change when a split cannot fill one batch."""
    need = windows.context_length + 1
    if len(windows) == 0:
        raise DataError(
            f"the {split} split has {n_tokens} tokens, but one window needs context_length + 1 = {need}; "
            f"give more text, lower --context-length"
            + (" or change --val-fraction" if split in ("train", "val") else "")
        )
    if drop_last and len(windows) < batch_size:
        raise DataError(
            f"the {split} split has {n_tokens} tokens = {len(windows)} windows of {windows.context_length}, "
            f"fewer than one batch of {batch_size}; give more text, lower --batch-size or --context-length"
        )
