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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..checkpoint import check_writable
from ..config import ConfigError, check_fields, opt
from ..errors import DataError
from ..runs.metrics import human
from ..tokenizer import TOKENIZER_CONFIG, HFTokenizer, Tokenizer, get_tokenizer
from . import sources
from .config import MANIFEST, SHARDS_FORMAT, SHARDS_VERSION, STATE
from .shards import (
    TOKENIZER_FILE,
    OpenShards,
    PrepareState,
    Stats,
    _atomic_write,
    damaged_shards,
    made_by_prepare,
    read_manifest,
)
from .sources import (
    DEFAULT_INCLUDE,
    DatasetInput,
    Item,
    _size,
    file_kind,
    find_inputs,
    is_dataset,
    open_dataset,
    read_items,
)
from .workers import BAD, EMPTY, OK, Job, classify_task, encode_task, run, start_pool, tasks


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
    val_fraction: float = opt(0.01, "Share of the documents held out for validation (chosen by a seeded hash).",
                                    low=0, high=1, below=True)
    val_docs: int | None = opt(None, "Hold out exactly this many documents instead (a first pass counts them).",
                                     low=0, says='0 or more')
    seed: int = opt(1234, "Seed of the train/val choice: the same seed and input give the same split.")
    shard_tokens: int = opt(100_000_000, "Tokens per shard (a shard ends at the first piece after this many).",
                                         low=1, says='positive')
    dtype: str = opt("auto", "Token dtype: auto (uint16 when the vocabulary fits, else uint32), uint16, uint32.",
                     choices=("auto", "uint16", "uint32"))
    workers: int = opt(0, "Processes that tokenize (plus the one that reads and writes); 0 = all cores.",
                          low=0, says='0 (all cores) or more')
    skip_bad_lines: bool = opt(False, "Skip JSON lines that do not parse or lack the text field (counted) "
                                      "instead of stopping.")
    overwrite: bool = opt(False, "Replace data prepared from other inputs or settings in DATA_DIR.")
    progress: bool = opt(True, "Show the progress bar.")

    def __post_init__(self) -> None:
        check_fields(self)

    def include_patterns(self) -> tuple[str, ...]:
        if not self.include:
            return DEFAULT_INCLUDE
        return tuple(p.strip() for p in self.include.split(",") if p.strip())


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def in_val(doc: int, seed: int, val_fraction: float) -> bool:
    """Whether document number `doc` is held out: a seeded hash of its number below val_fraction."""
    return _splitmix64(_splitmix64(seed) ^ doc) < val_fraction * 2.0**64


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
    settings.update(tokenizer=tokenizer.name, dtype=dtype, text_chunk=sources.TEXT_CHUNK, version=SHARDS_VERSION)
    return {"inputs": inputs, "settings": settings}


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


def _existing(out: Path, fp: dict, dtype: str, cfg: PrepareConfig, log) -> tuple[dict | None, PrepareState | None]:
    """What `out` holds: (its manifest, None) when it is this very data, finished and intact; (None, the saved
    state) for an interrupted prepare of it to resume; (None, None) to start afresh, after removing what an
    earlier prepare left there: data damaged since (with a warning), or with --overwrite, data from other inputs
    or settings, or that cannot be read."""
    for name in (MANIFEST, STATE):
        path = out / name
        if not path.is_file():
            continue
        try:
            state = None if name == MANIFEST else PrepareState.read(path)
            saved = read_manifest(out) if state is None else state.to_json()
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
        return None, state
    if out.is_dir():
        _clean_dir(out)
    return None, None


def _open_inputs(inputs: Sequence[str | Path], out: Path, cfg: PrepareConfig) -> tuple[list, list]:
    """The inputs as (files, their kinds): files found in the inputs, or the one Hugging Face dataset given
    (a DatasetInput, kind "dataset"); --config, --split and --streaming are refused for files."""
    if any(is_dataset(i) for i in inputs):
        if len(inputs) > 1:
            name = next(str(i) for i in inputs if is_dataset(i))
            raise DataError(f"{name}: a Hugging Face dataset is prepared on its own; give it as the only input "
                            "(prepare the other inputs into another --out)")
        check_out(out, made_by_prepare, "gptforge prepare", probe=False)  # before a hub dataset is downloaded
        ds = open_dataset(inputs[0], cfg.config, cfg.split, cfg.streaming, cfg.text_field)
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
    state = state or PrepareState(fp)
    stats = state.stats
    tok_spec = ("hf", tokenizer.json) if isinstance(tokenizer, HFTokenizer) else ("gpt2", "")
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    job, pool = Job(tok_spec, dtype, cfg.text_field), start_pool(workers)
    try:
        if cfg.val_docs is not None and state.val_set is None:
            state.val_set = _choose_val_docs(files, kinds, cfg, job, pool, workers, log)
        _write_shards(files, kinds, cfg, tokenizer, OpenShards(out, state, np.dtype(dtype)), stats, job, pool,
                      workers)
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
        "splits": state.splits,
        "stats": {**_input_stats(files), "empty_documents": stats.empty,
                  "bad_lines_skipped": stats.bad_lines, "invalid_utf8_replaced": stats.invalid_utf8},
        "fingerprint": fp,
    }
    _atomic_write(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    _report(manifest, stats, out, cfg, log)
    return manifest


def _write_shards(files: list[Path], kinds: list, cfg: PrepareConfig, tokenizer: Tokenizer, shards: OpenShards,
                  stats: Stats, job: Job, pool, workers: int) -> None:
    """Tokenize the input from the saved position on into the shards, committing them whenever one is full."""
    state = shards.state
    val_set = set(state.val_set) if state.val_set is not None else None
    datasets = any(isinstance(f, DatasetInput) for f in files)
    skipped = state.position[1] if datasets else sum(_size(f) for f in files[: state.position[0]])
    bar = _Progress(cfg.progress, sum(_size(f) for f in files) or None, skipped, shards.tokens(),
                    unit="rows" if datasets else "B")
    position, open_doc = list(state.position), state.open_doc
    eot = np.array([tokenizer.eot_id], dtype=shards.dtype)
    items = read_items(files, kinds, cfg.text_field, tuple(position), on_bytes=bar.set_bytes)
    try:
        for metas, (tokens, lengths, statuses) in run(partial(encode_task, job), tasks(items, kinds), pool, workers):
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


def _choose_val_docs(files, kinds, cfg: PrepareConfig, job: Job, pool, workers: int, log) -> list[int]:
    """--val-docs N: count the documents (no tokenizing), then pick N of them with the seed."""
    log("counting documents for --val-docs ...")
    n = 0
    for metas, statuses in run(partial(classify_task, job), tasks(read_items(files, kinds, cfg.text_field), kinds),
                               pool, workers):
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
