"""The files model weights come in, read without holding them: safetensors, torch and TensorFlow.

Each reader knows its tensors' names and shapes (``shapes``) without reading them, reads a few at a
time (``read(keys)``), and names the file its errors are about (``where``). Also here: the package's
error class and the helpers that read a source's JSON config.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import WeightsError


class ShardedCheckpointReader:
    """The model parameters of a sharded checkpoint (torch.distributed.checkpoint's files, written by any number
    of processes), read a few tensors at a time in one process: no process group, no GPU, never the optimizer.
    `rows` crops a parameter stored with more rows (a padded vocabulary) to the rows the model's state dict has."""

    PREFIX = "model."

    def __init__(self, path: Path, rows: dict[str, int] | None = None):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.where, self.rows, self.metadata = Path(path), rows or {}, {}
        try:
            items = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as e:  # a missing or damaged .metadata: pickle, OS or format errors
            raise WeightsError(f"{path}: not a readable sharded checkpoint ({e})") from None
        self.stored = {k[len(self.PREFIX):]: v for k, v in items.items()
                       if k.startswith(self.PREFIX) and isinstance(v, TensorStorageMetadata)}
        self.shapes = {k: (self.rows.get(k, v.size[0]), *v.size[1:]) if len(v.size) else tuple(v.size)
                       for k, v in self.stored.items()}

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

        keys = list(keys)
        state = {self.PREFIX + k: torch.empty(tuple(self.stored[k].size), dtype=self.stored[k].properties.dtype)
                 for k in keys}
        dcp.load(state, storage_reader=FileSystemReader(str(self.where)),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        return {k: state[self.PREFIX + k][: self.shapes[k][0]] if k in self.rows else state[self.PREFIX + k]
                for k in keys}


class SafetensorsReader:
    """One safetensors file, or the shards named by a ``model.safetensors.index.json``."""

    def __init__(self, files: dict[str, Path], where: Path):
        self.where = where  # the file errors name (the index for sharded weights)
        self.file_of = files  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] = {}
        for path in sorted(set(files.values())):
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.metadata.update(f.metadata() or {})
                    for k in f.keys():
                        self.shapes[k] = tuple(f.get_slice(k).get_shape())
            except Exception as e:  # safetensors reports bad headers as several error types
                raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None

    @classmethod
    def single(cls, path: Path) -> SafetensorsReader:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        return cls({k: path for k in keys}, path)

    @classmethod
    def sharded(cls, index: Path) -> SafetensorsReader:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{index}: not a safetensors shard index ({e})") from None
        files = {k: index.parent / name for k, name in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise WeightsError(f"{index}: names the shard {path.name}, which is missing")
        return cls(files, index)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        # Opening the file per group and closing it again unmaps the pages already copied.
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in names})
        return out


class TorchReader:
    """A ``torch.save`` file of tensors (``pytorch_model.bin``, the book's ``model.pth``), memory-mapped."""

    def __init__(self, path: Path):
        self.where = path
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format cannot be mapped
        except Exception as e:  # torch reports bad files as several error types
            why = first_line(e)
            if "Weights only load failed" in why:
                why = "it is not a PyTorch file, or it holds objects other than tensors"
            raise WeightsError(f"{path}: not a readable PyTorch file ({why})") from None
        self.extras: dict = {}  # what a file holds beside a nested state dict (nanoGPT's model_args, config, ...)
        for key in ("model_state_dict", "model"):  # the book's {"model_state_dict", "optimizer_state_dict"} files,
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):  # minimind's {"model", "optimizer", ...},
                self.extras = {k: v for k, v in obj.items() if k != key}  # nanoGPT's {"model", "model_args", ...}
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: holds no state dict (a dict of tensors, or one under 'model_state_dict' "
                               "or 'model')")
        # torch.compile'd models save their keys with an '_orig_mod.' prefix
        self.tensors = {k.replace("_orig_mod.", ""): v for k, v in obj.items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in keys}


