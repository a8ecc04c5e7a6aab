"""Model SOURCEs in every format gptforge reads: detection, the Hugging Face hub (its cache, one quick reachability
check before any download), checks, loading block by block, and the tokenizer a source carries."""

from __future__ import annotations

import importlib
import json
import re
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from .. import checkpoint as ckpt
from .. import perf
from ..config import ConfigError
from ..models import DEFAULT_ARCH, SPECS, build, config_from_dict, max_positions, spec_for
from ..runs.choose import resolve_weights
from ..tokenizer import (
    Tokenizer,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_metadata,
)
from . import gpt2
from .gpt2 import HUB_NAMES
from .plan import Entry, SavedMoments, Source, WeightFamily, expected, fill, our_shapes, saved_moments
from .readers import (
    SafetensorsReader,
    ShardedCheckpointReader,
    TorchReader,
    WeightsError,
    first_line,
    read_json,
)

# arch -> the module of its weight formats, as each family's ModelSpec names it (models.SPECS registers families)
FAMILIES: dict[str, WeightFamily] = {arch: importlib.import_module(spec.weights) for arch, spec in SPECS.items()
                                     if spec.weights}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # fetched with a hub model that has them
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json", ".csv", ".parquet", ".zst", ".gz")  # data, not models
NANOGPT_CKPT = "ckpt.pt"  # what nanoGPT's train.py writes into its out_dir
LOCAL_PREFIXES = ("./", "../", "/", "~")  # a SOURCE written like this is a path here, never a hub id



def _family(cfg: Any) -> WeightFamily:
    """The weight formats of cfg's model family."""
    arch = spec_for(cfg).arch
    if arch not in FAMILIES:
        raise WeightsError(f"the {arch} model family has no weight formats yet (its ModelSpec names no weights "
                           f"module; families with one: {', '.join(FAMILIES)}); a {arch} model loads and saves only "
                           "as gptforge weights")
    return FAMILIES[arch]


# ----------------------------------------------------------------------------- detection


def open_source(source: str | Path, n_heads: int | None = None) -> Source:
    """Detect what SOURCE is and read its config and tensor shapes (not its weights)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "hparams.json").is_file() or (p / "checkpoint").is_file() or any(p.glob("*.ckpt.index")):
            return gpt2.tf_source(p)
        if (p / "config.json").is_file():
            return _hf_source(p)
        if (p / ckpt.WEIGHTS).is_file() or (p / ckpt.CHECKPOINTS).is_dir() or ckpt.is_sharded(p):
            return _gptforge_source(p)
        if (p / NANOGPT_CKPT).is_file():  # nanoGPT's out_dir
            return _torch_source(p / NANOGPT_CKPT, n_heads)
        if str(source) not in HUB_NAMES:  # ./gpt2/ (where the book's downloads live) still means the hub's gpt2
            raise WeightsError(f"{p}: a directory without checkpoints or model weights (no {ckpt.CHECKPOINTS}/, "
                               f"{ckpt.WEIGHTS}, config.json or TensorFlow checkpoint); give a run directory, a "
                               "checkpoint, a weights file or a Hugging Face model id")
    if p.is_file():
        if p.name.endswith(".index") or ".ckpt." in p.name:
            return gpt2.tf_source(p.parent)
        if p.name == "config.json":
            return _hf_source(p.parent)
        if p.suffix.lower() in TEXT_SUFFIXES:  # eval TEXT SOURCE: the arguments swapped
            raise WeightsError(f"SOURCE {source}: a text file, not a model; the model comes first, then the text "
                               f"(gptforge eval RUN_DIR {source})")
        if p.suffix not in TORCH_SUFFIXES:  # safetensors, whatever the name
            reader = SafetensorsReader.single(p)
            if reader.metadata.get("format") == "gptforge":
                return _gptforge_source(p)
            return _hf_source(p.parent, weights=p)
        return _torch_source(p, n_heads)
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

    weights = (HF_WEIGHTS[0], HF_SHARD_INDEX, *HF_WEIGHTS[1:])
    try:
        if not _cached(repo_id, "config.json") and not _hub_reachable():
            raise fail_offline("config.json")
        config = Path(hf_hub_download(repo_id, "config.json"))
        not_cached = False
        for name in weights:
            try:
                path = Path(hf_hub_download(repo_id, name))
            except LocalEntryNotFoundError:
                not_cached = True
                continue
            except EntryNotFoundError:
                continue
            if name == HF_SHARD_INDEX:
                for shard in sorted(set(read_json(path).get("weight_map", {}).values())):
                    hf_hub_download(repo_id, shard)
            for extra in HF_TOKENIZER_FILES:  # a tokenizer, when the repository has one
                try:
                    hf_hub_download(repo_id, extra)
                except EntryNotFoundError:  # also LocalEntryNotFoundError: offline, and not cached
                    pass
            return config.parent
        if not_cached:
            raise fail_offline(" or ".join(weights))
        raise WeightsError(f"{repo_id}: the model repository has neither {' nor '.join(weights)}")
    except LocalEntryNotFoundError:
        raise fail_offline("config.json") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{repo_id}: no such local path, and fetching it from the Hugging Face hub failed: "
                           f"{first_line(e)}") from None


def _cached(repo_id: str, name: str) -> bool:
    try:
        hf_hub_download(repo_id, name, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, EntryNotFoundError):
        return False


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host answers at all: one connection, no retries (huggingface_hub retries an unreachable
    host for ~25 s, 11 lines of warnings, before the same answer)."""
    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_family(conf: dict, path: Path) -> WeightFamily:
    """The family that reads config.json's model_type (a config.json without one is GPT-2's)."""
    model_type = conf.get("model_type", FAMILIES[DEFAULT_ARCH].HF_MODEL_TYPES[0])
    for family in FAMILIES.values():
        if model_type in family.HF_MODEL_TYPES:
            return family
    names = " or ".join(family.NAME for family in FAMILIES.values())
    types = ", ".join(t for family in FAMILIES.values() for t in family.HF_MODEL_TYPES)
    raise WeightsError(f"{path}: model_type is {model_type!r}; only {names} models ({types}) can be loaded")


