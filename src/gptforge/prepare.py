"""`gptforge prepare`: stream a corpus of any size into flat binary token shards and a JSON manifest.

Inputs are text files (one file = one document), JSON Lines (one record = one document, its text
in ``--text-field``), Parquet (one row = one document) and any of them compressed with gzip or
zstd; or one Hugging Face dataset (``hf:NAME`` or a save_to_disk directory, one row = one document,
read through the ``datasets`` library: hf_datasets.py), optionally streamed. Every document is
written as ``<|endoftext|>`` followed by its tokens, to the train or the val split (a whole
document goes to one split, chosen by a seeded hash of its number, so the split is the same for
the same input and seed whatever the number of workers).

The work is streamed and bounded: the main process reads, cuts the input into tasks of about a
megabyte, and hands them to ``--workers`` processes that decode, parse and tokenize; at most
``2 * workers + 2`` tasks are in flight. Results are written in input order to the open shard of
each split (``.train-000003.bin.tmp``). When a shard reaches ``--shard-tokens`` tokens, every open
shard is fsynced and renamed to its final name and ``prepare-state.json`` records where in the
input the next shard starts: an interrupted run resumes there, and a file without a final name is
never taken for a shard. The manifest is written last; when it exists and the inputs and settings
are unchanged, a new run does nothing (but prepares the data anew, with a warning, when a shard was
damaged since: see data.damaged_shards).

Prepare writes only into a new or empty directory, or one that holds nothing but its own files.

DATA_DIR/
    manifest.json            tokenizer, vocab size, dtype, per split: tokens, documents, shards (sha256)
    tokenizer.json           a copy of the tokenizer, when it is a Hugging Face one
    tokenizer_config.json    its eos_token (the document separator) and pad_token, when its own config gave them
    train-000000.bin ...     raw little-endian uint16 (or uint32) token ids
    val-000000.bin ...
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from tqdm import tqdm

from . import faults, hf_datasets
from .checkpoint import atomic_write_bytes, check_writable
from .config import ConfigError, opt
from .data import (
    JSONL_SUFFIXES,
    MANIFEST,
    PARQUET_SUFFIXES,
    SHARDS_FORMAT,
    SHARDS_VERSION,
    SPLITS,
    STATE,
    TEXT_SUFFIXES,
    DataError,
    check_splits,
    damaged_shards,
    file_format,
    find_text_files,
    not_text,
    read_manifest,
)
from .hf_datasets import DatasetInput
from .runs.metrics import human
from .tokenizer import TOKENIZER_CONFIG, HFTokenizer, Tokenizer, get_tokenizer, train_bpe

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_INCLUDE = tuple(f"*{s}{c}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
                        for c in ("", ".gz", ".zst"))
TEXT_CHUNK = 1 << 20  # bytes of a text file per piece (cut at a line start, see _cut_point)
TASK_BYTES = 1 << 20  # input bytes per task handed to a worker
TASK_RECORDS = 4096

OK, EMPTY, BAD = 0, 1, 2  # status of one record after a worker has looked at it


@dataclass
class PrepareConfig:
    """How `gptforge prepare` reads a corpus and writes shards."""

    tokenizer: str = opt("gpt2", "Tokenizer: gpt2, or the path of a Hugging Face tokenizer.json (or its directory); "
                                 "the eos_token of a tokenizer_config.json beside it separates the documents.")
    text_field: str = opt("text", "Field of a JSON Lines record (column of a Parquet file or dataset) that holds the "
                                  "text.")
    config: str | None = opt(None, "Configuration (subset) of a Hugging Face dataset hf:NAME, e.g. sample-10BT.")
    split: str | None = opt(None, "Split of a Hugging Face dataset; default: train, or its only split.")
    streaming: bool = opt(False, "Stream a Hugging Face dataset row by row (datasets' IterableDataset) instead of "
                                 "preparing its Arrow cache first: nothing is held but the rows in flight.")
    include: str | None = opt(None, "Comma-separated file name patterns searched for in directories; default: "
                                    "*.txt *.md *.text *.jsonl *.json *.ndjson *.parquet, each also .gz/.zst.")
    val_fraction: float = opt(0.01, "Share of the documents held out for validation (chosen by a seeded hash).")
    val_docs: int | None = opt(None, "Hold out exactly this many documents instead (a first pass counts them).")
    seed: int = opt(1234, "Seed of the train/val choice: the same seed and input give the same split.")
    shard_tokens: int = opt(100_000_000, "Tokens per shard (a shard ends at the first piece after this many).")
    dtype: str = opt("auto", "Token dtype: auto (uint16 when the vocabulary fits, else uint32), uint16, uint32.",
                     choices=("auto", "uint16", "uint32"))
    workers: int = opt(0, "Processes that tokenize (plus the one that reads and writes); 0 = all cores.")
    skip_bad_lines: bool = opt(False, "Skip JSON lines that do not parse or lack the text field (counted) "
                                      "instead of stopping.")
    overwrite: bool = opt(False, "Replace data prepared from other inputs or settings in DATA_DIR.")
    progress: bool = opt(True, "Show the progress bar.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_docs is not None and self.val_docs < 0:
            raise ValueError(f"val_docs must be 0 or more, got {self.val_docs}")
        if self.shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (all cores) or more, got {self.workers}")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"dtype must be auto, uint16 or uint32, got {self.dtype!r}")

    def include_patterns(self) -> tuple[str, ...]:
        if not self.include:
            return DEFAULT_INCLUDE
        return tuple(p.strip() for p in self.include.split(",") if p.strip())


# ----------------------------------------------------------------------------- finding and opening inputs


MAGIC = {"gzip": ("1f 8b", lambda h: h[:2] == b"\x1f\x8b"),
         "zstd": ("28 b5 2f fd", lambda h: h == b"\x28\xb5\x2f\xfd" or (h[1:] == b"\x2a\x4d\x18" and h[0] >> 4 == 5))}


def file_kind(path: Path) -> tuple[str, str | None]:
    """('text' | 'jsonl' | 'parquet', compression or None) from the file name; a compressed file must start
    as its compression does (checked now, before any work)."""
    kind, compression = file_format(path)
    if kind == "parquet" and compression:
        raise DataError(f"{path}: a compressed Parquet file; Parquet compresses itself, decompress it first")
    if compression:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise DataError(f"{path}: cannot read file ({e.strerror})") from None
        magic, ok = MAGIC[compression]
        if head and not ok(head):  # an empty file is an empty document
            raise DataError(f"{path}: named {path.suffix} but not {compression} data (it starts with "
                            f"{head.hex(' ')}, not {magic}); decompress it, or rename it to what it holds")
    return kind, compression


def find_inputs(paths: Sequence[str | Path], include: Sequence[str]) -> list[Path]:
    """Files as given, and files matching an include pattern found recursively in directories."""
    if not paths:
        raise DataError("no input given: name text, JSON Lines or Parquet files or directories")
    files = find_text_files(paths, include)
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


class _Counted(io.RawIOBase):
    """A readable raw stream that counts the bytes read from the file underneath (for progress)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = self.f.readinto(b)
        self.n += k or 0
        return k


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a file of zstd frames; a file that stops inside a frame is an error
    (zstandard's stream_reader returns what it has, as if the file ended there)."""

    def __init__(self, f, path: Path):

        self.f, self.path, self.zstd = f, path, zstandard
        self.frame, self.inside = zstandard.ZstdDecompressor().decompressobj(), False
        self.out, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.at == len(self.out):
            chunk = self.f.read(1 << 16)
            if not chunk:
                if self.inside:
                    raise DataError(f"{self.path}: ends inside a zstd frame: the file is truncated")
                return 0
            self.out, self.at = self._decompress(chunk), 0
        n = min(len(b), len(self.out) - self.at)
        b[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        try:
            while chunk:
                parts.append(self.frame.decompress(chunk))
                self.inside = not self.frame.eof
                chunk = b""
                if self.frame.eof:  # the next frame starts in what is left
                    chunk, self.frame = self.frame.unused_data, self.zstd.ZstdDecompressor().decompressobj()
        except self.zstd.ZstdError as e:
            raise DataError(f"{self.path}: not valid zstd data ({e})") from None
        return b"".join(parts)


def open_input(path: Path, compression: str | None) -> tuple[io.BufferedIOBase, _Counted]:
    """A binary stream of the file's (decompressed) bytes, and the counter of the file bytes read."""
    raw = _Counted(open(path, "rb", buffering=0))
    if compression == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)), raw
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(io.BufferedReader(raw, 1 << 20), path), 1 << 20), raw
    return io.BufferedReader(raw, 1 << 20), raw