class TFCheckpointReader:
    """A TensorFlow checkpoint (``PREFIX.index`` + ``PREFIX.data-*``), read without TensorFlow.

    The index is a LevelDB-style table: data blocks of prefix-compressed (key, value) entries, an
    index block pointing at them, and a 48-byte footer pointing at the index. Each value is a
    ``BundleEntryProto`` (dtype, shape, shard, offset, size); the key ``""`` holds the header.
    """

    DTYPES = {1: np.float32, 2: np.float64, 19: np.float16}  # TensorFlow's DataType enum
    MAGIC = 0xDB4775248B80FB57

    def __init__(self, prefix: Path):
        self.where = prefix.with_name(prefix.name + ".index")
        self.entries: dict[str, dict] = {}
        try:
            data = self.where.read_bytes()
        except OSError as e:
            raise WeightsError(f"{self.where}: cannot read ({e.strerror})") from None
        try:
            records = self._table_records(data)
        except (ValueError, IndexError, struct.error) as e:  # also WeightsError, a ValueError
            raise WeightsError(f"{self.where}: not a TensorFlow checkpoint index ({e})") from None
        num_shards = 1
        for key, value in records:
            fields_ = _proto_fields(value)
            if key == "":
                num_shards = fields_.get(1, [1])[0]
                continue
            if 7 in fields_:
                raise WeightsError(f"{self.where}: variable {key!r} is partitioned into slices, which is not supported")
            dims = [_proto_fields(d).get(1, [0])[0] for d in _proto_fields(fields_.get(2, [b""])[0]).get(2, [])]
            self.entries[key] = dict(dtype=fields_.get(1, [0])[0], shape=tuple(dims), shard=fields_.get(3, [0])[0],
                                     offset=fields_.get(4, [0])[0], size=fields_.get(5, [0])[0])
        self.data_files = [prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{num_shards:05d}")
                           for i in range(num_shards)]
        self.shapes = {k: e["shape"] for k, e in self.entries.items()}

    @classmethod
    def _table_records(cls, data: bytes) -> list[tuple[str, bytes]]:
        footer = data[-48:]
        if len(data) < 48 or struct.unpack("<Q", footer[40:])[0] != cls.MAGIC:
            raise WeightsError("no table footer")
        pos = 0
        _meta_off, pos = _varint(footer, pos)
        _meta_size, pos = _varint(footer, pos)
        index_off, pos = _varint(footer, pos)
        index_size, pos = _varint(footer, pos)
        records = []
        for _, handle in cls._block(data, index_off, index_size):
            off, p = _varint(handle, 0)
            size, _ = _varint(handle, p)
            records += [(k.decode(), v) for k, v in cls._block(data, off, size)]
        return records

    @staticmethod
    def _block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
        if data[offset + size] != 0:  # the trailer's compression byte; TensorFlow writes bundles uncompressed
            raise WeightsError(f"compressed block (type {data[offset + size]})")
        block = data[offset:offset + size]
        (num_restarts,) = struct.unpack("<I", block[-4:])
        end = len(block) - 4 - 4 * num_restarts
        out, key, pos = [], b"", 0
        while pos < end:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            out.append((key, block[pos:pos + value_len]))
            pos += value_len
        return out

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            e = self.entries[k]
            if e["dtype"] not in self.DTYPES:
                raise WeightsError(f"{self.where}: variable {k!r} has TensorFlow dtype {e['dtype']}, not a float type")
            path = self.data_files[e["shard"]]
            dtype = np.dtype(self.DTYPES[e["dtype"]])
            count = int(np.prod(e["shape"], dtype=np.int64))
            if count * dtype.itemsize != e["size"]:
                raise WeightsError(f"{self.where}: variable {k!r} has {e['size']} bytes for shape {e['shape']}")
            have = path.stat().st_size if path.is_file() else 0
            if e["offset"] + e["size"] > have:
                raise WeightsError(f"{path}: variable {k!r} needs bytes {e['offset']}..{e['offset'] + e['size']}, "
                                   f"the file has {have}: a missing or partial data file")
            array = np.fromfile(path, dtype=dtype, count=count, offset=e["offset"]).reshape(e["shape"])
            out[k] = torch.from_numpy(array)
        return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Protocol-buffer wire format -> {field number: [values]} (ints, or bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack("<I", buf[pos:pos + 4])[0], pos + 4
        elif wire == 1:
            value, pos = struct.unpack("<Q", buf[pos:pos + 8])[0], pos + 8
        else:
            raise WeightsError(f"not a TensorFlow checkpoint: unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


Reader = SafetensorsReader | TorchReader | TFCheckpointReader


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_json(path: Path) -> dict:
    """A JSON object from a source's config file (config.json, hparams.json), or one line saying why not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return value


def positive_int(conf: dict, key: str, path: Path) -> int:
    """conf[key], a positive whole number, or one line naming the file, the key and what it holds."""
    value = conf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise WeightsError(f"{path}: {key} must be a positive integer, found {value!r}")
    return value
