"""Model weights in every format gptforge reads, and out to Hugging Face.

A model SOURCE is detected, never named:

- a Hugging Face model id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``org/name``):
  fetched into and read from ``huggingface_hub``'s cache, so it works offline once cached;
- a Hugging Face GPT-2 directory or weights file (``config.json`` + ``model.safetensors``, sharded
  safetensors or ``pytorch_model.bin``; ``Conv1D`` weights, i.e. ``(in, out)``);
- OpenAI's TensorFlow checkpoint directory (``hparams.json``, ``checkpoint``, ``model.ckpt.*``), read
  without TensorFlow: the ``.index`` file is a LevelDB-style table of ``BundleEntryProto`` records
  that locate each variable in ``model.ckpt.data-00000-of-00001``;
- a state dict of the book's ``GPTModel`` (``tok_emb``, ``trf_blocks.N.att.W_query``, ...), bare or
  under ``"model_state_dict"``, its shape inferred from the tensors;
- a gptforge run directory, checkpoint directory or ``model.safetensors`` file.

Every format becomes a *plan*: for each parameter of ``GPT``, the source tensors it is made from and
how (copied, transposed, concatenated). The plan is checked against the source's tensor shapes
before anything is read, so a wrong or partial file fails with one line naming the file, the
tensor and both shapes. The model is built on the meta device and its parameters are assigned one
transformer block at a time, each a fresh fp32 tensor, while the file is memory-mapped (safetensors,
torch) or read by offset (TensorFlow): the weights are never held twice.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file

from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .config import ConfigError
from .models import build, config_from_dict, get_spec, spec_for
from .models.gpt2 import GPT, GPTConfig
from .tokenizer import Tokenizer, _gpt2_data_files, tokenizer_from_metadata

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_SHARD_INDEX = "model.safetensors.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
LOCAL_PREFIXES = ("./", "../", "/", "~")  # a SOURCE written like this is a path here, never a hub id
HEAD_SIZE = 64  # every OpenAI GPT-2 size has 64-wide heads (768/12 ... 1600/25)
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")


class WeightsError(CheckpointError):
    """A model source that cannot be read; the message names the file, the tensor and the shapes."""


# ----------------------------------------------------------------------------- readers
# Each reader knows its tensors' names and shapes without reading them, and reads a few at a time.


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
            why = _first_line(e)
            if "Weights only load failed" in why:
                why = "it is not a PyTorch file, or it holds objects other than tensors"
            raise WeightsError(f"{path}: not a readable PyTorch file ({why})") from None
        if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
            obj = obj["model_state_dict"]  # the book's {"model_state_dict", "optimizer_state_dict"} files
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: holds no state dict (a dict of tensors, or one under 'model_state_dict')")
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
        except (ValueError, IndexError, struct.error) as e:
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
            raise ValueError("no table footer")
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
            raise ValueError(f"compressed block (type {data[offset + size]})")
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
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- plans
# A plan entry: our parameter, the source tensors it is made from, and how.
#   copy: as is   t: transpose (Conv1D -> Linear)   tf: drop the leading axis of 1, transpose
#   cat: concatenate q, k, v along the output axis (the book's separate W_query, W_key, W_value)


@dataclass
class Entry:
    ours: str
    src: tuple[str, ...]
    how: str = "copy"


@dataclass
class Source:
    """A detected model source: its format, model config, tensors, and how they map onto GPT."""

    format: str
    cfg: GPTConfig
    reader: SafetensorsReader | TorchReader | TFCheckpointReader
    plan: list[Entry]
    ignored: set[str] = field(default_factory=set)  # source tensors that are not weights
    meta: dict = field(default_factory=dict)


def _block_of(name: str) -> int:
    m = re.match(r"h\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _our_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_weights:
        shapes.pop("lm_head.weight")
    return shapes


def _expected(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    if entry.how == "t":
        return shape[::-1]
    if entry.how == "tf":
        return (1, *shape[::-1])
    if entry.how == "cat":
        return (shape[0] // len(entry.src), *shape[1:])
    return shape


def _plan_hf(cfg: GPTConfig, prefix: str) -> list[Entry]:
    """Hugging Face names are ours (the family's spec says which weights are stored transposed)."""
    transposed = spec_for(cfg).hf_transposed
    plan = []
    for ours in _our_shapes(cfg):
        src = ours if ours == "lm_head.weight" else prefix + ours
        plan.append(Entry(ours, (src,), "t" if ours.endswith(transposed) else "copy"))
    return plan


def _plan_tf(cfg: GPTConfig) -> list[Entry]:
    names = {"weight": "g", "bias": "b"}
    plan = []
    for ours in _our_shapes(cfg):
        parts = ours.split(".")
        if parts[0] in ("wte", "wpe"):
            plan.append(Entry(ours, (f"model/{parts[0]}",)))
        elif parts[0] == "ln_f":
            plan.append(Entry(ours, (f"model/ln_f/{names[parts[1]]}",)))
        elif parts[2] in ("ln_1", "ln_2"):
            plan.append(Entry(ours, (f"model/h{parts[1]}/{parts[2]}/{names[parts[3]]}",)))
        else:  # h.i.attn.c_attn.weight -> model/hi/attn/c_attn/w
            kind = "w" if parts[4] == "weight" else "b"
            name = f"model/h{parts[1]}/{parts[2]}/{parts[3]}/{kind}"
            plan.append(Entry(ours, (name,), "tf" if kind == "w" else "copy"))
    return plan


BOOK_NAMES = {
    "wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.scale",
    "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight",
}
BOOK_BLOCK_NAMES = {
    "ln_1.weight": "norm1.scale", "ln_1.bias": "norm1.shift", "ln_2.weight": "norm2.scale", "ln_2.bias": "norm2.shift",
    "attn.c_proj.weight": "att.out_proj.weight", "attn.c_proj.bias": "att.out_proj.bias",
    "mlp.c_fc.weight": "ff.layers.0.weight", "mlp.c_fc.bias": "ff.layers.0.bias",
    "mlp.c_proj.weight": "ff.layers.2.weight", "mlp.c_proj.bias": "ff.layers.2.bias",
}


def _plan_book(cfg: GPTConfig) -> list[Entry]:
    plan = []
    for ours in _our_shapes(cfg):
        i = _block_of(ours)
        if i < 0:
            plan.append(Entry(ours, (BOOK_NAMES[ours],)))
            continue
        rest = ours.split(".", 2)[2]
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            qkv = tuple(f"trf_blocks.{i}.att.W_{p}.{kind}" for p in ("query", "key", "value"))
            plan.append(Entry(ours, qkv, "cat"))
        else:
            plan.append(Entry(ours, (f"trf_blocks.{i}.{BOOK_BLOCK_NAMES[rest]}",)))
    return plan


# ----------------------------------------------------------------------------- detection


def open_source(source: str | Path, n_heads: int | None = None) -> Source:
    """Detect what SOURCE is and read its config and tensor shapes (not its weights)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "hparams.json").is_file() or (p / "checkpoint").is_file() or any(p.glob("*.ckpt.index")):
            return _tf_source(p)
        if (p / "config.json").is_file():
            return _hf_source(p)
        if (p / ckpt.WEIGHTS).is_file() or (p / ckpt.CHECKPOINTS).is_dir():
            return _gptforge_source(p)
        if str(source) not in HUB_NAMES:  # ./gpt2/ (where the book's downloads live) still means the hub's gpt2
            raise WeightsError(f"{p}: a directory without checkpoints or model weights (no {ckpt.CHECKPOINTS}/, "
                               f"{ckpt.WEIGHTS}, config.json or TensorFlow checkpoint); give a run directory, a "
                               "checkpoint, a weights file or a Hugging Face model id")
    if p.is_file():
        if p.name.endswith(".index") or ".ckpt." in p.name:
            return _tf_source(p.parent)
        if p.name == "config.json":
            return _hf_source(p.parent)
        if p.suffix not in TORCH_SUFFIXES:  # safetensors, whatever the name
            reader = SafetensorsReader.single(p)
            if reader.metadata.get("format") == "gptforge":
                return _gptforge_source(p)
            return _hf_source(p.parent, weights=p)
        reader = TorchReader(p)
        if "tok_emb.weight" in reader.shapes:
            return _book_source(p, reader, n_heads)
        if any(k.endswith("wte.weight") for k in reader.shapes):
            return _hf_source(p.parent, weights=p, reader=reader)
        raise WeightsError(f"{p}: a state dict of neither the book's GPTModel (no tok_emb.weight) nor GPT-2 "
                           "(no transformer.wte.weight)")
    name = str(source)
    if name.startswith(LOCAL_PREFIXES):
        raise WeightsError(f"{source}: no such file or directory")
    if "/" in name and p.parent.is_dir():  # runs/x where runs/ is here: a mistyped run, never a hub lookup
        raise WeightsError(f"{source}: no such file or directory ({p.parent} is a local directory, so {source} "
                           "is not looked up on the Hugging Face hub)")
    if _looks_like_hub_id(name):
        return _hf_source(_hub_snapshot(name), hub_id=name)
    raise WeightsError(f"{source}: no such file or directory (nor a Hugging Face model id such as gpt2)")


def _looks_like_hub_id(name: str) -> bool:
    return name in HUB_NAMES or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot directory of a hub model (config.json + weights), downloading what is missing."""
    def fail_offline(name: str) -> WeightsError:
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub could not be reached"
        return WeightsError(f"{repo_id}: no such local path, and as a Hugging Face model id its {name} is not in the "
                            f"cache ({constants.HF_HUB_CACHE}) and {why}; download it once with network access, "
                            "or pass a local directory")

    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
        not_cached = False
        for name in HF_WEIGHTS:
            try:
                hf_hub_download(repo_id, name)
                return config.parent
            except LocalEntryNotFoundError:
                not_cached = True
            except EntryNotFoundError:
                continue
        if not_cached:
            raise fail_offline(" or ".join(HF_WEIGHTS))
        raise WeightsError(f"{repo_id}: the model repository has neither {' nor '.join(HF_WEIGHTS)}")
    except LocalEntryNotFoundError:
        raise fail_offline("config.json") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{repo_id}: no such local path, and fetching it from the Hugging Face hub failed: "
                           f"{_first_line(e)}") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return value


