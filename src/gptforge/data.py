"""Text -> token ids -> train/val split -> windows of context_length tokens -> batches.

Tokens are stored once, as one flat array per split; a window is a start offset into it, never a
tensor of its own. Batches are gathered from those offsets, in a seeded order per epoch, so the
position in the data is two integers (epoch, batch) that a checkpoint can hold.

Data that `gptforge prepare` wrote is read here too (prepare.py writes it and imports this module,
never the other way round): the manifest is checked key by key, the shards are memory-mapped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch

from .checkpoint import file_sha256
from .config import ConfigError, opt
from .ops import IGNORE_INDEX  # the target of a padding position: never scored
from .tokenizer import Tokenizer, get_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
SAMPLING = ("shuffle", "random", "sequential")
PACKING = ("concat", "pad")
SPLITS = ("train", "val")
MANIFEST = "manifest.json"  # a prepared directory (gptforge prepare): see read_manifest
STATE = "prepare-state.json"  # an unfinished one
SHARDS_FORMAT = "gptforge-shards"
SHARDS_VERSION = 1


@dataclass
class DataConfig:
    """How text becomes training windows."""

    val_fraction: float = opt(0.1, "Share of the tokens, taken from the end, held out for validation.")
    stride: int | None = opt(None, "Step between window starts; default: the context length (no overlap).")
    tokenizer: str = opt("gpt2", "Tokenizer: gpt2 (OpenAI's GPT-2 BPE, offline), or the path of a Hugging Face "
                                 "tokenizer.json (or its directory); default for a prepared DATA_DIR: its own.")
    tokenizer_vocab: int | None = opt(None, "Instead of --tokenizer: train a byte-level BPE of this many ids (with "
                                            "<|endoftext|>) on the run's training text when the run starts; it is "
                                            "kept as RUN_DIR/tokenizer.json, which --resume reuses. Text DATA only "
                                            "(a prepared DATA_DIR has its tokenizer).")
    sampling: str | None = opt(None, "Training windows: shuffle (windows at the stride, shuffled each epoch), "
                                     "random (any token offset, as nanoGPT) or sequential; default: random for a "
                                     "prepared DATA_DIR, shuffle for text.", choices=SAMPLING)
    document_mask: bool = opt(False, "Inside a packed window, attention stays within each document (they start at "
                                     "the end-of-text tokens) and positions restart at each: as if each ran alone.")
    packing: str = opt("concat", "How documents fill the training rows: concat (one stream cut into windows) or "
                                 "pad (one document per row, BOS + tokens + EOS, truncated to the context length and "
                                 "padded; padding is not scored: minimind's PretrainDataset).", choices=PACKING)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride must be a positive integer, got {self.stride}")
        if self.sampling not in (None, "shuffle", "random", "sequential"):
            raise ValueError(f"sampling must be shuffle, random or sequential, got {self.sampling!r}")
        if self.tokenizer_vocab is not None and self.tokenizer_vocab < 257:
            raise ValueError(f"--tokenizer-vocab {self.tokenizer_vocab} is too small: a byte-level BPE needs at "
                             "least 257 ids (256 bytes and <|endoftext|>)")
        if self.packing not in PACKING:
            raise ValueError(f"--packing must be concat or pad, got {self.packing!r}")
        if self.packing == "pad" and self.document_mask:
            raise ValueError("--document-mask is for packed windows; --packing pad holds one document per row "
                             "already: give only one of them")
        if self.packing == "pad" and self.sampling == "random":
            raise ValueError("--sampling random draws windows at any token offset; --packing pad has one row per "
                             "document: use --sampling shuffle or sequential")
        if self.packing == "pad" and self.stride is not None:
            raise ValueError("--stride steps windows through the token stream; --packing pad has one row per "
                             "document: leave --stride out")


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
# bytes that no text holds: C0 controls other than tab, newlines, vertical tab, form feed and escape; DEL
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[*range(0, 9), *range(14, 27), *range(28, 32), 127]] = True


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


# ----------------------------------------------------------------------------- windows and batches


class TokenWindows(torch.utils.data.Dataset):
    """Windows over one flat token array: window i is tokens[i*stride : i*stride + context_length + 1].

    Item i is (inputs, targets), targets being inputs shifted by one token. Works as a torch
    Dataset; `batch` gathers many windows at once. `new_targets_only` (evaluation with a stride under the
    context): each window after the first scores only the stride's tokens it adds, the ones before them being
    context (sliding-window perplexity: every token scored once, with up to context_length - stride tokens before
    it); targets already scored are IGNORE_INDEX.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, context_length: int, stride: int | None = None,
                 new_targets_only: bool = False):
        self.tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens
        self.context_length = context_length
        self.stride = stride or context_length
        self.new_targets_only = new_targets_only and self.stride < context_length
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
        x, y = w[:, :-1], w[:, 1:]
        if self.new_targets_only:
            y = y.clone()
            y[torch.from_numpy(starts > 0), : self.context_length - self.stride] = IGNORE_INDEX
        return x, y


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