def _cut_point(buf: bytes) -> int:
    """Where to end a piece of a text file so that tokenizing the pieces gives the tokens of the whole.

    GPT-2's pre-tokenizer makes a newline between two visible ASCII characters a pre-token of its
    own, so a cut just after it falls between two pre-tokens (with whitespace around the newline it
    would not: "  \n" and "\n\n" split differently at the end of a text); failing that, a cut before
    a space that precedes an ASCII letter; failing that (a very long line), any character boundary.
    """
    i = len(buf)
    while (i := buf.rfind(b"\n", 0, i)) > 0:
        if i + 1 < len(buf) and 0x21 <= buf[i + 1] <= 0x7E and 0x21 <= buf[i - 1] <= 0x7E:
            return i + 1
    i, tail = len(buf), max(len(buf) - (1 << 16), 1)
    while (i := buf.rfind(b" ", tail, i)) > 0:
        if buf[i + 1 : i + 2].isalpha():  # bytes.isalpha: ASCII letters only
            return i
    return -1


def _char_boundary(buf: bytes) -> int:
    """The start of the last UTF-8 character in buf (a cut there splits no character)."""
    i = len(buf) - 1
    while i > 0 and 0x80 <= buf[i] < 0xC0:
        i -= 1
    return i


def text_pieces(stream, size: int = TEXT_CHUNK) -> Iterator[tuple[int, bytes]]:
    """(byte offset, piece) of a text file, each piece about `size` bytes, cut by _cut_point."""
    buf, offset = b"", 0
    while True:
        data = stream.read(size)
        if not data:
            if buf or offset == 0:  # an empty file is one empty piece (counted as an empty document)
                yield offset, buf
            return
        buf += data
        if len(buf) < size:
            continue
        cut = _cut_point(buf)
        if cut <= 0:
            if len(buf) < 8 * size:  # read on for a clean cut, within bounds
                continue
            cut = _char_boundary(buf)
        yield offset, buf[:cut]
        offset += cut
        buf = buf[cut:]


