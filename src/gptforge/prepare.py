"""`gptforge prepare`: stream a corpus of any size into flat binary token shards and a JSON manifest.

Inputs are text files (one file = one document), JSON Lines (one record = one document, its text
in ``--text-field``), Parquet (one row = one document) and any of them compressed with gzip or
zstd. Every document is written as ``<|endoftext|>`` followed by its tokens, to the train or the
val split (a whole document goes to one split, chosen by a seeded hash of its number, so the
split is the same for the same input and seed whatever the number of workers).

The work is streamed and bounded: the main process reads, cuts the input into tasks of about a
megabyte, and hands them to ``--workers`` processes that decode, parse and tokenize; at most
``2 * workers + 2`` tasks are in flight. Results are written in input order to the open shard of
each split (``.train-000003.bin.tmp``). When a shard reaches ``--shard-tokens`` tokens, every open
shard is fsynced and renamed to its final name and ``prepare-state.json`` records where in the
input the next shard starts: an interrupted run resumes there, and a file without a final name is
never taken for a shard. The manifest is written last; when it exists and the inputs and settings
are unchanged, a new run does nothing.

DATA_DIR/
    manifest.json            tokenizer, vocab size, dtype, per split: tokens, documents, shards (sha256)
    tokenizer.json           a copy of the tokenizer, when it is a Hugging Face one
    train-000000.bin ...     raw little-endian uint16 (or uint32) token ids
    val-000000.bin ...
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ConfigError, opt
from .data import DataError, find_text_files
from .tokenizer import HFTokenizer, Tokenizer, get_tokenizer

MANIFEST = "manifest.json"
STATE = "prepare-state.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "gptforge-shards"
VERSION = 1
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
DEFAULT_INCLUDE = tuple(f"*{s}{c}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
                        for c in ("", ".gz", ".zst"))
TEXT_CHUNK = 1 << 20  # bytes of a text file per piece (cut at a line start, see _cut_point)
TASK_BYTES = 1 << 20  # input bytes per task handed to a worker
TASK_RECORDS = 4096

OK, EMPTY, BAD = 0, 1, 2  # status of one record after a worker has looked at it


@dataclass
class PrepareConfig:
    """How `gptforge prepare` reads a corpus and writes shards."""

    tokenizer: str = opt("gpt2", "Tokenizer: gpt2, or the path of a Hugging Face tokenizer.json (or its directory).")
    text_field: str = opt("text", "Field of a JSON Lines record (column of a Parquet file) that holds the text.")
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


def file_kind(path: Path) -> tuple[str, str | None]:
    """('text' | 'jsonl' | 'parquet', compression or None) from the file name."""
    name = path.name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], comp
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(PARQUET_SUFFIXES):
        if compression:
            raise DataError(f"{path}: a compressed Parquet file; Parquet compresses itself, decompress it first")
        return "parquet", None
    return "text", compression


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


def open_input(path: Path, compression: str | None) -> tuple[io.BufferedIOBase, _Counted]:
    """A binary stream of the file's (decompressed) bytes, and the counter of the file bytes read."""
    raw = _Counted(open(path, "rb", buffering=0))
    if compression == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)), raw
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw, 1 << 20), read_size=1 << 20)
        return io.BufferedReader(reader, 1 << 20), raw
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
    done = sum(f.stat().st_size for f in files[: start[0]])
    for fi in range(start[0], len(files)):
        path, (kind, compression) = files[fi], kinds[fi]
        skip = start[1] if fi == start[0] else 0
        if kind == "parquet":
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
                            if prev is not None:
                                yield prev
                            prev = (Item(fi, ri, offset, ri == 0, False), piece) if ri >= skip else None
                            if on_bytes:
                                on_bytes(done + raw.n)
                        if prev is not None:
                            prev[0].last = True
                            yield prev
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise DataError(f"{path}: cannot decompress or read ({e})") from None
                except Exception as e:
                    if type(e).__module__.startswith("zstd"):
                        raise DataError(f"{path}: cannot decompress ({e})") from None
                    raise
        done += path.stat().st_size
        if on_bytes:
            on_bytes(done)


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