def _need(conf: dict, key: str, path: Path) -> int:
    value = conf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise WeightsError(f"{path}: {key} must be a positive integer, found {value!r}")
    return value


def _hf_config(conf: dict, path: Path) -> GPTConfig:
    """A Hugging Face GPT2Config -> GPTConfig, refusing what gptforge's model cannot compute."""
    model_type = get_spec("gpt2").hf_model_type
    if conf.get("model_type", model_type) != model_type:
        raise WeightsError(f"{path}: model_type is {conf['model_type']!r}; only GPT-2 models (gpt2) can be loaded")
    n_embd = _need(conf, "n_embd", path)
    unsupported = {
        "activation_function": (conf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "GELU with the tanh approximation (gelu_new)"),
        "layer_norm_epsilon": (abs(conf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-05"),
        "n_inner": (conf.get("n_inner") in (None, 4 * n_embd), f"null or {4 * n_embd} (4 x n_embd)"),
        "scale_attn_weights": (conf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (not conf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        "add_cross_attention": (not conf.get("add_cross_attention", False), "false"),
    }
    for key, (ok, wanted) in unsupported.items():
        if not ok:
            raise WeightsError(f"{path}: {key} is {conf[key]!r}; gptforge's GPT-2 supports only {wanted}")
    try:
        return GPTConfig(vocab_size=_need(conf, "vocab_size", path), context_length=_need(conf, "n_positions", path),
                         emb_dim=n_embd, n_heads=_need(conf, "n_head", path), n_layers=_need(conf, "n_layer", path),
                         drop_rate=float(conf.get("resid_pdrop", 0.1)), qkv_bias=True,
                         tie_weights=bool(conf.get("tie_word_embeddings", True)))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def _hf_source(d: Path, weights: Path | None = None, reader=None, hub_id: str | None = None) -> Source:
    config_path = d / "config.json"
    where = weights or d
    if not config_path.is_file():
        raise WeightsError(f"{where}: Hugging Face weights need a config.json beside them, and there is none")
    conf = _read_json(config_path)
    cfg = _hf_config(conf, config_path)
    if reader is None:
        if weights is None:
            weights = next((d / n for n in (*HF_WEIGHTS, HF_SHARD_INDEX) if (d / n).is_file()), None)
            if weights is None:
                raise WeightsError(f"{d}: has config.json but no weights ({', '.join((*HF_WEIGHTS, HF_SHARD_INDEX))})")
        if weights.name == HF_SHARD_INDEX:
            reader = SafetensorsReader.sharded(weights)
        elif weights.suffix == ".safetensors":
            reader = SafetensorsReader.single(weights)
        else:
            reader = TorchReader(weights)
    hf_prefix = spec_for(cfg).hf_prefix
    prefix = hf_prefix if any(k.startswith(hf_prefix) for k in reader.shapes) else ""
    saved = getattr(reader, "metadata", {}).get("gptforge_model")
    if saved:  # written by to_hf: restore what GPT2Config cannot say (no qkv bias, drop rate)
        try:
            mine = GPTConfig.from_dict(json.loads(saved))
        except ValueError as e:
            raise WeightsError(f"{reader.where}: bad gptforge_model metadata ({e})") from None
        if all(getattr(mine, k) == getattr(cfg, k) for k in SHAPE_KEYS if k != "qkv_bias"):
            cfg = replace(cfg, qkv_bias=mine.qkv_bias, drop_rate=mine.drop_rate)
    plan = _plan_hf(cfg, prefix)
    if not cfg.qkv_bias:  # to_hf stores zeros there; a model trained since then has grown a bias
        bias_keys = [f"{prefix}h.{i}.attn.c_attn.bias" for i in range(cfg.n_layers)]
        present = [k for k in bias_keys if k in reader.shapes]
        if any(bool(t.any()) for t in reader.read(present).values()):
            cfg = replace(cfg, qkv_bias=True)
            plan = _plan_hf(cfg, prefix)
    ignored = {k for k in reader.shapes if k.endswith((".attn.bias", ".attn.masked_bias"))}
    if not cfg.qkv_bias:
        ignored |= {f"{prefix}h.{i}.attn.c_attn.bias" for i in range(cfg.n_layers)}
    if cfg.tie_weights:
        ignored.add("lm_head.weight")
    meta = {"format": "hub" if hub_id else "hf", "source": hub_id or str(where), "tokenizer": "gpt2"}
    return Source("hf", cfg, reader, plan, ignored, meta)


def _tf_source(d: Path) -> Source:
    hparams_path = d / "hparams.json"
    if not hparams_path.is_file():
        raise WeightsError(f"{d}: a TensorFlow GPT-2 checkpoint needs hparams.json (n_vocab, n_ctx, n_embd, "
                           "n_head, n_layer), and there is none")
    hp = _read_json(hparams_path)
    try:
        cfg = GPTConfig(vocab_size=_need(hp, "n_vocab", hparams_path), context_length=_need(hp, "n_ctx", hparams_path),
                        emb_dim=_need(hp, "n_embd", hparams_path), n_heads=_need(hp, "n_head", hparams_path),
                        n_layers=_need(hp, "n_layer", hparams_path), qkv_bias=True, tie_weights=True)
    except ValueError as e:
        raise WeightsError(f"{hparams_path}: {e}") from None
    prefix = d / "model.ckpt"
    state = d / "checkpoint"
    if state.is_file():  # model_checkpoint_path: "model.ckpt"; only the name counts (the directory may have moved)
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(), re.MULTILINE)
        if m:
            prefix = d / Path(m.group(1)).name
    else:
        indexes = sorted(d.glob("*.index"))
        if len(indexes) == 1:
            prefix = indexes[0].with_suffix("")
    if not prefix.with_name(prefix.name + ".index").is_file():
        raise WeightsError(f"{d}: no {prefix.name}.index; the TensorFlow checkpoint is incomplete")
    reader = TFCheckpointReader(prefix)
    return Source("tf", cfg, reader, _plan_tf(cfg), set(), {"format": "tf", "source": str(d), "tokenizer": "gpt2"})


def _book_source(path: Path, reader: TorchReader, n_heads: int | None) -> Source:
    shapes = reader.shapes
    vocab, emb = shapes["tok_emb.weight"]
    if "pos_emb.weight" not in shapes:
        raise WeightsError(f"{path}: tensor 'pos_emb.weight' is missing: a partial GPTModel state dict")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    if n_heads is None:
        if emb % HEAD_SIZE:
            raise WeightsError(f"{path}: the number of attention heads is not stored in a state dict, and "
                               f"emb_dim {emb} is not a multiple of GPT-2's head size {HEAD_SIZE}; give n_heads "
                               "(gptforge convert ... --n-heads N)")
        n_heads = emb // HEAD_SIZE
    try:
        cfg = GPTConfig(vocab_size=vocab, context_length=shapes["pos_emb.weight"][0], emb_dim=emb, n_heads=n_heads,
                        n_layers=max(blocks, default=-1) + 1, qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
                        tie_weights=False)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    ignored = {k for k in shapes if k.endswith(".att.mask")}
    meta = {"format": "book", "source": str(path), "tokenizer": "gpt2", "n_heads": str(n_heads)}
    return Source("book", cfg, reader, _plan_book(cfg), ignored, meta)


def _gptforge_source(p: Path) -> Source:
    path = ckpt.resolve_weights(p)
    meta = ckpt.read_weights_meta(path)
    try:
        cfg = config_from_dict(json.loads(meta["model"]), meta.get("arch"))  # no arch: written before families
    except ValueError as e:
        raise WeightsError(f"{path}: bad model config in the metadata ({e})") from None
    plan = [Entry(k, (k,)) for k in _our_shapes(cfg)]
    return Source("gptforge", cfg, SafetensorsReader.single(path), plan, set(), dict(meta))


# ----------------------------------------------------------------------------- loading


def check_source(src: Source) -> None:
    """Every tensor the plan needs is there with the right shape, and nothing else is: or one line saying which."""
    shapes = _our_shapes(src.cfg)
    where = src.reader.where
    needed: dict[str, tuple[int, ...]] = {}
    for e in src.plan:
        for s in e.src:
            needed[s] = _expected(e, shapes[e.ours])
    missing = [k for k in needed if k not in src.reader.shapes]
    if missing:
        k = missing[0]
        raise WeightsError(f"{where}: tensor {k!r} is missing (expected shape {needed[k]}); {len(missing)} of "
                           f"{len(needed)} tensors are missing: a partial or different model?")
    for k, shape in needed.items():
        if src.reader.shapes[k] != shape:
            raise WeightsError(f"{where}: tensor {k!r} has shape {src.reader.shapes[k]}, expected {shape} "
                               f"({_describe(src.cfg)})")
    extra = sorted(set(src.reader.shapes) - set(needed) - src.ignored)
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]!r} of shape {src.reader.shapes[extra[0]]} "
                           f"({len(extra)} in all): not part of a GPT-2 model with {_describe(src.cfg)}")