def document_eot(tokenizer: Tokenizer, setting: str) -> int:
    """The end-of-text id that separates documents, for a setting that needs it (a ConfigError naming it if none)."""
    if tokenizer.eot_id is None:
        raise ConfigError(f"--{setting.replace('_', '-')} needs the documents' end-of-text token, but tokenizer "
                          f"{tokenizer.name} has none: give a tokenizer_config.json with an eos_token beside its "
                          "tokenizer.json")
    return tokenizer.eot_id


def document_spans(tokens, eot_id: int, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the documents in a flat token array: the runs between end-of-text tokens, which are
    not part of any; empty runs (before the first separator of prepared shards) are left out. Read in chunks,
    so shards are never loaded whole."""
    cuts = [np.array([-1], dtype=np.int64)]
    for lo in range(0, len(tokens), chunk):
        part = tokens[np.arange(lo, min(lo + chunk, len(tokens)))]
        cuts.append(np.flatnonzero(part == eot_id).astype(np.int64) + lo)
    cuts.append(np.array([len(tokens)], dtype=np.int64))
    edges = np.concatenate(cuts)
    starts, lengths = edges[:-1] + 1, np.diff(edges) - 1
    keep = lengths > 0
    return starts[keep], lengths[keep]


class PaddedDocuments:
    """One document per row, as minimind's PretrainDataset builds them (`--packing pad`).

    Row i is [bos] + the first context_length - 1 tokens of document i + [eos], padded with pad to
    context_length + 1 tokens; inputs are row[:-1] and targets row[1:], with targets IGNORE_INDEX where the
    row is padding. Documents are the runs between eot_id in the flat token array (document_spans), so
    text and prepared shards give the same rows; BOS/EOS/PAD ids come from pad_ids. Like TokenWindows it
    is indexed by batch(indices), so Batches samples it and the data position stays (epoch, batch).
    """

    def __init__(self, tokens, context_length: int, bos_id: int, eos_id: int, pad_id: int, eot_id: int):
        self.tokens = tokens
        self.context_length = context_length
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.starts, self.lengths = document_spans(tokens, eot_id)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) for the documents at the given indices."""
        idx = np.asarray(indices, dtype=np.int64)
        T = self.context_length
        kept = np.minimum(self.lengths[idx], T - 1)  # (B,) text tokens of each row after truncation
        offsets = np.arange(T - 1)
        take = offsets < kept[:, None]  # (B, T-1)
        text = self.tokens[np.where(take, self.starts[idx][:, None] + offsets, 0)]  # (B, T-1); 0 where unused
        rows = np.full((len(idx), T + 1), self.pad_id, dtype=np.int64)
        rows[:, 0] = self.bos_id
        rows[:, 1:T][take] = text[take]
        rows[np.arange(len(idx)), kept + 1] = self.eos_id
        w = torch.from_numpy(rows)
        y = w[:, 1:].clone()
        y[torch.from_numpy(np.arange(T) > kept[:, None])] = IGNORE_INDEX  # targets after the eos: padding
        return w[:, :-1], y


def pad_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids for `--packing pad`: the tokenizer's bos_token and pad_token (a tokenizer_config.json's),
    each defaulting to its end-of-text token (GPT-2's <|endoftext|> is all three); eos is the end-of-text token."""
    eot = document_eot(tokenizer, "packing pad")
    bos, pad = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "pad_id", None)
    return eot if bos is None else bos, eot, eot if pad is None else pad


def make_windows(tokens, context_length: int, cfg: DataConfig, tokenizer: Tokenizer) -> TokenWindows | PaddedDocuments:
    """The rows a split trains or is scored on: windows of the token stream, or (--packing pad) one per document."""
    if cfg.packing == "pad":
        return PaddedDocuments(tokens, context_length, *pad_ids(tokenizer), tokenizer.eot_id)
    return TokenWindows(tokens, context_length, cfg.stride)