def _init_worker(tokenizer_spec: tuple[str, str], dtype: str, text_field: str, in_process: bool = False) -> None:
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    kind, value = tokenizer_spec
    tok = get_tokenizer("gpt2") if kind == "gpt2" else HFTokenizer(value)
    _W.update(tokenizer=tok, dtype=np.dtype(dtype), text_field=text_field)


def _decode(b: bytes) -> tuple[str, int, int]:
    """Text, number of invalid UTF-8 sequences replaced by U+FFFD, byte offset of the first one (-1: none)."""
    try:
        return b.decode("utf-8"), 0, -1
    except UnicodeDecodeError as e:
        text = b.decode("utf-8", "replace")
        return text, text.count("\ufffd") - b.count("\ufffd".encode()), e.start


def _record_text(kind: str, payload, first: bool, last: bool, text_field: str) -> tuple[int, str, int, int]:
    """(status, text or error message, invalid UTF-8 count, first invalid byte offset) of one record."""
    if kind == "parquet":
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
        size += len(payload) if payload is not None else 0
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
        _init_worker(*init_args, in_process=True)
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args)


# ----------------------------------------------------------------------------- the main side: shards, state


class ShardWriter:
    """One shard being written under a temporary name; `close` fsyncs it and gives it its final name."""

    def __init__(self, out: Path, split: str, index: int, dtype: np.dtype):
        self.name = f"{split}-{index:06d}.bin"
        self.final, self.tmp = out / self.name, out / f".{self.name}.tmp"
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.dtype = dtype
        self.tokens = 0
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        b = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self.f.write(b)
        self.sha.update(b)
        self.tokens += len(ids)

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        return {"file": self.name, "tokens": self.tokens, "documents": self.documents,
                "sha256": self.sha.hexdigest()}

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def in_val(doc: int, seed: int, val_fraction: float) -> bool:
    """Whether document number `doc` is held out: a seeded hash of its number below val_fraction."""
    return _splitmix64(_splitmix64(seed) ^ doc) < val_fraction * 2.0**64


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fingerprint(files: list[Path], tokenizer: Tokenizer, cfg: PrepareConfig, dtype: str) -> dict:
    """What the output depends on: the input files (path, size, mtime) and the settings that shape it."""
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    settings = {k: getattr(cfg, k) for k in ("text_field", "val_fraction", "val_docs", "seed", "shard_tokens")}
    settings.update(tokenizer=tokenizer.name, dtype=dtype, text_chunk=TEXT_CHUNK, version=VERSION)
    return {"inputs": inputs, "settings": settings}


@dataclass
class Stats:
    documents: int = 0  # documents numbered so far (the train/val hash is over this number)
    empty: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)
    invalid_utf8: int = 0
    invalid_examples: list = field(default_factory=list)


def _clean_dir(out: Path) -> None:
    for p in out.iterdir():
        if p.name in (MANIFEST, STATE, TOKENIZER_FILE) or re.fullmatch(r"\.?(train|val)-\d{6}\.bin(\.tmp)?", p.name):
            p.unlink()