@dataclass
class Item:
    """One record of the input: a document, or a piece of one (text files)."""

    file: int
    record: int  # index within its file: piece, line or row
    where: int  # line number (JSON Lines), byte offset (text) or row (Parquet), for messages
    first: bool  # starts a document
    last: bool  # ends a document


def read_items(files: list[Path], kinds: list[tuple[str, str | None]], text_field: str,
               start: tuple[int, int] = (0, 0), on_bytes=None) -> Iterator[tuple[Item, bytes | str | None]]:
    """Every record of every file in order, from position `start` = (file, record) on.

    `on_bytes(n)` is told the input bytes read so far (compressed bytes for compressed files).
    """
    done = sum(_size(f) for f in files[: start[0]])
    for fi in range(start[0], len(files)):
        path, (kind, compression) = files[fi], kinds[fi]
        skip = start[1] if fi == start[0] else 0
        if kind == "dataset":
            yield from _dataset_items(fi, path, skip, on_bytes)
        elif kind == "parquet":
            yield from _parquet_items(fi, path, text_field, skip)
        else:
            try:
                stream, raw = open_input(path, compression)
            except OSError as e:
                raise DataError(f"{path}: cannot read file ({e.strerror})") from None
            with stream:
                try:
                    if kind == "jsonl":
                        for ri, line in enumerate(stream):
                            if ri >= skip and line.strip():
                                yield Item(fi, ri, ri + 1, True, True), line
                            if on_bytes and not ri % 1024:
                                on_bytes(done + raw.n)
                    else:
                        prev = None
                        for ri, (offset, piece) in enumerate(text_pieces(stream, TEXT_CHUNK)):
                            if (nul := piece.find(b"\0")) >= 0:
                                raise not_text(path, f"a NUL byte at byte {offset + nul}")
                            if prev is not None:
                                yield prev
                            prev = (Item(fi, ri, offset, ri == 0, False), piece) if ri >= skip else None
                            if on_bytes:
                                on_bytes(done + raw.n)
                        if prev is not None:
                            prev[0].last = True
                            yield prev
                except (OSError, EOFError, gzip.BadGzipFile) as e:  # zstd: _ZstdFrames raises DataErrors itself
                    raise DataError(f"{path}: cannot decompress or read ({e})") from None
        done += _size(path)
        if on_bytes:
            on_bytes(done)


def _size(f: Path | DatasetInput) -> int:
    """What the progress bar counts of an input: a file's bytes, a dataset's rows (0 when it does not say)."""
    return (f.rows or 0) if isinstance(f, DatasetInput) else f.stat().st_size


def _dataset_items(fi: int, ds: DatasetInput, skip: int, on_rows=None):
    """The rows of a dataset as records, from row `skip` on; `on_rows` is told the rows read so far."""
    for row, value in ds.records(skip):
        yield Item(fi, row, row, True, True), value
        if on_rows and not row % 1024:
            on_rows(row)


def _parquet_items(fi: int, path: Path, text_field: str, skip: int):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'gptforge[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose one with "
                        "--text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if row >= skip:
                yield Item(fi, row, row, True, True), value
            row += 1


# ----------------------------------------------------------------------------- the worker side

_W: dict = {}