def _describe(cfg: GPTConfig) -> str:
    return (f"vocab_size {cfg.vocab_size}, context_length {cfg.context_length}, emb_dim {cfg.emb_dim}, "
            f"n_layers {cfg.n_layers}, qkv_bias {cfg.qkv_bias}, tie_weights {cfg.tie_weights}")


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor with t's values: nothing of the source file stays referenced."""
    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t)
    return out


def _convert(how: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if how == "cat":
        return _fresh(torch.cat(tensors, dim=0))  # (3C, C) from three (C, C)
    t = tensors[0]
    if how == "t":
        t = t.t()  # Conv1D (in, out) -> Linear (out, in)
    elif how == "tf":
        t = t[0].t()  # (1, in, out) -> (out, in)
    return _fresh(t)


def build_model(src: Source, context_length: int | None = None, drop_rate: float | None = None) -> GPT:
    """The GPT a checked source describes, its weights read block by block into a meta-device model.

    context_length below the source's crops the position embeddings (the first positions are kept).
    """
    check_source(src)
    cfg = src.cfg
    if context_length is not None:
        if not 0 < context_length <= cfg.context_length:
            raise ConfigError(f"context_length {context_length} must be between 1 and the model's "
                              f"{cfg.context_length}")
        cfg = replace(cfg, context_length=context_length)
    if drop_rate is not None:
        cfg = replace(cfg, drop_rate=drop_rate)
    with torch.device("meta"):
        model = build(cfg)
    groups: dict[int, list[Entry]] = {}
    for e in src.plan:
        groups.setdefault(_block_of(e.ours), []).append(e)
    for _, entries in sorted(groups.items()):
        tensors = src.reader.read([s for e in entries for s in e.src])
        sd = {e.ours: _convert(e.how, [tensors[s] for s in e.src]) for e in entries}
        del tensors
        if "wpe.weight" in sd:
            sd["wpe.weight"] = sd["wpe.weight"][:cfg.context_length].clone()
        model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_weights:
        model.lm_head.weight = model.wte.weight
    assert not any(p.is_meta for p in model.parameters()), "a parameter was not loaded"
    return model


def load_any(source: str | Path, device: torch.device | str = "cpu", *, context_length: int | None = None,
             drop_rate: float | None = None, n_heads: int | None = None) -> tuple[GPT, dict]:
    """A GPT from any supported SOURCE (see the module docstring); returns (model, metadata).

    The metadata holds at least "format" (hub, hf, tf, book or gptforge) and "tokenizer".
    """
    src = open_source(source, n_heads=n_heads)
    model = build_model(src, context_length, drop_rate)
    return model.to(device), src.meta


def load_model(source: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A gptforge model from a run dir (its newest intact checkpoint), checkpoint dir or weights file;
    returns (model, the weights file's metadata). The one reader of gptforge weights files."""
    src = _gptforge_source(Path(source))
    return build_model(src).to(device), src.meta


def init_model_config(source: str, requested: dict) -> GPTConfig:
    """The model config for `train --init-from SOURCE`: the source's shape, with requested settings checked.

    Only context_length (at most the source's: position embeddings are cropped) and drop_rate may differ.
    """
    base = open_source(source).cfg
    for k in SHAPE_KEYS:
        if k in requested and requested[k] != getattr(base, k):
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"{flag} {requested[k]!r}: the model in {source} has {k} {getattr(base, k)!r}, and a run "
                              "initialised from it keeps its shape (only --context-length may shrink and "
                              "--drop-rate change)")
    ctx = requested.get("context_length", base.context_length)
    if not 0 < ctx <= base.context_length:
        raise ConfigError(f"--context-length {ctx}: must be between 1 and the {base.context_length} positions "
                          f"of the model in {source}")
    return replace(base, context_length=ctx, drop_rate=requested.get("drop_rate", base.drop_rate))


# ----------------------------------------------------------------------------- export


def hf_config(cfg: GPTConfig) -> dict:
    """The config.json of a transformers GPT2LMHeadModel with this shape."""
    spec = spec_for(cfg)
    return {
        "architectures": [spec.hf_architecture], "model_type": spec.hf_model_type, "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 50256, "eos_token_id": 50256, "dtype": "float32",
    }


def convert_target(out: str | Path, target: str) -> Path:
    """What `convert --to TARGET OUT` writes, checked before any model is read; refused unless nothing is overwritten.

    OUT must be a new or empty directory, so no file of the user's (nor a model converted there
    earlier) is replaced; for gptforge, OUT may instead be a new .safetensors file. Returns the
    directory (hf) or the weights file (gptforge).
    """
    out = Path(out)
    if target == "gptforge" and out.suffix == ".safetensors":
        if out.exists():
            raise WeightsError(f"OUT {out}: already exists; remove it or choose another OUT")
        ckpt.check_writable(out.parent, "OUT")
        return out
    ckpt.check_writable(out, "OUT")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        raise WeightsError(f"OUT {out}: not empty (holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                           "convert writes only into a new or empty directory, so that nothing is overwritten: "
                           "choose another OUT or empty this one")
    return out if target == "hf" else out / ckpt.WEIGHTS


def to_hf(model: GPT, out_dir: str | Path, tokenizer: str = "gpt2") -> Path:
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads.

    An untied head is kept (tie_word_embeddings false); a model without a q/k/v bias gets zero biases
    (GPT-2 always has them; the gptforge config in the file's metadata brings qkv_bias back on import).
    With the GPT-2 tokenizer, its vocab.json and merges.txt are written too.
    """
    out = convert_target(out_dir, "hf")
    cfg = model.cfg
    spec = spec_for(cfg)
    sd: dict[str, torch.Tensor] = {}
    for k, v in ckpt.model_state(model).items():
        v = v.detach().cpu()
        if k.endswith(spec.hf_transposed):
            v = v.t()  # Linear (out, in) -> Conv1D (in, out)
        sd[k if k == "lm_head.weight" else spec.hf_prefix + k] = v.contiguous()
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            sd[f"{spec.hf_prefix}h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "gptforge_model": json.dumps(cfg.to_dict()), "gptforge_tokenizer": tokenizer}
    save_file(sd, str(out / "model.safetensors"), metadata=meta)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    if tokenizer == "gpt2":
        _write_gpt2_tokenizer(out, cfg.context_length)
    return out


def _write_gpt2_tokenizer(out: Path, context_length: int) -> None:
    vocab_bpe, encoder_json = _gpt2_data_files()
    shutil.copyfile(encoder_json, out / "vocab.json")  # the same files under Hugging Face's names
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    eot = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "bos_token": eot,
        "eos_token": eot, "unk_token": eot, "add_prefix_space": False,
    }, indent=2) + "\n")


def to_gptforge(model: GPT, out: str | Path, tokenizer="gpt2", source: str | None = None) -> Path:
    """Write a gptforge weights file: OUT itself if it ends in .safetensors, else OUT/model.safetensors."""
    path = convert_target(out, "gptforge")
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(path, model, tokenizer, extra={"converted_from": source} if source else None)
    return path


def load_for_text(source: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """load_any's model with the tokenizer its metadata names or carries: (model, tokenizer, metadata).

    A model with fewer token ids than its tokenizer (e.g. a tiny test model) cannot read text: an error.
    """
    model, meta = load_any(source, device)
    tokenizer = tokenizer_from_metadata(meta)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{source}: the model has {model.cfg.vocab_size} token ids, fewer than its "
                          f"{meta.get('tokenizer', 'gpt2')} tokenizer's {tokenizer.vocab_size}; it cannot read or "
                          "write text")
    return model, tokenizer, meta


def convert(source: str | Path, target: str, out: str | Path, n_heads: int | None = None) -> tuple[Path, GPT, dict]:
    """`gptforge convert`: the model in source written to out as `target` (hf or gptforge), out checked before
    the model is read; a gptforge checkpoint carries the whole tokenizer. Returns (path written, model, metadata)."""
    convert_target(out, target)
    model, meta = load_any(source, n_heads=n_heads)
    if target == "hf":
        return to_hf(model, out, meta.get("tokenizer", "gpt2")), model, meta
    return to_gptforge(model, out, tokenizer_from_metadata(meta), source=str(source)), model, meta