def prepare(inputs: Sequence[str | Path], out: str | Path, cfg: PrepareConfig, log=print) -> dict:
    """Prepare `inputs` into shards in `out`; returns the manifest. Resumes an interrupted run."""
    out = Path(out)
    patterns = cfg.include_patterns()
    out_abs = out.resolve()
    files = [f for f in find_inputs(inputs, patterns) if out_abs not in f.resolve().parents]  # not our own output
    if not files:
        raise DataError(f"no input files besides {out}'s own")
    kinds = [file_kind(f) for f in files]
    tokenizer = get_tokenizer(cfg.tokenizer)
    if tokenizer.eot_id is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has no end-of-text token (looked for <|endoftext|>, </s>, "
                          "<eos>); documents could not be separated")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32")
    if dtype == "uint16" and tokenizer.vocab_size > 1 << 16:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size:,} ids, too many for uint16 (65,536); "
                        "use --dtype uint32 or auto")
    fp = _fingerprint(files, tokenizer, cfg, dtype)

    # --- finished, unfinished, or something else in the directory?
    out.mkdir(parents=True, exist_ok=True)
    state = None
    for name in (MANIFEST, STATE):
        if (out / name).is_file():
            saved = json.loads((out / name).read_text())
            if saved.get("fingerprint") == fp:
                if name == MANIFEST:
                    log(f"{out}: up to date ({saved['splits']['train']['tokens']:,} train tokens); nothing to do")
                    return saved
                state = saved
            elif not cfg.overwrite:
                what = "prepared" if name == MANIFEST else "being prepared (interrupted)"
                raise DataError(f"{out} holds data {what} from other inputs or settings; pass --overwrite to "
                                "replace it, or choose another --out")
            break
    if state is None:
        _clean_dir(out)
    for p in out.glob(".*.bin.tmp"):  # half-written shards of an interrupted run: never finished
        p.unlink()
    if isinstance(tokenizer, HFTokenizer):
        (out / TOKENIZER_FILE).write_text(tokenizer.json, encoding="utf-8")
    tok_spec = ("hf", tokenizer.json) if isinstance(tokenizer, HFTokenizer) else ("gpt2", "")
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    np_dtype = np.dtype(dtype)

    if state is None:
        state = {"fingerprint": fp, "position": [0, 0], "open_doc": None, "stats": asdict(Stats()),
                 "splits": {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}, "val_set": None}
    stats = Stats(**state["stats"])
    splits = state["splits"]
    total_bytes = sum(f.stat().st_size for f in files)
    pool = _pool(workers, (tok_spec, dtype, cfg.text_field))
    try:
        if cfg.val_docs is not None and state["val_set"] is None:
            state["val_set"] = _choose_val_docs(files, kinds, cfg, pool, workers, log)
        val_set = set(state["val_set"]) if state["val_set"] is not None else None

        def split_of(doc: int) -> str:
            held = doc in val_set if val_set is not None else in_val(doc, cfg.seed, cfg.val_fraction)
            return "val" if held else "train"

        writers: dict[str, ShardWriter] = {}

        def writer(split: str) -> ShardWriter:
            if split not in writers:
                writers[split] = ShardWriter(out, split, len(splits[split]["shards"]), np_dtype)
            return writers[split]

        def commit(position: list[int], open_doc: str | None) -> None:
            for split, w in list(writers.items()):
                entry = w.close()
                splits[split]["shards"].append(entry)
                splits[split]["tokens"] += entry["tokens"]
                splits[split]["documents"] += entry["documents"]
            writers.clear()
            state.update(position=position, open_doc=open_doc, stats=asdict(stats))
            _atomic_json(out / STATE, state)

        skipped = sum(f.stat().st_size for f in files[: state["position"][0]])
        bar = _Progress(cfg.progress, total_bytes, skipped, sum(s["tokens"] for s in splits.values()))
        position, open_doc = list(state["position"]), state["open_doc"]
        eot = np.array([tokenizer.eot_id], dtype=np_dtype)
        items = read_items(files, kinds, cfg.text_field, tuple(position), on_bytes=bar.set_bytes)
        try:
            for metas, (tokens, lengths, statuses) in _run(_encode_task, _tasks(items, kinds), pool, workers):
                at = 0
                for meta, n, (status, message, bad, bad_at) in zip(metas, lengths, statuses):
                    path = files[meta.file]
                    if bad:
                        stats.invalid_utf8 += bad
                        if len(stats.invalid_examples) < 3:
                            stats.invalid_examples.append(_where(path, kinds[meta.file][0], meta, bad_at))
                    if status == BAD:
                        where = _where(path, kinds[meta.file][0], meta)
                        if not cfg.skip_bad_lines:
                            raise DataError(f"{where}: {message}; fix it, or pass --skip-bad-lines to skip such "
                                            "records")
                        stats.bad_lines += 1
                        if len(stats.bad_examples) < 3:
                            stats.bad_examples.append(f"{where}: {message}")
                    elif status == EMPTY:
                        stats.empty += 1
                    else:
                        if meta.first:
                            open_doc = split_of(stats.documents)
                            stats.documents += 1
                            w = writer(open_doc)
                            w.write(eot)
                            w.documents += 1
                        writer(open_doc).write(tokens[at : at + n])
                        at += n
                    position = [meta.file, meta.record + 1]
                    if meta.last:
                        open_doc = None
                    if any(w.tokens >= cfg.shard_tokens for w in writers.values()):
                        commit(position, open_doc)
                bar.set_tokens(sum(s["tokens"] for s in splits.values()) + sum(w.tokens for w in writers.values()))
            commit(position, open_doc)
        finally:
            for w in writers.values():
                w.discard()
            bar.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if stats.documents == 0:
        _clean_dir(out)
        raise DataError(f"no text found in {', '.join(map(str, inputs))}: all {len(files)} input file(s) hold "
                        f"only empty documents" + (f" or bad lines ({stats.bad_lines} skipped)"
                                                   if stats.bad_lines else ""))
    manifest = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"name": tokenizer.name, **({"file": TOKENIZER_FILE} if isinstance(tokenizer, HFTokenizer)
                                                 else {})},
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "splits": splits,
        "stats": {"files": len(files), "bytes": total_bytes, "empty_documents": stats.empty,
                  "bad_lines_skipped": stats.bad_lines, "invalid_utf8_replaced": stats.invalid_utf8},
        "fingerprint": fp,
    }
    _atomic_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    _report(manifest, stats, out, cfg, log)
    return manifest