def _init_worker(tokenizer_spec: tuple[str, str], dtype: str, text_field: str, main_pid: int | None = None) -> None:
    """Set up a worker process (main_pid: the process it works for), or the main process itself (None)."""
    if main_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
        _die_with(main_pid)
    kind, value = tokenizer_spec
    tok = get_tokenizer("gpt2") if kind == "gpt2" else HFTokenizer(value)
    _W.update(tokenizer=tok, dtype=np.dtype(dtype), text_field=text_field)


def _die_with(main_pid: int) -> None:
    """End this worker when the main process ends, also when it is killed (SIGKILL, the OOM killer), which
    runs no cleanup: else the worker would wait for tasks forever. Linux only (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != main_pid:  # it died before the line above
        os._exit(1)


def _decode(b: bytes) -> tuple[str, int, int]:
    """Text, number of invalid UTF-8 sequences replaced by U+FFFD, byte offset of the first one (-1: none)."""
    try:
        return b.decode("utf-8"), 0, -1
    except UnicodeDecodeError as e:
        text = b.decode("utf-8", "replace")
        return text, text.count("\ufffd") - b.count("\ufffd".encode()), e.start


def _record_text(kind: str, payload, first: bool, last: bool, text_field: str) -> tuple[int, str, int, int]:
    """(status, text or error message, invalid UTF-8 count, first invalid byte offset) of one record."""
    if kind in ("parquet", "dataset"):
        if payload is None:
            return EMPTY, "", 0, -1
        if not isinstance(payload, str):
            return BAD, f"column {text_field!r} holds {type(payload).__name__}, not text", 0, -1
        text, bad, at = payload, 0, -1
    else:
        text, bad, at = _decode(payload)
    if kind == "jsonl":
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            return BAD, f"not valid JSON ({e.msg} at column {e.colno})", bad, at
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            return BAD, f"no field {text_field!r} (the record has: {keys}); choose the field with --text-field", bad, at
        text = record[text_field]
        if text is None:
            return EMPTY, "", bad, at
        if not isinstance(text, str):
            return BAD, f"field {text_field!r} holds a JSON {type(text).__name__}, not text", bad, at
    if kind != "text" and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes: not Unicode text
            fixed = text.encode("utf-8", "replace").decode("utf-8")
            bad, at = bad + sum(a != b for a, b in zip(text, fixed)), max(at, 0)
            text = fixed
    if first and last and not text.strip():
        return EMPTY, "", bad, at
    return OK, text, bad, at


def _encode_task(kind: str, payloads: list) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Tokenize a task: (tokens of all OK records, concatenated; per-record token counts; statuses;
    per-record (invalid UTF-8 count, first offset) or None, and error messages)."""
    tok, dtype, text_field = _W["tokenizer"], _W["dtype"], _W["text_field"]
    encode = getattr(tok, "encode_array", None)
    arrays, lengths, statuses = [], np.zeros(len(payloads), dtype=np.int64), []
    for i, (payload, first, last) in enumerate(payloads):
        status, text, bad, at = _record_text(kind, payload, first, last, text_field)
        statuses.append((status, text if status == BAD else None, bad, at))
        if status == OK:
            ids = encode(text) if encode else np.asarray(tok.encode(text), dtype=np.uint32)
            arrays.append(ids)
            lengths[i] = len(ids)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)
    if dtype == np.uint16 and len(tokens) and int(tokens.max()) >= 1 << 16:
        raise DataError(f"the tokenizer gave id {int(tokens.max())}, too large for uint16; use --dtype uint32")
    return tokens.astype(dtype, copy=False), lengths, statuses


def _classify_task(kind: str, payloads: list) -> list:
    """_encode_task without tokenizing: the statuses only (the counting pass of --val-docs)."""
    text_field = _W["text_field"]
    return [_record_text(kind, p, first, last, text_field)[0:1] + (None, 0, -1) for p, first, last in payloads]


def _tasks(items: Iterator[tuple[Item, bytes | str | None]], kinds) -> Iterator[tuple[str, list[Item], list]]:
    """Group records of one file into tasks of about TASK_BYTES."""
    metas: list[Item] = []
    payloads: list = []
    size = 0
    for item, payload in items:
        if metas and (item.file != metas[0].file or size >= TASK_BYTES or len(metas) >= TASK_RECORDS):
            yield kinds[metas[0].file][0], metas, payloads
            metas, payloads, size = [], [], 0
        metas.append(item)
        payloads.append((payload, item.first, item.last))
        size += len(payload) if isinstance(payload, (str, bytes)) else 0  # a number in a column is a bad record
    if metas:
        yield kinds[metas[0].file][0], metas, payloads


