"""Windows of context_length tokens over a flat token array, the batches gathered from them (shuffled per epoch,
random or sequential), documents padded one per row, and the end-of-text boundaries between documents."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..config import ConfigError
from ..errors import DataError
from ..ops import IGNORE_INDEX  # the target of a padding position: never scored
from ..tokenizer import Tokenizer
from .config import DataConfig
from .shards import ShardedTokens


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