def _hf_source(d: Path, weights: Path | None = None, reader=None, hub_id: str | None = None) -> Source:
    config_path = d / "config.json"
    where = weights or d
    if not config_path.is_file():
        raise WeightsError(f"{where}: Hugging Face weights need a config.json beside them, and there is none")
    conf = read_json(config_path)
    family = _hf_family(conf, config_path)
    cfg = family.config_from_hf(conf, config_path)
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
    meta = {"format": "hub" if hub_id else "hf", "source": hub_id or str(where)}
    if (d / HF_TOKENIZER_FILES[0]).is_file():  # the family may know better (GPT-2's is always gpt2)
        meta["tokenizer"] = str(d / HF_TOKENIZER_FILES[0])
    if any((d / name).is_file() for name in (HF_TOKENIZER_FILES[0], "vocab.json")):
        meta["tokenizer_files"] = "yes"  # a tokenizer the directory holds, not one assumed for its family
    return family.hf_source(cfg, reader, meta)


def _torch_source(path: Path, n_heads: int | None) -> Source:
    """A torch state dict: one of a family's own formats, or Hugging Face names read with the config.json beside it."""
    reader = TorchReader(path)
    for family in FAMILIES.values():
        src = family.open_state_dict(path, reader, n_heads)
        if src is not None:
            return src
    if any(family.is_hf_state_dict(reader.shapes) for family in FAMILIES.values()):
        return _hf_source(path.parent, weights=path, reader=reader)
    kinds = " nor ".join(kind for family in FAMILIES.values() for kind in family.STATE_DICTS)
    raise WeightsError(f"{path}: a state dict of neither {kinds}")


def _gptforge_source(p: Path, verify: bool = True) -> Source:
    path = resolve_weights(p, verify)
    meta = ckpt.read_weights_meta(path)
    try:
        cfg = config_from_dict(json.loads(meta["model"]), meta.get("arch"))  # no arch: written before families
    except ValueError as e:
        raise WeightsError(f"{path}: bad model config in the metadata ({e})") from None
    shapes = our_shapes(cfg)
    plan = [Entry(k, (k,)) for k in shapes]
    if path.is_dir():  # a sharded checkpoint: the raw parameters, a padded vocabulary with its padding rows
        reader = ShardedCheckpointReader(path / ckpt.SHARDS, rows={k: shapes[k][0] for k in padded_params(cfg)})
    else:
        reader = SafetensorsReader.single(path)
    return Source("gptforge", cfg, reader, plan, set(), dict(meta))


def padded_params(cfg) -> list[str]:
    """Parameters stored with more rows than the state dict gives them (a `pad_vocab` model's embedding, head)."""
    with torch.device("meta"):
        model = build(cfg)
    shapes = our_shapes(cfg)
    return [k for k, p in model.named_parameters() if k in shapes and tuple(p.shape) != shapes[k]]


# ----------------------------------------------------------------------------- loading