def _run(fn, tasks, pool: ProcessPoolExecutor | None, workers: int):
    """(metas, fn(kind, payloads)) for each task, in order, at most 2 * workers + 2 in flight."""
    if pool is None:
        for kind, metas, payloads in tasks:
            yield metas, fn(kind, payloads)
        return
    pending: deque = deque()
    for kind, metas, payloads in tasks:
        pending.append((metas, pool.submit(fn, kind, payloads)))
        if len(pending) >= 2 * workers + 2:
            metas, fut = pending.popleft()
            yield metas, fut.result()
    while pending:
        metas, fut = pending.popleft()
        yield metas, fut.result()


def _pool(workers: int, init_args: tuple) -> ProcessPoolExecutor | None:
    if workers == 1:
        _init_worker(*init_args)
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(*init_args, os.getpid()))


# ----------------------------------------------------------------------------- the main side: shards, state


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

    def __init__(self, out: Path, state: dict, dtype: np.dtype):
        self.out, self.state, self.dtype = out, state, dtype
        self.writers: dict[str, ShardWriter] = {}

    def __getitem__(self, split: str) -> ShardWriter:
        if split not in self.writers:
            self.writers[split] = ShardWriter(self.out, split, len(self.state["splits"][split]["shards"]), self.dtype)
        return self.writers[split]

    def tokens(self) -> int:
        """Tokens written so far, in finished shards and open ones."""
        return sum(s["tokens"] for s in self.state["splits"].values()) + sum(w.tokens for w in self.writers.values())

    def full(self, shard_tokens: int) -> bool:
        return any(w.tokens >= shard_tokens for w in self.writers.values())

    def commit(self, position: list[int], open_doc: str | None, stats: Stats) -> None:
        for split, w in self.writers.items():
            entry = w.close()
            s = self.state["splits"][split]
            s["shards"].append(entry)
            s["tokens"] += entry["tokens"]
            s["documents"] += entry["documents"]
        self.writers.clear()
        self.state.update(position=position, open_doc=open_doc, stats=asdict(stats))
        _atomic_write(self.out / STATE, self.state)
        faults.point("prepare-between-shards")

    def discard(self) -> None:
        for w in self.writers.values():
            w.discard()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def in_val(doc: int, seed: int, val_fraction: float) -> bool:
    """Whether document number `doc` is held out: a seeded hash of its number below val_fraction."""
    return _splitmix64(_splitmix64(seed) ^ doc) < val_fraction * 2.0**64


def _atomic_write(path: Path, content: dict | str) -> None:
    """A JSON object (or text) written with checkpoint.atomic_write_bytes; a failure is one line naming the file."""
    text = content if isinstance(content, str) else json.dumps(content, indent=1)
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror})") from None


def _fingerprint(files: list[Path], tokenizer: Tokenizer, cfg: PrepareConfig, dtype: str) -> dict:
    """What the output depends on: the input files (path, size, mtime) and the settings that shape it."""
    inputs = []
    for f in files:
        if isinstance(f, DatasetInput):
            inputs.append(f.fingerprint())
            continue
        st = f.stat()
        inputs.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    settings = {k: getattr(cfg, k) for k in ("text_field", "val_fraction", "val_docs", "seed", "shard_tokens")}
    settings.update(tokenizer=tokenizer.name, dtype=dtype, text_chunk=TEXT_CHUNK, version=SHARDS_VERSION)
    return {"inputs": inputs, "settings": settings}


@dataclass
class Stats:
    documents: int = 0  # documents numbered so far (the train/val hash is over this number)
    empty: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)
    invalid_utf8: int = 0
    invalid_examples: list = field(default_factory=list)


def written_name(name: str) -> str:
    """The file a temporary file of an atomic write becomes (.NAME.tmp, .NAME.tmp-PID -> NAME); others as they are."""
    m = re.fullmatch(r"\.(.+)\.tmp(-\d+)?", name)
    return m.group(1) if m else name


def made_by_prepare(name: str) -> bool:
    """Whether a file name in DATA_DIR is one that prepare writes (or a temporary file of one)."""
    name = written_name(name)
    ours = (MANIFEST, STATE, TOKENIZER_FILE, TOKENIZER_CONFIG)
    return name in ours or re.fullmatch(r"(train|val)-\d{6}\.bin", name) is not None


def _clean_dir(out: Path) -> None:
    for p in out.iterdir():
        if made_by_prepare(p.name):
            try:
                p.unlink()
            except OSError as e:
                raise DataError(f"{p}: cannot remove it to prepare anew ({e.strerror})") from None


def check_out(out: Path, ours, command: str, probe: bool = True) -> None:
    """Refuse, before any work, an --out that is a file, cannot be written (`probe`: try), or holds files `command`
    did not make (`ours(name)` says which names it makes): no command writes where someone else's files are."""
    check_writable(out, "--out", probe=False)
    foreign = sorted(p.name for p in out.iterdir() if not ours(p.name)) if out.is_dir() else []
    if foreign:
        raise DataError(f"--out {out}: the directory holds files {command} did not make ({', '.join(foreign[:3])}"
                        + (", ..." if len(foreign) > 3 else "") + "); choose a new or empty directory")
    check_writable(out, "--out", probe=probe)


