"""The worker side of `gptforge prepare`: records -> text -> token ids, in a pool of processes.

The main process groups records into tasks of about a megabyte (`tasks`) and hands them to the pool (`run`, at most
2 x workers + 2 in flight, results in input order). Each task carries its `Job` (the tokenizer's spec, the token dtype,
the text field): small and immutable, it travels with the task, and a worker builds the tokenizer it names once
(`job_tokenizer`, cached per process), so no state is set up in the worker beforehand.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..tokenizer import HFTokenizer, Tokenizer, get_tokenizer
from .sources import Item

TASK_BYTES = 1 << 20  # input bytes per task handed to a worker
TASK_RECORDS = 4096
OK, EMPTY, BAD = 0, 1, 2  # status of one record after a worker has looked at it


@dataclass(frozen=True)
class Job:
    """What every task of one prepare run needs: the tokenizer (("gpt2", "") or ("hf", its JSON)), the token dtype
    and the field of a record that holds the text."""

    tokenizer: tuple[str, str]
    dtype: str
    text_field: str


@functools.lru_cache(maxsize=2)
def job_tokenizer(spec: tuple[str, str]) -> Tokenizer:
    """The tokenizer a Job names, built once per process."""
    kind, value = spec
    return get_tokenizer("gpt2") if kind == "gpt2" else HFTokenizer(value)


def _init_worker(main_pid: int) -> None:
    """A worker process of the pool (main_pid: the process it works for)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _die_with(main_pid)


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


def record_text(kind: str, payload, first: bool, last: bool, text_field: str) -> tuple[int, str, int, int]:
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


def encode_task(job: Job, kind: str, payloads: list) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Tokenize a task: (tokens of all OK records, concatenated; per-record token counts; statuses;
    per-record (invalid UTF-8 count, first offset) or None, and error messages)."""
    tok, dtype, text_field = job_tokenizer(job.tokenizer), np.dtype(job.dtype), job.text_field
    encode = getattr(tok, "encode_array", None)
    arrays, lengths, statuses = [], np.zeros(len(payloads), dtype=np.int64), []
    for i, (payload, first, last) in enumerate(payloads):
        status, text, bad, at = record_text(kind, payload, first, last, text_field)
        statuses.append((status, text if status == BAD else None, bad, at))
        if status == OK:
            ids = encode(text) if encode else np.asarray(tok.encode(text), dtype=np.uint32)
            arrays.append(ids)
            lengths[i] = len(ids)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)
    if dtype == np.uint16 and len(tokens) and int(tokens.max()) >= 1 << 16:
        raise DataError(f"the tokenizer gave id {int(tokens.max())}, too large for uint16; use --dtype uint32")
    return tokens.astype(dtype, copy=False), lengths, statuses


def classify_task(job: Job, kind: str, payloads: list) -> list:
    """encode_task without tokenizing: the statuses only (the counting pass of --val-docs)."""
    return [record_text(kind, p, first, last, job.text_field)[0:1] + (None, 0, -1) for p, first, last in payloads]


def tasks(items: Iterator[tuple[Item, bytes | str | None]], kinds) -> Iterator[tuple[str, list[Item], list]]:
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


def run(fn, tasks, pool: ProcessPoolExecutor | None, workers: int):
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


def start_pool(workers: int) -> ProcessPoolExecutor | None:
    """The pool of `workers` processes; None for one worker (the main process does the work itself)."""
    if workers == 1:
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
