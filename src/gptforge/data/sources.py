"""What `gptforge prepare` reads: text, JSON Lines and Parquet files, gzip or zstd compressed, cut into records,
and Hugging Face datasets (`hf:NAME` or a save_to_disk directory) read through the `datasets` library."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from ..errors import DataError
from .config import JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES
from .text import file_format, find_text_files, not_text

DEFAULT_INCLUDE = tuple(f"*{s}{c}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
                        for c in ("", ".gz", ".zst"))
TEXT_CHUNK = 1 << 20  # bytes of a text file per piece (cut at a line start, see _cut_point)
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


PREFIX = "hf:"
SAVED_DATASET = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes beside its Arrow files
SAVED_DATASET_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk: this, and one saved Dataset per split
DEFAULT_SPLIT = "train"
BATCH_ROWS = 1024  # rows read from the dataset at a time


def is_saved_dataset(path: Path) -> bool:
    """Whether path is a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / SAVED_DATASET_DICT).is_file() or all((path / n).is_file() for n in SAVED_DATASET))


def is_dataset(spec: str | Path) -> bool:
    """Whether a prepare input names a Hugging Face dataset: hf:NAME, or a saved dataset's directory."""
    return str(spec).startswith(PREFIX) or is_saved_dataset(Path(spec))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the datasets package: pip install 'gptforge[datasets]'"
                        ) from None
    datasets.disable_progress_bars()  # prepare has its own
    return datasets


@dataclass
class DatasetInput:
    """One split of a dataset, opened (not read): what prepare iterates, names in messages and fingerprints."""

    name: str  # as given, without hf:
    config: str | None  # the builder config (None: a saved dataset, which has none)
    split: str
    streaming: bool
    revision: str | None  # the builder's hash: the hub commit of a hub dataset; None for a saved dataset
    data_fingerprint: str | None  # datasets' own fingerprint of a saved dataset (its state.json)
    rows: int | None  # rows in the split, when the dataset says
    dataset: Any  # datasets.Dataset or IterableDataset, its text column selected

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}" + (f" (config {self.config})" if self.config else "") + f" split {self.split}"

    def source(self) -> dict:
        """The manifest's record of where the data came from."""
        return {"dataset": self.name, "config": self.config, "split": self.split, "revision": self.revision,
                "fingerprint": self.data_fingerprint, "streaming": self.streaming}

    def fingerprint(self) -> dict:
        """What the prepared data depends on (streamed or not, the same)."""
        return {k: v for k, v in self.source().items() if k != "streaming"}

    def records(self, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """(row number, text column value) of every row from row `skip` on."""
        ds = self.dataset.skip(skip) if skip else self.dataset
        row = skip
        column = next(iter(ds.column_names)) if ds.column_names else None
        for batch in ds.iter(batch_size=BATCH_ROWS):
            if column is None:  # a stream that did not say its columns: the text field is the one asked for
                column = next(iter(batch))
            for value in batch[column]:
                yield row, value
                row += 1


def _choose_split(where: str, split: str | None, splits: list[str] | None) -> str:
    """--split, or train, or the only split there is; refused with the splits named when there is no such split."""
    if splits is None:  # the dataset does not say: train, as datasets itself assumes
        return split or DEFAULT_SPLIT
    if split is None:
        if DEFAULT_SPLIT in splits or len(splits) != 1:
            split = DEFAULT_SPLIT
        else:
            split = splits[0]
    if split not in splits:
        raise DataError(f"{where}: no split {split!r} (splits: {', '.join(splits)}); choose one with --split")
    return split


def _check_field(where: str, columns: list[str] | None, text_field: str) -> None:
    if columns is not None and text_field not in columns:
        raise DataError(f"{where}: no column {text_field!r} (columns: {', '.join(columns)}); choose one with "
                        "--text-field")


def _saved(path: Path, config: str | None, split: str | None, streaming: bool, text_field: str) -> DatasetInput:
    datasets = _datasets()
    if config is not None:
        raise DataError(f"{path}: a dataset saved with save_to_disk has no configs; drop --config {config}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ...
        raise DataError(f"{path}: not a readable saved dataset ({_first_line(e)})") from None
    state = path / SAVED_DATASET[0]
    if isinstance(ds, datasets.DatasetDict):
        split = _choose_split(str(path), split, list(ds))
        ds, state = ds[split], path / split / SAVED_DATASET[0]
    else:
        split = split or DEFAULT_SPLIT  # a saved Dataset is one split, whatever it is called
    _check_field(str(path), ds.column_names, text_field)
    try:  # datasets' hash of the saved data, as save_to_disk recorded it
        fingerprint = json.loads(state.read_text(encoding="utf-8"))["_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: no _fingerprint in a saved dataset's state ({_first_line(e)})") from None
    ds = ds.select_columns([text_field])
    rows = len(ds)
    if streaming:
        ds = ds.to_iterable_dataset()
    return DatasetInput(str(path.resolve()), None, split, streaming, None, fingerprint, rows, ds)


def _builder(name: str, config: str | None, split: str | None, streaming: bool, text_field: str) -> DatasetInput:
    datasets = _datasets()
    where = PREFIX + name
    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as e:  # not found, offline and not cached, several configs and none chosen, ...
        offline = (f"; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), only a dataset loaded once before is read, "
                   f"from the cache {datasets.config.HF_DATASETS_CACHE}" if datasets.config.HF_HUB_OFFLINE else "")
        raise DataError(f"{where}: cannot load the dataset ({_first_line(e)}){offline}") from None
    splits = list(builder.info.splits) if builder.info.splits else None
    split = _choose_split(where, split, splits)
    try:
        if streaming:
            ds = builder.as_streaming_dataset(split=split)
        else:
            builder.download_and_prepare()
            ds = builder.as_dataset(split=split)
    except Exception as e:
        raise DataError(f"{where}: cannot read split {split!r} ({_first_line(e)})") from None
    _check_field(where, ds.column_names, text_field)
    info = builder.info.splits.get(split) if builder.info.splits else None
    rows = len(ds) if not streaming else (info.num_examples if info and info.num_examples else None)
    config_name = builder.config.name
    return DatasetInput(name, config_name, split, streaming, str(builder.hash) if builder.hash else None, None,
                        rows, ds.select_columns([text_field]))


def open_dataset(spec: str | Path, config: str | None, split: str | None, streaming: bool,
                 text_field: str) -> DatasetInput:
    """The dataset a prepare input names (see the module docstring), opened at one split."""
    name = str(spec)[len(PREFIX):] if str(spec).startswith(PREFIX) else str(spec)
    if not name:
        raise DataError(f"{spec}: name a dataset after {PREFIX} (a hub id such as HuggingFaceFW/fineweb-edu, or a "
                        "directory written by save_to_disk)")
    path = Path(name).expanduser()
    if is_saved_dataset(path):
        return _saved(path, config, split, streaming, text_field)
    return _builder(name, config, split, streaming, text_field)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