def _where(path: Path, kind: str, meta: Item, offset: int = -1) -> str:
    if kind == "jsonl":
        return f"{path}:{meta.where}"
    if kind == "parquet":
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
    def __init__(self, enabled: bool, total: int, initial_bytes: int, initial_tokens: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial_bytes, unit="B", unit_scale=True, desc="prepare",
                        disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.tokens = initial_tokens

    def set_bytes(self, n: int) -> None:
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def set_tokens(self, n: int) -> None:
        from .report import human

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


# ----------------------------------------------------------------------------- reading prepared data


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a gptforge shard manifest")
    return manifest


def manifest_tokenizer(data_dir: str | Path, manifest: dict) -> str:
    """The tokenizer spec (for get_tokenizer) of prepared data."""
    t = manifest["tokenizer"]
    return str(Path(data_dir) / t["file"]) if "file" in t else t["name"]


def copy_tokenizer(data_dir: str | Path, dest: str | Path) -> None:
    manifest = read_manifest(data_dir)
    if "file" in manifest["tokenizer"]:
        shutil.copy(Path(data_dir) / manifest["tokenizer"]["file"], dest)


def document_texts(inputs: Sequence[str | Path], text_field: str = "text", include: str | None = None,
                   skip_bad_lines: bool = True) -> Iterator[str]:
    """The texts of every document (pieces of large text files) in the inputs, streamed."""
    patterns = PrepareConfig(include=include).include_patterns()
    files = find_inputs(inputs, patterns)
    kinds = [file_kind(f) for f in files]
    for item, payload in read_items(files, kinds, text_field):
        status, text, _, _ = _record_text(kinds[item.file][0], payload, item.first, item.last, text_field)
        if status == OK:
            yield text
        elif status == BAD and not skip_bad_lines:
            raise DataError(f"{_where(files[item.file], kinds[item.file][0], item)}: {text}")


def train_tokenizer(inputs: Sequence[str | Path], out: str | Path, vocab_size: int, text_field: str = "text",
                    include: str | None = None, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on the inputs and save it as out/tokenizer.json."""
    from .tokenizer import train_bpe

    n = 0

    def texts():
        nonlocal n
        for text in document_texts(inputs, text_field, include):
            n += 1
            yield text

    tok = train_bpe(texts(), vocab_size, min_frequency)
    if n == 0:
        raise DataError(f"no text found in {', '.join(map(str, inputs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tmp = out / f".{TOKENIZER_FILE}.tmp"
    tmp.write_text(tok.json, encoding="utf-8")
    os.replace(tmp, path)
    return path