def check_source(src: Source) -> None:
    """Every tensor the plan needs is there with the right shape, and nothing else is: or one line saying which."""
    shapes = our_shapes(src.cfg)
    where = src.reader.where
    needed: dict[str, tuple[int, ...]] = {}
    for e in src.plan:
        for s in e.src:
            needed[s] = expected(e, shapes[e.ours])
    missing = [k for k in needed if k not in src.reader.shapes]
    if missing:
        k = missing[0]
        raise WeightsError(f"{where}: tensor {k!r} is missing (expected shape {needed[k]}); {len(missing)} of "
                           f"{len(needed)} tensors are missing: a partial or different model?")
    for k, shape in needed.items():
        if src.reader.shapes[k] != shape:
            raise WeightsError(f"{where}: tensor {k!r} has shape {src.reader.shapes[k]}, expected {shape} "
                               f"({_family(src.cfg).describe(src.cfg)})")
    extra = sorted(set(src.reader.shapes) - set(needed) - src.ignored)
    if extra:
        family = _family(src.cfg)
        raise WeightsError(f"{where}: unexpected tensor {extra[0]!r} of shape {src.reader.shapes[extra[0]]} "
                           f"({len(extra)} in all): not part of a {family.NAME} model with {family.describe(src.cfg)}")


def build_model(src: Source, context_length: int | None = None, drop_rate: float | None = None) -> nn.Module:
    """The model a checked source describes, its weights read block by block into a meta-device model.

    context_length below the source's crops the position embeddings (the first positions are kept);
    a rotary model (no position table) may take any.
    """
    check_source(src)
    cfg = src.cfg
    if context_length is not None:
        if not 0 < context_length <= (max_positions(cfg) or context_length):
            raise ConfigError(f"context_length {context_length} must be between 1 and the model's "
                              f"{cfg.context_length}")
        cfg = replace(cfg, context_length=context_length)
    if drop_rate is not None:
        cfg = replace(cfg, drop_rate=drop_rate)
    with torch.device("meta"):
        model = build(cfg)
    n = sum(p.numel() for p in model.parameters())
    perf.check_fits(4 * n, torch.device("cpu"), f"the model ({n:,} parameters, float32)",
                    "use a smaller model, or a machine with more memory")
    fill(model, src)
    return model


def load_any(source: str | Path, device: torch.device | str = "cpu", *, context_length: int | None = None,
             drop_rate: float | None = None, n_heads: int | None = None) -> tuple[nn.Module, dict]:
    """A model from any supported SOURCE (see the module docstring); returns (model, metadata).

    The metadata holds at least "format" (hub, hf, tf, book, nanogpt, minimind or gptforge), and "tokenizer" when the
    source names or carries one (a name such as gpt2, or the path of a tokenizer.json).
    """
    src = open_source(source, n_heads=n_heads)
    model = build_model(src, context_length, drop_rate)
    return model.to(device), src.meta


def init_moments(source: str | Path, model: nn.Module) -> SavedMoments | str:
    """The AdamW moments a SOURCE file carries beside its weights (the book's model_and_optimizer.pth), under the
    names of `model` (built from that source), or a sentence saying why there are none."""
    src = open_source(source)
    return saved_moments(src, {k: tuple(p.shape) for k, p in model.named_parameters()})


def load_model(source: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> tuple[nn.Module, dict]:
    """A gptforge model from a run dir (its best checkpoint, else its newest intact one: runs.choose.choose_checkpoint),
    checkpoint dir or weights file (checked against its checksums.json unless `verify` is False: the caller just
    did); returns (model, the weights file's metadata). The one reader of gptforge weights files."""
    src = _gptforge_source(Path(source), verify)
    return build_model(src).to(device), src.meta


def init_model_config(source: str, requested: dict) -> Any:
    """The model config for `train --init-from SOURCE`: the source's shape, with requested settings checked.

    Only context_length (at most the source's when position embeddings are cropped; any for a rotary
    model) and drop_rate may differ.
    """
    base = open_source(source).cfg
    limit = max_positions(base)
    for k in _family(base).SHAPE_KEYS:
        if k in requested and requested[k] != getattr(base, k):
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"{flag} {requested[k]!r}: the model in {source} has {k} {getattr(base, k)!r}, and a run "
                              f"initialised from it keeps its shape (only --context-length may "
                              f"{'shrink' if limit else 'change'} and --drop-rate change)")
    ctx = requested.get("context_length", base.context_length)
    if not 0 < ctx <= (limit or ctx):
        raise ConfigError(f"--context-length {ctx}: must be between 1 and the {base.context_length} positions "
                          f"of the model in {source}")
    return replace(base, context_length=ctx, drop_rate=requested.get("drop_rate", base.drop_rate))


