"""Text -> token ids -> train/val split -> windows of context_length tokens -> batches.

Tokens are stored once, as one flat array per split; a window is a start offset into it, never a
tensor of its own. Batches are gathered from those offsets, in a seeded order per epoch, so the
position in the data is two integers (epoch, batch) that a checkpoint can hold.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import opt
from .tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text")
SAMPLING = ("shuffle", "random", "sequential")


@dataclass
class DataConfig:
    """How text becomes training windows."""

    val_fraction: float = opt(0.1, "Share of the tokens, taken from the end, held out for validation.")
    stride: int | None = opt(None, "Step between window starts; default: the context length (no overlap).")
    tokenizer: str = opt("gpt2", "Tokenizer: gpt2 (OpenAI's GPT-2 BPE, offline), or the path of a Hugging Face "
                                 "tokenizer.json (or its directory); default for a prepared DATA_DIR: its own.")
    sampling: str | None = opt(None, "Training windows: shuffle (windows at the stride, shuffled each epoch), "
                                     "random (any token offset, as nanoGPT) or sequential; default: random for a "
                                     "prepared DATA_DIR, shuffle for text.", choices=SAMPLING)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride must be a positive integer, got {self.stride}")
        if self.sampling not in (None, "shuffle", "random", "sequential"):
            raise ValueError(f"sampling must be shuffle, random or sequential, got {self.sampling!r}")


class DataError(ValueError):
    """Input data a user must fix; the message says what and where."""


# ----------------------------------------------------------------------------- reading text


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
                raise DataError(f"{p}: directory holds no {wanted}")
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

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch b of an epoch (the order of the last epoch asked for is kept)."""
        lo = b * self.batch_size * self.world + self.rank * self.batch_size
        hi = min(lo + self.batch_size, len(self.windows))
        if not self.shuffle:
            return self.windows.batch(np.arange(lo, hi))
        if getattr(self, "_epoch", None) != epoch:
            self._order, self._epoch = self.order(epoch), epoch
        return self.windows.batch(self._order[lo:hi])

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch, from batch number `start` on."""
        for b in range(start, len(self)):
            yield self.batch(epoch, b)

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


class RandomBatches:
    """Batches of windows that start at any token offset (as nanoGPT samples them).

    Batch b of epoch e is a pure function of (seed, e, b), so the data position is (epoch, batch)
    as for `Batches`; an "epoch" is as many batches as it takes to see len(tokens) tokens. No
    per-epoch order is stored: memory does not grow with the corpus.
    """

    shuffle = True

    def __init__(self, tokens, context_length: int, batch_size: int, seed: int = 0):
        self.windows = TokenWindows(tokens, context_length, stride=1)
        self.batch_size = batch_size
        self.seed = seed
        self.n_batches = max(len(tokens) // (batch_size * context_length), 1)

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = np.random.default_rng([self.seed, epoch, b])
        return self.windows.batch(g.integers(0, len(self.windows), self.batch_size))

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(start, len(self)):
            yield self.batch(epoch, b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def training_batches(windows: TokenWindows, sampling: str | None, batch_size: int, seed: int, rank: int = 0,
                     world: int = 1):
    """The training batches for a sampling mode (None: random for shards, shuffle for in-memory text).

    Under torchrun, shards are already this rank's own share of the tokens; in-memory text is shared,
    and rank r takes its rows of each global batch. Random windows get a seed per rank.
    """
    own_share = isinstance(windows.tokens, ShardedTokens)
    sampling = sampling or ("random" if own_share else "shuffle")
    if sampling == "random":
        return RandomBatches(windows.tokens, windows.context_length, batch_size, seed + 7919 * rank)
    if own_share:
        rank, world = 0, 1
    return Batches(windows, batch_size, shuffle=sampling == "shuffle", drop_last=True, seed=seed, rank=rank,
                   world=world)


def tokens_digest(tokens) -> str:
    """A short hash that tells whether a resumed run trains on the same tokens (shards: from the manifest)."""
    if isinstance(tokens, ShardedTokens):
        return tokens.digest
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- prepared shards


class ShardedTokens:
    """The token shards of one split, memory-mapped, read as one flat read-only array.

    ``len()``, integer-array indexing (any shape) and slicing (a view of a range) are what
    `TokenWindows` needs; only the pages a batch touches are ever read, so the corpus is never
    loaded into memory. A window may span two shards.
    """

    def __init__(self, paths: Sequence[Path], lengths: Sequence[int], dtype, start: int = 0,
                 stop: int | None = None, digest: str = ""):
        self.paths = [Path(p) for p in paths]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.dtype = np.dtype(dtype)
        self.start = start
        self.stop = int(self.offsets[-1]) if stop is None else stop
        self.digest = digest

    def __len__(self) -> int:
        return self.stop - self.start

    def _map(self, i: int) -> np.ndarray:
        # a fresh map per read, dropped after it (as nanoGPT does): pages a long run has touched do not pile
        # up in this process's resident memory; opening a map costs microseconds
        return np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(int(self.lengths[i]),))

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ShardedTokens slices must have step 1")
            return ShardedTokens(self.paths, self.lengths, self.dtype, self.start + lo, self.start + max(hi, lo),
                                 self.digest)
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        pos = idx + self.start
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=self.dtype)
        for s in np.unique(which):
            m = which == s
            out[m] = self._map(int(s))[pos[m] - self.offsets[s]]
        return out if idx.ndim else out[()]

    def to_numpy(self) -> np.ndarray:
        """All tokens in one array (for tests and small data: this reads the whole range)."""
        return self[np.arange(len(self))]


def open_prepared(data_dir: str | Path, tokenizer: Tokenizer | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[ShardedTokens, ShardedTokens]:
    """The train and val tokens of a prepared directory, memory-mapped; train is this rank's share.

    Rank r of W gets the r-th of W equal, disjoint ranges of the train tokens; every rank sees all
    of val. A tokenizer other than the one the data was made with is an error.
    """
    from .prepare import read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if tokenizer is not None and tokenizer.name != manifest["tokenizer"]["name"]:
        raise DataError(f"{data_dir} was tokenized with {manifest['tokenizer']['name']}, but the model's "
                        f"tokenizer is {tokenizer.name}: train with the data's own tokenizer (leave --tokenizer "
                        "out), or prepare the data again with --tokenizer set to the model's")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # shards are little-endian on every machine
    splits = []
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        for sh in shards:
            path = data_dir / sh["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != sh["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                                f"{sh['tokens'] * dtype.itemsize}; run gptforge prepare again with --overwrite")
        digest = hashlib.sha256(json.dumps([sh["sha256"] for sh in shards]).encode()).hexdigest()[:16]
        splits.append(ShardedTokens([data_dir / sh["file"] for sh in shards], [sh["tokens"] for sh in shards],
                                    dtype, digest=digest))
    train, val = splits
    n = len(train)
    share = train[rank * n // world_size : (rank + 1) * n // world_size]
    share.digest = train.digest  # the data set's identity, the same on every rank and for any world size
    return share, val


def prepared_dir(inputs: Sequence[str | Path]) -> Path | None:
    """The prepared data directory when the inputs are exactly one (it holds a manifest.json)."""
    from .prepare import is_prepared

    if len(inputs) == 1 and is_prepared(inputs[0]):
        return Path(inputs[0])
    return None


def data_defaults(inputs: Sequence[str | Path], explicit: dict) -> dict:
    """Settings that follow the data unless given: a prepared directory's tokenizer; the model's vocab_size
    from the tokenizer."""
    from .prepare import manifest_tokenizer, read_manifest
    from .tokenizer import get_tokenizer

    out = {}
    data_dir = prepared_dir(inputs)
    if data_dir is not None and "tokenizer" not in explicit:
        out["tokenizer"] = manifest_tokenizer(data_dir, read_manifest(data_dir))
    if "vocab_size" not in explicit:
        spec = explicit.get("tokenizer", out.get("tokenizer", "gpt2"))
        out["vocab_size"] = get_tokenizer(spec).vocab_size
    return out


def eval_tokens(paths: Sequence[str | Path], tokenizer: Tokenizer):
    """Tokens to score: a prepared directory's val split (train when it has no val), or the given text."""
    data_dir = prepared_dir(paths)
    if data_dir is None:
        return tokenize_documents(read_texts(paths), tokenizer)
    train, val = open_prepared(data_dir, tokenizer)
    return val if len(val) else train
