"""The prepared-data format (`gptforge prepare`): manifest.json and its checks, the memory-mapped shard reader,
the shard writer, and which tokens a run or an evaluation reads (a prepared directory or text)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import faults
from ..checkpoint import atomic_write_bytes, file_sha256
from ..config import ConfigError
from ..errors import DataError
from ..tokenizer import TOKENIZER_CONFIG, Tokenizer, get_tokenizer
from .config import MANIFEST, SHARDS_FORMAT, SHARDS_VERSION, SPLITS, STATE
from .text import read_texts, tokenize_documents


def tokens_digest(tokens) -> str:
    """A short hash that tells whether a resumed run trains on the same tokens (shards: from the manifest)."""
    if isinstance(tokens, ShardedTokens):
        return tokens.digest
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


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
                raise NotImplementedError("ShardedTokens slices must have step 1")
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


class ShardWriter:
    """One shard being written under a temporary name; `close` fsyncs it and gives it its final name."""

    def __init__(self, out: Path, split: str, index: int, dtype: np.dtype):
        self.name = f"{split}-{index:06d}.bin"
        self.final, self.tmp = out / self.name, out / f".{self.name}.tmp"
        try:
            self.f = open(self.tmp, "wb")
        except OSError as e:
            raise DataError(f"{self.tmp}: cannot write ({e.strerror})") from None
        self.sha = hashlib.sha256()
        self.dtype = dtype
        self.tokens = 0
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        b = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        try:
            self.f.write(b)
        except OSError as e:
            self.discard()  # a partial shard is never kept: the run resumes from the last whole one
            raise DataError(f"{self.tmp}: cannot write ({e.strerror})") from None
        self.sha.update(b)
        self.tokens += len(ids)
        if faults.hit("prepare-inside-shard"):  # a kill leaves this much of the shard on disk
            self.f.flush()
            faults.kill("prepare-inside-shard")

    def close(self) -> dict:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.final)
        except OSError as e:
            self.discard()
            raise DataError(f"{self.tmp}: cannot write ({e.strerror})") from None
        return {"file": self.name, "tokens": self.tokens, "documents": self.documents,
                "sha256": self.sha.hexdigest()}

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # the write that failed (a full disk) is reported already
            self.f.close()
            self.tmp.unlink(missing_ok=True)


class OpenShards:
    """The shard of each split being written, and the commit that makes them final and records where the
    input is then (prepare-state.json), so that an interrupted run resumes there."""

    def __init__(self, out: Path, state: PrepareState, dtype: np.dtype):
        self.out, self.state, self.dtype = out, state, dtype
        self.writers: dict[str, ShardWriter] = {}

    def __getitem__(self, split: str) -> ShardWriter:
        if split not in self.writers:
            self.writers[split] = ShardWriter(self.out, split, len(self.state.splits[split]["shards"]), self.dtype)
        return self.writers[split]

    def tokens(self) -> int:
        """Tokens written so far, in finished shards and open ones."""
        return sum(s["tokens"] for s in self.state.splits.values()) + sum(w.tokens for w in self.writers.values())

    def full(self, shard_tokens: int) -> bool:
        return any(w.tokens >= shard_tokens for w in self.writers.values())

    def commit(self, position: list[int], open_doc: str | None, stats: Stats) -> None:
        for split, w in self.writers.items():
            entry = w.close()
            s = self.state.splits[split]
            s["shards"].append(entry)
            s["tokens"] += entry["tokens"]
            s["documents"] += entry["documents"]
        self.writers.clear()
        self.state.position, self.state.open_doc, self.state.stats = position, open_doc, stats
        _atomic_write(self.out / STATE, self.state.to_json())
        faults.point("prepare-between-shards")

    def discard(self) -> None:
        for w in self.writers.values():
            w.discard()


def written_name(name: str) -> str:
    """The file a temporary file of an atomic write becomes (.NAME.tmp, .NAME.tmp-PID -> NAME); others as they are."""
    m = re.fullmatch(r"\.(.+)\.tmp(-\d+)?", name)
    return m.group(1) if m else name


def made_by_prepare(name: str) -> bool:
    """Whether a file name in DATA_DIR is one that prepare writes (or a temporary file of one)."""
    name = written_name(name)
    ours = (MANIFEST, STATE, TOKENIZER_FILE, TOKENIZER_CONFIG)
    return name in ours or re.fullmatch(r"(train|val)-\d{6}\.bin", name) is not None


TOKENIZER_FILE = "tokenizer.json"


def _atomic_write(path: Path, content: dict | str) -> None:
    """A JSON object (or text) written with checkpoint.atomic_write_bytes; a failure is one line naming the file."""
    text = content if isinstance(content, str) else json.dumps(content, indent=1)
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror})") from None


@dataclass
class Stats:
    documents: int = 0  # documents numbered so far (the train/val hash is over this number)
    empty: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)
    invalid_utf8: int = 0
    invalid_examples: list = field(default_factory=list)


def _empty_splits() -> dict:
    return {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}


@dataclass
class PrepareState:
    """Where an unfinished prepare stands (prepare-state.json, rewritten at each shard group's commit): the inputs'
    fingerprint, the input position (file, record) the next shard group starts at, the split of a document left
    open there, the counters, the finished shards of each split, and the --val-docs choice."""

    fingerprint: dict
    position: list[int] = field(default_factory=lambda: [0, 0])
    open_doc: str | None = None
    stats: Stats = field(default_factory=Stats)
    splits: dict = field(default_factory=_empty_splits)
    val_set: list[int] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> PrepareState:
        """The state an interrupted run left, checked as far as resuming reads it (one line naming what is wrong)."""
        try:
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raw = e
        if not isinstance(raw, dict):
            why = raw if isinstance(raw, Exception) else "not a JSON object"
            raise DataError(f"{path}: cannot read the state of the interrupted prepare ({why}); pass --overwrite to "
                            "prepare anew")
        for key, ok in (("fingerprint", lambda v: isinstance(v, dict)), ("open_doc", lambda v: v in (None, *SPLITS)),
                        ("position", lambda v: isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)),
                        ("stats", lambda v: isinstance(v, dict) and set(v) == set(asdict(Stats()))),
                        ("val_set", lambda v: v is None or isinstance(v, list)),
                        ("splits", lambda v: isinstance(v, dict))):
            if not ok(raw.get(key)):
                raise DataError(f"{path}: {key} is missing or damaged; pass --overwrite to prepare anew")
        check_splits(raw["splits"], path, "pass --overwrite to prepare anew")
        return cls(raw["fingerprint"], raw["position"], raw["open_doc"], Stats(**raw["stats"]), raw["splits"],
                   raw["val_set"])
