"""Hugging Face datasets as an input of `gptforge prepare`, read through the `datasets` library (the extra `datasets`).

An input is a dataset when it is written ``hf:NAME``, or when it is a directory that
``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote (``state.json`` and
``dataset_info.json``, or ``dataset_dict.json``), with or without the prefix. NAME is then

- such a directory: ``datasets.load_from_disk`` (memory-mapped Arrow files);
- anything else (a hub id such as ``HuggingFaceFW/fineweb-edu``, a local directory of data files):
  ``datasets.load_dataset_builder(NAME, --config)``, which resolves a hub id on the hub, or from the
  local cache (``HF_DATASETS_CACHE``; ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` never ask the hub),
  then the builder's Arrow cache (prepared once) or, with ``--streaming``, its files read as a stream.

``--streaming`` reads an ``IterableDataset`` row by row: nothing but the rows in flight is held,
whatever the dataset's size. Either way the records arrive in the dataset's order, one row one
document (its ``--text-field`` column), and a resumed prepare starts at a row number (``skip``).

``DatasetInput.fingerprint`` is what prepare's fingerprint holds for it: the dataset, config,
split, the builder's hash (for a hub dataset: the commit the cache or hub resolved to) and the
datasets fingerprint of a saved dataset, so a re-run on the same data is a no-op and data from
another revision is refused (or, with --overwrite, prepared anew). Streamed or not, it is the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataError

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


__all__ = ["PREFIX", "DatasetInput", "is_dataset", "is_saved_dataset", "open_dataset"]