def check_windows(windows: TokenWindows, n_tokens: int, split: str, batch_size: int, drop_last: bool) -> None:
    """Raise a DataError that says what to change when a split cannot fill one batch."""
    need = windows.context_length + 1
    if isinstance(windows, PaddedDocuments):
        if len(windows) < (batch_size if drop_last else 1):
            raise DataError(f"the {split} split has {len(windows)} documents (--packing pad: one per row), fewer "
                            f"than {'one batch of ' + str(batch_size) if drop_last else 'one'}; give more text"
                            + (", lower --batch-size" if drop_last else "")
                            + (" or change --val-fraction" if split in ("train", "val") else ""))
        return
    if len(windows) == 0:
        raise DataError(
            f"the {split} split has {n_tokens} tokens, but one window needs context_length + 1 = {need}; "
            f"give more text, lower --context-length"
            + (" or change --val-fraction" if split in ("train", "val") else "")
        )
    if drop_last and len(windows) < batch_size:
        apart = windows.stride != windows.context_length
        raise DataError(
            f"the {split} split has {n_tokens} tokens = {len(windows)} windows of {windows.context_length}"
            + (f" starting {windows.stride} tokens apart (--stride {windows.stride})" if apart else "")
            + f", fewer than one batch of {batch_size}; give more text, lower "
            + ("--stride, --batch-size or --context-length" if apart else "--batch-size or --context-length")
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
    """The training batches for a sampling mode (None: random for shards' windows, shuffle for in-memory text and
    for padded documents).

    Under torchrun, shards are already this rank's own share of the tokens; in-memory text is shared,
    and rank r takes its rows of each global batch. Random windows get a seed per rank.
    """
    own_share = isinstance(windows.tokens, ShardedTokens)
    sampling = sampling or ("random" if own_share and isinstance(windows, TokenWindows) else "shuffle")
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
    loaded into memory. A window may span two shards. With `vocab_size`, every id read is checked
    against it (a max over the batch, next to nothing beside a training step): an edited shard that
    slipped past open_prepared's checks stops the run with its name instead of reaching the embedding.
    """

    def __init__(self, paths: Sequence[Path], lengths: Sequence[int], dtype, start: int = 0,
                 stop: int | None = None, digest: str = "", vocab_size: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.dtype = np.dtype(dtype)
        self.start = start
        self.stop = int(self.offsets[-1]) if stop is None else stop
        self.digest = digest
        self.vocab_size = vocab_size

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
                                 self.digest, self.vocab_size)
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        pos = idx + self.start
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=self.dtype)
        for s in np.unique(which):
            m = which == s
            ids = self._map(int(s))[pos[m] - self.offsets[s]]
            if self.vocab_size is not None and (top := int(ids.max())) >= self.vocab_size:
                raise DataError(f"{self.paths[s]}: holds id {top}, not below the vocabulary size {self.vocab_size}: "
                                "the shard is damaged; prepare the data again (gptforge prepare ... --overwrite)")
            out[m] = ids
        return out if idx.ndim else out[()]

    def to_numpy(self) -> np.ndarray:
        """All tokens in one array (for tests and small data: this reads the whole range)."""
        return self[np.arange(len(self))]


REPREPARE = "the manifest is damaged or was edited: prepare the data again (gptforge prepare ... --overwrite)"


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(data_dir: str | Path) -> dict:
    """A prepared directory's manifest.json, every key that is read checked (see check_manifest)."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror})") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{path}: not valid JSON ({e}); {REPREPARE}") from None
    check_manifest(manifest, path)
    return manifest


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def _need(path: Path, advice: str, obj: dict, key: str, where: str, ok, what: str):
    """obj[key], or a DataError naming the file and the key when it is missing or not `what`."""
    if key not in obj:
        raise DataError(f"{path}: {where}{key} is missing; {advice}")
    if not ok(obj[key]):
        raise DataError(f"{path}: {where}{key} must be {what}, got {json.dumps(obj[key])[:40]}; {advice}")
    return obj[key]


def check_manifest(manifest, path: Path) -> None:
    """Raise a DataError naming the key when a key that is read is missing or has the wrong type or value.

    A manifest that passes describes shards whose names, sizes and counts agree with each other, so a
    damaged or hand-edited file cannot send training to other files or past their ends.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        raise DataError(f'{path}: not a gptforge shard manifest (no "format": "{SHARDS_FORMAT}"); {REPREPARE}')

    def need(obj, key, where, ok, what):
        return _need(path, REPREPARE, obj, key, where, ok, what)

    need(manifest, "version", "", lambda v: type(v) is int and v == SHARDS_VERSION,
         f"{SHARDS_VERSION} (this gptforge's shard format)")
    tok = need(manifest, "tokenizer", "", lambda v: isinstance(v, dict), "an object")
    if "file" in tok:
        need(tok, "file", "tokenizer.", lambda v: isinstance(v, str) and v and Path(v).name == v, "a file name")
    need(tok, "name", "tokenizer.", lambda v: isinstance(v, str) and (v == "gpt2" or "file" in tok),
         "gpt2, or come with a tokenizer.file")
    vocab = need(manifest, "vocab_size", "", lambda v: _is_count(v) and v > 0, "a positive integer")
    need(manifest, "eot_id", "", lambda v: _is_count(v) and v < vocab, f"an id below vocab_size {vocab}")
    need(manifest, "dtype", "", lambda v: v in ("uint16", "uint32") and (v == "uint32" or vocab <= 1 << 16),
         "uint16 (for a vocabulary of at most 65,536 ids) or uint32")
    check_splits(need(manifest, "splits", "", lambda v: isinstance(v, dict), "an object"), path, REPREPARE)


def check_splits(splits: dict, path: Path, advice: str) -> None:
    """The "splits" of a manifest (or of prepare-state.json): shard names in order, counts that add up."""
    for split in SPLITS:
        s = _need(path, advice, splits, split, "splits.", lambda v: isinstance(v, dict), "an object")
        where = f"splits.{split}."
        shards = _need(path, advice, s, "shards", where,
                       lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects")
        for i, sh in enumerate(shards):
            at, name = f"{where}shards[{i}].", f"{split}-{i:06d}.bin"
            _need(path, advice, sh, "file", at, lambda v, name=name: v == name, json.dumps(name))
            _need(path, advice, sh, "sha256", at, lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v),
                  "64 hex digits")
            for key in ("tokens", "documents"):
                _need(path, advice, sh, key, at, _is_count, "a count")
        for key in ("tokens", "documents"):
            total = sum(sh[key] for sh in shards)
            _need(path, advice, s, key, where, lambda v, total=total: v == total, f"the sum over its shards, {total}")


def manifest_tokenizer(data_dir: str | Path, manifest: dict) -> str:
    """The tokenizer spec (for get_tokenizer) of prepared data."""
    t = manifest["tokenizer"]
    return str(Path(data_dir) / t["file"]) if "file" in t else t["name"]


def damaged_shards(data_dir: Path, splits: dict, dtype: str, written: Path) -> list[str]:
    """What is wrong with the shards that `splits` (of a manifest or prepare-state.json) lists, one line each.

    Every shard's size is checked (a stat). Its sha256 is checked only when the shard was modified at
    or after the time `written` (the file that lists it, saved after its shards were complete) was:
    hashing a whole corpus at every start would cost minutes, and a shard that changed since has a
    later modification time. After a successful check `written` is touched, so the same shards are
    not hashed again (a copy made with `cp -r` gets new times, and is checked once).
    """
    itemsize = np.dtype(dtype).itemsize
    since = written.stat().st_mtime_ns
    problems, hashed = [], 0
    for split in SPLITS:
        for sh in splits[split]["shards"]:
            path = data_dir / sh["file"]
            try:
                st = path.stat()
            except OSError:
                problems.append(f"{path}: missing")
                continue
            if st.st_size != sh["tokens"] * itemsize:
                problems.append(f"{path}: {st.st_size} bytes, {written.name} says {sh['tokens'] * itemsize}")
            elif st.st_mtime_ns >= since:
                hashed += 1
                if file_sha256(path) != sh["sha256"]:
                    problems.append(f"{path}: changed after {written.name} was written (its sha256, checked because "
                                    "the file is newer, is not the one recorded)")
    if hashed and not problems:
        try:
            os.utime(written)
        except OSError:  # a read-only copy of the data: it is checked again next time, nothing else changes
            pass
    return problems


def open_prepared(data_dir: str | Path, tokenizer: Tokenizer | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[ShardedTokens, ShardedTokens]:
    """The train and val tokens of a prepared directory, memory-mapped; train is this rank's share.

    Rank r of W gets the r-th of W equal, disjoint ranges of the train tokens; every rank sees all
    of val. A tokenizer other than the one the data was made with is an error, and so is a damaged
    manifest or shard (see check_manifest and damaged_shards for what is checked, and how cheaply).
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if tokenizer is not None and tokenizer.name != manifest["tokenizer"]["name"]:
        raise DataError(f"{data_dir} was tokenized with {manifest['tokenizer']['name']}, but the model's "
                        f"tokenizer is {tokenizer.name}: train with the data's own tokenizer (leave --tokenizer "
                        "out), or prepare the data again with --tokenizer set to the model's")
    ids = (manifest["vocab_size"], manifest["eot_id"])
    if tokenizer is not None and ids != (tokenizer.vocab_size, tokenizer.eot_id):
        raise DataError(f"{data_dir / MANIFEST}: vocab_size {ids[0]} and eot_id {ids[1]}, but tokenizer "
                        f"{tokenizer.name} has {tokenizer.vocab_size} and {tokenizer.eot_id}; {REPREPARE}")
    problems = damaged_shards(data_dir, manifest["splits"], manifest["dtype"], data_dir / MANIFEST)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; run the same gptforge prepare command again: it prepares damaged "
                        "data anew")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # shards are little-endian on every machine
    splits = []
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        digest = hashlib.sha256(json.dumps([sh["sha256"] for sh in shards]).encode()).hexdigest()[:16]
        splits.append(ShardedTokens([data_dir / sh["file"] for sh in shards], [sh["tokens"] for sh in shards],
                                    dtype, digest=digest, vocab_size=manifest["vocab_size"]))
    train, val = splits
    n = len(train)
    share = train[rank * n // world_size : (rank + 1) * n // world_size]
    share.digest = train.digest  # the data set's identity, the same on every rank and for any world size
    return share, val


def prepared_dir(inputs: Sequence[str | Path]) -> Path | None:
    """The prepared data directory when the inputs are exactly one (it holds a manifest.json)."""
    if len(inputs) != 1:
        return None
    if is_prepared(inputs[0]):
        return Path(inputs[0])
    if (Path(inputs[0]) / STATE).is_file():
        raise DataError(f"{inputs[0]}: gptforge prepare did not finish there ({STATE}, no {MANIFEST}); run the "
                        "same prepare command again to finish it")
    return None


def data_defaults(inputs: Sequence[str | Path], explicit: dict) -> dict:
    """Settings that follow the data unless given: a prepared directory's tokenizer; the model's vocab_size
    from the tokenizer (with --tokenizer-vocab N: N, the most ids the trained tokenizer can have)."""
    out = {}
    data_dir = prepared_dir(inputs)
    if explicit.get("tokenizer_vocab") is not None:
        if data_dir is not None:
            raise ConfigError(f"--tokenizer-vocab trains a tokenizer on text DATA, but {data_dir} is prepared with its "
                              "own tokenizer: leave --tokenizer-vocab out (or train one with `gptforge tokenizer "
                              "train` and prepare the text with it)")
        if explicit.get("tokenizer", "gpt2") != "gpt2":
            raise ConfigError(f"--tokenizer {explicit['tokenizer']} and --tokenizer-vocab both choose the tokenizer; "
                              "give only one")
        if "vocab_size" not in explicit:
            out["vocab_size"] = explicit["tokenizer_vocab"]
        return out
    if data_dir is not None and "tokenizer" not in explicit:
        out["tokenizer"] = manifest_tokenizer(data_dir, read_manifest(data_dir))
    if "vocab_size" not in explicit:
        spec = explicit.get("tokenizer", out.get("tokenizer", "gpt2"))
        out["vocab_size"] = get_tokenizer(spec).vocab_size
    return out


def eval_tokens(paths: Sequence[str | Path], tokenizer: Tokenizer | None, split: str | None = None,
                texts: list[str] | None = None):
    """Tokens to score: a prepared directory's val split (`split` "train": its train split), or the given text
    (`texts`: already read from paths). With no tokenizer, only the checks: the text read, or None."""
    data_dir = prepared_dir(paths)
    if data_dir is None:
        if split is not None:
            raise DataError(f"--split {split} chooses a split of a directory made by `gptforge prepare`; "
                            f"{', '.join(map(str, paths))} is text, scored whole: leave --split out")
        texts = read_texts(paths) if texts is None else texts
        return texts if tokenizer is None else tokenize_documents(texts, tokenizer)
    if tokenizer is None:
        return None
    train, val = open_prepared(data_dir, tokenizer)
    if split == "train":
        return train
    if not len(val):
        raise DataError(f"{data_dir}: has no val split (prepared with --val-fraction 0), so there is no held-out "
                        "text to score; score the train split with --split train, or prepare it with a val split")
    return val
