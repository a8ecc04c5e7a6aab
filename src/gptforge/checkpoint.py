"""Run directories and checkpoints: atomic writes, safetensors weights, resumable training state.

A run directory holds::

    config.toml                      the full config of the run (usable again with --config)
    metrics.jsonl                    one JSON object per logged event
    loss.png                         train/val loss against steps and tokens seen
    checkpoints/step-00000100/
        model.safetensors            weights; the model config and tokenizer in its metadata
        state.pt                     optimizer, step, tokens seen, data position, RNG states

A checkpoint directory is written under a temporary name, fsynced and renamed, so a directory
named ``step-*`` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, tokenizer_metadata

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


class CheckpointError(ValueError):
    """A model source or checkpoint that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- weights


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with a tied head stored once (as Hugging Face does)."""
    sd = model.state_dict()
    if model.cfg.tie_weights:
        sd.pop("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_weights(path: Path, model: GPT, tokenizer: Tokenizer | str, extra: dict | None = None) -> None:
    meta = {"format": "gptforge", "model": json.dumps(model.cfg.to_dict()), **tokenizer_metadata(tokenizer)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_file({k: v.cpu() for k, v in model_state(model).items()}, str(path), metadata=meta)


def read_weights_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors reports a bad header as one of several error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "gptforge" or "model" not in meta:
        raise CheckpointError(f"{path}: safetensors file without gptforge metadata (no model config)")
    return meta


def load_weights_into(model: GPT, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path), device="cpu")
    expected = model_state(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(sd, strict=not model.cfg.tie_weights)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")), key=lambda d: d.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: GPT, tokenizer: Tokenizer | str, state: dict,
                    keep_last: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest keep_last (0 keeps all)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp / WEIGHTS, model, tokenizer, extra={"step": step})
    torch.save(state, tmp / STATE)
    for f in (WEIGHTS, STATE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def load_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {STATE}; this checkpoint cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_weights(source: str | Path) -> Path:
    """A run dir, a checkpoint dir or a .safetensors file -> the weights file to load."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / WEIGHTS).is_file():
            return p / WEIGHTS
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest / WEIGHTS
        raise CheckpointError(f"{p}: neither a run directory with checkpoints nor a checkpoint directory")
    raise CheckpointError(f"{p}: no such file or directory")


def load_model(source: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A gptforge model from a run dir, checkpoint dir or weights file; returns (model, metadata)."""
    path = resolve_weights(source)
    meta = read_weights_meta(path)
    cfg = GPTConfig.from_dict(json.loads(meta["model"]))
    model = GPT(cfg)
    load_weights_into(model, path)
    return model.to(device), meta