def load_for_text(source: str | Path, device: torch.device | str = "cpu",
                  tokenizer: str | None = None) -> tuple[nn.Module, Tokenizer, dict]:
    """load_any's model with the tokenizer its metadata names or carries, or `tokenizer` (--tokenizer: a
    tokenizer.json, its directory or gpt2) when given: (model, tokenizer, metadata).

    A model with fewer token ids than its tokenizer (e.g. a tiny test model) cannot read text: an error.
    """
    src = open_source(source)
    check_source(src)  # a partial file first, then the tokenizer: both before the weights are read
    tok = text_tokenizer(src.cfg, src.meta, source, tokenizer)
    return build_model(src).to(device), tok, src.meta


def text_tokenizer(cfg: Any, meta: dict, source: str | Path, tokenizer: str | None = None) -> Tokenizer:
    """`tokenizer` (a --tokenizer value) or else the one the source's metadata names or carries, refused
    when the model (of config cfg) has fewer token ids than it, or when neither says which."""
    if tokenizer is None and "tokenizer" not in meta:  # a .pth state dict, a Hugging Face dir without tokenizer files
        raise ConfigError(f"{source}: carries no tokenizer; pass --tokenizer with the tokenizer the model was trained "
                          "with (a tokenizer.json, a directory holding one, or gpt2)")
    tok = tokenizer_from_metadata(meta) if tokenizer is None else get_tokenizer(tokenizer)
    if tokenizer is not None and carries_tokenizer(meta):
        check_same_tokenizer(tok, source_tokenizer(meta), f"--tokenizer {tokenizer}", source)
    if cfg.vocab_size < tok.vocab_size:
        which = f"the --tokenizer {tokenizer}" if tokenizer is not None else f"its {meta.get('tokenizer', 'gpt2')}"
        raise ConfigError(f"{source}: the model has {cfg.vocab_size} token ids, fewer than {which} "
                          f"tokenizer's {tok.vocab_size}; it cannot read or write text (pass --tokenizer with the "
                          "tokenizer the model was trained with)")
    return tok


def carries_tokenizer(meta: dict) -> bool:
    """Whether a source holds the tokenizer its model was trained with: gptforge weights (their metadata), or a
    Hugging Face directory with tokenizer files; not one assumed for its family (GPT-2's, for bare weights)."""
    return "tokenizer" in meta and ("model" in meta or "tokenizer_files" in meta)


def source_tokenizer(meta: dict) -> Tokenizer:
    """The tokenizer a source's metadata carries (gptforge weights) or names (a Hugging Face directory's file)."""
    return tokenizer_from_metadata(meta) if "tokenizer_json" in meta else get_tokenizer(meta["tokenizer"])


def check_same_tokenizer(ours: Tokenizer, theirs: Tokenizer, what: str, source) -> None:
    """Refuse a tokenizer other than the one the model in `source` was trained with: its ids would mean other
    tokens (a loss that means nothing, text that makes no sense, embeddings trained on the wrong rows)."""
    if not same_tokenizer(ours, theirs):
        raise ConfigError(f"{what} ({ours.vocab_size:,} ids) is not the tokenizer the model in {source} was trained "
                          f"with ({theirs.vocab_size:,} ids): the ids would mean other tokens; leave it out (the "
                          "model's own is used) or give the model's tokenizer")


def init_tokenizer(source: str, named: str | None) -> str | None:
    """The tokenizer of a run started from `source` (--init-from): the source's own when `named` (--tokenizer, or a
    prepared directory's) is None, `named` when it is the same one; another one is refused. None: gpt2 (a source
    that carries no tokenizer, such as the book's model.pth, and nothing named)."""
    src = open_source(source)
    meta = src.meta
    if not carries_tokenizer(meta):
        tok = get_tokenizer(named or meta.get("tokenizer", "gpt2"))
        if src.cfg.vocab_size < tok.vocab_size:
            which = f"--tokenizer {named}" if named else f"{meta.get('tokenizer', 'gpt2')} (assumed)"
            raise ConfigError(f"--init-from {source}: carries no tokenizer and has {src.cfg.vocab_size:,} token ids, "
                              f"fewer than {which} has ({tok.vocab_size:,}); pass --tokenizer with the tokenizer the "
                              "model was trained with (a tokenizer.json, a directory holding one, or gpt2)")
        return named
    if named is not None:
        check_same_tokenizer(get_tokenizer(named), source_tokenizer(meta), f"the run's tokenizer {named}", source)
        return named
    return str(source) if "tokenizer_json" in meta else meta["tokenizer"]