def _read_state(path: Path) -> dict:
    """prepare-state.json of an interrupted run, checked as far as resuming reads it."""
    try:
        state = json.loads(path.read_bytes())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the state of the interrupted prepare ({e}); pass --overwrite to "
                        "prepare anew") from None
    for key, ok in (("fingerprint", lambda v: isinstance(v, dict)), ("open_doc", lambda v: v in (None, *SPLITS)),
                    ("position", lambda v: isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)),
                    ("stats", lambda v: isinstance(v, dict) and set(v) == set(asdict(Stats()))),
                    ("val_set", lambda v: v is None or isinstance(v, list)), ("splits", lambda v: isinstance(v, dict))):
        if not ok(state.get(key)):
            raise DataError(f"{path}: {key} is missing or damaged; pass --overwrite to prepare anew")
    check_splits(state["splits"], path, "pass --overwrite to prepare anew")
    return state


def _existing(out: Path, fp: dict, dtype: str, cfg: PrepareConfig, log) -> tuple[dict | None, dict | None]:
    """What `out` holds: (its manifest, None) when it is this very data, finished and intact; (None, the saved
    state) for an interrupted prepare of it to resume; (None, None) to start afresh, after removing what an
    earlier prepare left there: data damaged since (with a warning), or with --overwrite, data from other inputs
    or settings, or that cannot be read."""
    for name in (MANIFEST, STATE):
        path = out / name
        if not path.is_file():
            continue
        try:
            saved = read_manifest(out) if name == MANIFEST else _read_state(path)
        except DataError:
            if not cfg.overwrite:
                raise
            break
        if saved.get("fingerprint") != fp:
            if not cfg.overwrite:
                what = "prepared" if name == MANIFEST else "being prepared (interrupted)"
                raise DataError(f"{out} holds data {what} from other inputs or settings; pass --overwrite to "
                                "replace it, or choose another --out")
            break
        if problems := damaged_shards(out, saved["splits"], dtype, path):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log(f"warning: {problems[0]}{more}; preparing {out} again from the start")
            break
        if name == MANIFEST:
            log(f"{out}: up to date ({saved['splits']['train']['tokens']:,} train tokens); nothing to do")
            return saved, None
        return None, saved
    if out.is_dir():
        _clean_dir(out)
    return None, None


def _open_inputs(inputs: Sequence[str | Path], out: Path, cfg: PrepareConfig) -> tuple[list, list]:
    """The inputs as (files, their kinds): files found in the inputs, or the one Hugging Face dataset given
    (a DatasetInput, kind "dataset"); --config, --split and --streaming are refused for files."""
    if any(hf_datasets.is_dataset(i) for i in inputs):
        if len(inputs) > 1:
            name = next(str(i) for i in inputs if hf_datasets.is_dataset(i))
            raise DataError(f"{name}: a Hugging Face dataset is prepared on its own; give it as the only input "
                            "(prepare the other inputs into another --out)")
        check_out(out, made_by_prepare, "gptforge prepare", probe=False)  # before a hub dataset is downloaded
        ds = hf_datasets.open_dataset(inputs[0], cfg.config, cfg.split, cfg.streaming, cfg.text_field)
        return [ds], [("dataset", None)]
    for name, value in (("config", cfg.config), ("split", cfg.split), ("streaming", cfg.streaming or None)):
        if value is not None:
            raise DataError(f"--{name} is for a Hugging Face dataset (hf:NAME, or a directory written by "
                            "save_to_disk), and the inputs are files; drop it")
    out_abs = out.resolve()
    files = [f for f in find_inputs(inputs, cfg.include_patterns())
             if out_abs not in f.resolve().parents]  # not our own output
    if not files:
        raise DataError(f"--out {out}: every input is inside it; choose an --out outside the inputs")
    return files, [file_kind(f) for f in files]


def _input_stats(files: list) -> dict:
    """The manifest's account of the inputs: their files and bytes, or for a dataset its "source" (dataset, config,
    split, revision, fingerprint, streaming)."""
    if isinstance(files[0], DatasetInput):
        return {"source": files[0].source()}
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def prepare(inputs: Sequence[str | Path], out: str | Path, cfg: PrepareConfig, log=print) -> dict:
    """Prepare `inputs` into shards in `out`; returns the manifest. Resumes an interrupted run."""
    out = Path(out)
    files, kinds = _open_inputs(inputs, out, cfg)
    # finished data may sit in a read-only place, and is only read when it is up to date: no write probe then
    check_out(out, made_by_prepare, "gptforge prepare", probe=not (out / MANIFEST).is_file())
    tokenizer = get_tokenizer(cfg.tokenizer)
    if tokenizer.eot_id is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has no end-of-text token (looked for <|endoftext|>, </s>, "
                          "<eos>); documents could not be separated: give it an eos_token in a "
                          f"{TOKENIZER_CONFIG} beside its tokenizer.json")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32")
    if dtype == "uint16" and tokenizer.vocab_size > 1 << 16:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size:,} ids, too many for uint16 (65,536); "
                        "use --dtype uint32 or auto")
    fp = _fingerprint(files, tokenizer, cfg, dtype)
    finished, state = _existing(out, fp, dtype, cfg, log)
    if finished is not None:
        return finished
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    for p in out.glob(".*.bin.tmp"):  # half-written shards of an interrupted run: never finished
        p.unlink()
    if isinstance(tokenizer, HFTokenizer):
        _atomic_write(out / TOKENIZER_FILE, tokenizer.json)
        if tokenizer.has_config:  # the data's own copy gives the same eos (and name) as the original
            _atomic_write(out / TOKENIZER_CONFIG, tokenizer.config())
    state = state or {"fingerprint": fp, "position": [0, 0], "open_doc": None, "stats": asdict(Stats()),
                      "splits": {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}, "val_set": None}
    stats = Stats(**state["stats"])
    tok_spec = ("hf", tokenizer.json) if isinstance(tokenizer, HFTokenizer) else ("gpt2", "")
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    pool = _pool(workers, (tok_spec, dtype, cfg.text_field))
    try:
        if cfg.val_docs is not None and state["val_set"] is None:
            state["val_set"] = _choose_val_docs(files, kinds, cfg, pool, workers, log)
        _write_shards(files, kinds, cfg, tokenizer, OpenShards(out, state, np.dtype(dtype)), stats, pool, workers)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if stats.documents == 0:
        _clean_dir(out)
        raise DataError(f"no text found in {', '.join(map(str, files))}: all {len(files)} input file(s) hold "
                        f"only empty documents" + (f" or bad lines ({stats.bad_lines} skipped)"
                                                   if stats.bad_lines else ""))
    manifest = {
        "format": SHARDS_FORMAT, "version": SHARDS_VERSION,
        "tokenizer": {"name": tokenizer.name, **({"file": TOKENIZER_FILE} if isinstance(tokenizer, HFTokenizer)
                                                 else {})},
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "splits": state["splits"],
        "stats": {**_input_stats(files), "empty_documents": stats.empty,
                  "bad_lines_skipped": stats.bad_lines, "invalid_utf8_replaced": stats.invalid_utf8},
        "fingerprint": fp,
    }
    _atomic_write(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    _report(manifest, stats, out, cfg, log)
    return manifest


def _write_shards(files: list[Path], kinds: list, cfg: PrepareConfig, tokenizer: Tokenizer, shards: OpenShards,
                  stats: Stats, pool, workers: int) -> None:
    """Tokenize the input from the saved position on into the shards, committing them whenever one is full."""
    state = shards.state
    val_set = set(state["val_set"]) if state["val_set"] is not None else None
    datasets = any(isinstance(f, DatasetInput) for f in files)
    skipped = state["position"][1] if datasets else sum(_size(f) for f in files[: state["position"][0]])
    bar = _Progress(cfg.progress, sum(_size(f) for f in files) or None, skipped, shards.tokens(),
                    unit="rows" if datasets else "B")
    position, open_doc = list(state["position"]), state["open_doc"]
    eot = np.array([tokenizer.eot_id], dtype=shards.dtype)
    items = read_items(files, kinds, cfg.text_field, tuple(position), on_bytes=bar.set_bytes)
    try:
        for metas, (tokens, lengths, statuses) in _run(_encode_task, _tasks(items, kinds), pool, workers):
            at = 0
            for meta, n, status in zip(metas, lengths, statuses):
                if _count(stats, status, files[meta.file], kinds[meta.file][0], meta, cfg.skip_bad_lines):
                    if meta.first:
                        held = (stats.documents in val_set if val_set is not None
                                else in_val(stats.documents, cfg.seed, cfg.val_fraction))
                        open_doc = "val" if held else "train"
                        stats.documents += 1
                        shards[open_doc].write(eot)
                        shards[open_doc].documents += 1
                    shards[open_doc].write(tokens[at : at + n])
                    at += n
                position = [meta.file, meta.record + 1]
                if meta.last:
                    open_doc = None
                if shards.full(cfg.shard_tokens):
                    shards.commit(position, open_doc, stats)
            bar.set_tokens(shards.tokens())
        shards.commit(position, open_doc, stats)
    finally:
        shards.discard()
        bar.close()


def _count(stats: Stats, status: tuple, path: Path, kind: str, meta: Item, skip_bad_lines: bool) -> bool:
    """Count one record's invalid UTF-8, emptiness or badness in `stats`; whether it has text to write."""
    status, message, bad, bad_at = status
    if bad:
        stats.invalid_utf8 += bad
        if len(stats.invalid_examples) < 3:
            stats.invalid_examples.append(_where(path, kind, meta, bad_at))
    if status == BAD:
        where = _where(path, kind, meta)
        if not skip_bad_lines:
            raise DataError(f"{where}: {message}; fix it, or pass --skip-bad-lines to skip such records")
        stats.bad_lines += 1
        if len(stats.bad_examples) < 3:
            stats.bad_examples.append(f"{where}: {message}")
    elif status == EMPTY:
        stats.empty += 1
    return status == OK


def _where(path: Path, kind: str, meta: Item, offset: int = -1) -> str:
    if kind == "jsonl":
        return f"{path}:{meta.where}"
    if kind in ("parquet", "dataset"):
        return f"{path}: row {meta.where}"
    return f"{path}: byte {meta.where + max(offset, 0)}"


def _choose_val_docs(files, kinds, cfg: PrepareConfig, pool, workers: int, log) -> list[int]:
    """--val-docs N: count the documents (no tokenizing), then pick N of them with the seed."""
    log("counting documents for --val-docs ...")
    n = 0
    for metas, statuses in _run(_classify_task, _tasks(read_items(files, kinds, cfg.text_field), kinds), pool,
                                workers):
        for meta, (status, *_rest) in zip(metas, statuses):
            if status == BAD and not cfg.skip_bad_lines:
                raise DataError(f"{_where(files[meta.file], kinds[meta.file][0], meta)}: cannot be read as a record "
                                "with text; fix it, or pass --skip-bad-lines to skip such records")
            n += status == OK and meta.first
    if cfg.val_docs >= n:
        raise DataError(f"--val-docs {cfg.val_docs} asks for at least as many documents as the input has ({n}); "
                        "leave some for training")
    rng = np.random.default_rng(cfg.seed)
    return sorted(int(i) for i in rng.choice(n, size=cfg.val_docs, replace=False))


class _Progress:
    """The bar: input bytes read (or a dataset's rows, unit="rows"; total None: a stream of unknown length)."""

    def __init__(self, enabled: bool, total: int | None, initial_bytes: int, initial_tokens: int, unit: str = "B"):
        self.bar = tqdm(total=total, initial=initial_bytes, unit=unit, unit_scale=unit == "B", desc="prepare",
                        disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.tokens = initial_tokens

    def set_bytes(self, n: int) -> None:
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def set_tokens(self, n: int) -> None:

        self.tokens = n
        self.bar.set_postfix_str(f"{human(n)} tokens", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _report(manifest: dict, stats: Stats, out: Path, cfg: PrepareConfig, log) -> None:
    s = manifest["splits"]
    log(f"{out}: {s['train']['tokens']:,} train tokens ({s['train']['documents']:,} documents, "
        f"{len(s['train']['shards'])} shards), {s['val']['tokens']:,} val tokens ({s['val']['documents']:,} "
        f"documents), {manifest['dtype']}, tokenizer {manifest['tokenizer']['name']}")
    if stats.invalid_utf8:
        log(f"warning: {stats.invalid_utf8:,} invalid UTF-8 sequences were replaced by U+FFFD (first at "
            f"{'; '.join(stats.invalid_examples)})")
    if stats.bad_lines:
        log(f"warning: {stats.bad_lines:,} bad records skipped (first: {'; '.join(stats.bad_examples)})")
    if stats.empty:
        log(f"note: {stats.empty:,} empty documents skipped")
    if s["val"]["documents"] == 0 and (cfg.val_fraction > 0 or cfg.val_docs):
        log("warning: no document was held out for validation; raise --val-fraction or use --val-docs")


# ----------------------------------------------------------------------------- your own tokenizer


def document_texts(files: list[Path], kinds: list, text_field: str = "text",
                   skip_bad_lines: bool = True) -> Iterator[str]:
    """The texts of every document (pieces of large text files) in the files, streamed."""
    for item, payload in read_items(files, kinds, text_field):
        status, text, _, _ = _record_text(kinds[item.file][0], payload, item.first, item.last, text_field)
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

    if min_frequency < 0:
        raise DataError(f"--min-frequency {min_frequency}: must be 0 or more (merge only pairs seen at least this "
                        "often; 2 by default)")
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
