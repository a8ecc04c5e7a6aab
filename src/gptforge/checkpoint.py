"""Run directories and checkpoints: atomic writes, safetensors weights, resumable training state.

A run directory holds::

    config.toml                      the full config of the run (usable again with --config)
    metrics.jsonl                    one JSON object per logged event
    best.json                        the best evaluation (lowest val loss) and its checkpoint, never pruned
    loss.png                         train/val loss against steps and tokens seen
    checkpoints/step-00000100/
        model.safetensors            weights; the arch, model config and tokenizer in its metadata
        state.pt                     optimizer, step, tokens seen, data position, RNG states
        checksums.json               sha256 of each file above, verified on load

A sharded checkpoint (``--checkpoint-format sharded``, the default under torchrun with FSDP2) holds,
instead of model.safetensors and the optimizer inside state.pt::

        shards/                      torch.distributed.checkpoint (DCP): each rank's own parameters and
                                     optimizer moments (__R_N.distcp) and .metadata; read on any world size
        meta.json                    what model.safetensors' metadata holds: arch, model config, tokenizer

A checkpoint directory is written under a temporary name, fsynced and renamed, so a directory
named ``step-*`` is complete when written; its checksums catch later damage (a truncated copy, a
bad disk), and a damaged newest checkpoint is reported and passed over for the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import faults
from .errors import CheckpointError
from .models import spec_for
from .models.gpt2 import GPT
from .perf import human_bytes
from .tokenizer import Tokenizer, tokenizer_metadata

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
RUN_TOKENIZER = "tokenizer.json"  # --tokenizer-vocab: the tokenizer trained when the run started
SHARDS = "shards"  # a sharded checkpoint's DCP directory
META = "meta.json"  # a sharded checkpoint's model config and tokenizer (model.safetensors' metadata)
UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then set back
os.umask(UMASK)
BEST = "best.json"  # the run's best evaluation: step, val_loss, val_bpb, checkpoint (relative to the run)


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The one atomic write: a temporary file, fsync, rename, fsync of the directory.

    Readers (and a process killed at any moment) see the old content or the whole new one; a write
    that fails removes its temporary file and raises the OSError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write-{path.name}")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: this one did (a full disk says where)
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- weights


def model_state(model: GPT, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (or the given full state dict of it) with a tied head stored once, as HF does."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.cfg.tie_weights:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def weights_metadata(model: GPT, tokenizer: Tokenizer | str, extra: dict | None = None) -> dict[str, str]:
    """What describes a model's weights: format, arch, model config, tokenizer, and `extra` (step, run config)."""
    meta = {"format": "gptforge", "arch": spec_for(model.cfg).arch, "model": json.dumps(model.cfg.to_dict()),
            **tokenizer_metadata(tokenizer)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_weights(path: Path, model: GPT, tokenizer: Tokenizer | str, extra: dict | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """Weights as safetensors; `weights` (a full state dict gathered from shards) replaces model.state_dict()."""
    save_file({k: v.cpu() for k, v in model_state(model, weights).items()}, str(path),
              metadata=weights_metadata(model, tokenizer, extra))
    follow_umask(path)


def follow_umask(path: Path) -> None:
    """Give a file the mode the user's umask asks for (safetensors' writer makes its files 0600 whatever it says)."""
    os.chmod(path, 0o666 & ~UMASK)


def read_weights_meta(path: Path) -> dict:
    """The gptforge metadata of a weights file, or of a sharded checkpoint directory (its meta.json)."""
    path = Path(path)
    if path.is_dir():
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"{path}: {META} is missing or unreadable") from None
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors reports a bad header as one of several error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "gptforge" or "model" not in meta:
        raise CheckpointError(f"{path}: {'a ' + META if path.is_dir() else 'safetensors file'} without gptforge "
                              "metadata (no model config)")
    return meta


def is_sharded(ckpt_dir: Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (a sharded checkpoint) rather than model.safetensors."""
    return (Path(ckpt_dir) / SHARDS).is_dir()


def checkpoint_weights(ckpt_dir: Path) -> Path:
    """What holds a checkpoint's weights: model.safetensors, or the directory itself when it is sharded."""
    return Path(ckpt_dir) if is_sharded(ckpt_dir) else Path(ckpt_dir) / WEIGHTS


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")), key=lambda d: d.name)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt_dir: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Raise CheckpointError unless every file listed in checksums.json is present and intact.

    part (i, n): only every n-th file from the i-th (in name order), so that n processes verify a sharded
    checkpoint together, each reading 1/n of it."""
    ckpt_dir = Path(ckpt_dir)
    try:
        expected = json.loads((ckpt_dir / CHECKSUMS).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        expected = None
    if not isinstance(expected, dict) or not expected:  # missing, unreadable, or not {file: digest}
        raise CheckpointError(f"{ckpt_dir}: {CHECKSUMS} is missing or unreadable")
    for name, digest in sorted(expected.items())[part[0]::part[1]]:
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is damaged or incomplete)")


def _newest_intact(run_dir: Path, warn, prefix: str, verify=verify_checkpoint) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint whose checksums verify or None, the damaged newer ones), each reported via warn."""
    damaged: list[Path] = []
    for d in reversed(checkpoint_dirs(run_dir)):
        try:
            verify(d)
            return d, damaged
        except CheckpointError as e:
            if warn is not None:
                warn(f"{prefix}{e}")
            damaged.append(d)
    return None, damaged


def latest_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint whose checksums verify; damaged newer ones are reported through warn."""
    return _newest_intact(run_dir, warn, "skipping damaged checkpoint: ")[0]


def resume_point(run_dir: Path, warn, verify=verify_checkpoint) -> tuple[Path | None, list[Path]]:
    """The checkpoint a resumed run continues from, and the damaged newer ones it passes over.

    A run killed before its first checkpoint has none and starts again from step 0; a run whose
    checkpoints are all damaged is an error, and nothing in the run directory is touched. `verify`
    (default verify_checkpoint) checks one checkpoint directory: several processes share the work.
    """
    last, damaged = _newest_intact(run_dir, warn, "gptforge: warning: passing over damaged checkpoint: ", verify)
    if last is None and damaged:
        raise CheckpointError(
            f"{run_dir}: every checkpoint is damaged ({', '.join(d.name for d in damaged)}: checksum mismatch or "
            "missing files); nothing was changed. Restore a checkpoint from a copy, or start a new run with --out")
    return last, damaged


def set_aside(damaged: list[Path], warn) -> None:
    """Rename damaged checkpoints to damaged-step-N: kept for inspection, never resumed from or pruned."""
    for d in damaged:
        target = d.with_name(f"damaged-{d.name}")
        n = 1
        while target.exists():
            target, n = d.with_name(f"damaged-{d.name}-{n}"), n + 1
        os.replace(d, target)
        warn(f"gptforge: warning: moved the damaged checkpoint {d.name} aside to {target}")


def check_writable(path: Path, flag: str, probe: bool = True) -> None:
    """Fail now, not after hours of work, when `path` (a directory to create or fill) cannot be written.

    The check creates and removes a file (`probe`), so it holds for root too; without `probe`, only
    that `path` and the place it would be made in are directories.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{flag} {path}: is a file, not a directory; choose another {flag}")
    place = path
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise CheckpointError(f"{flag} {path}: {place} is a file, not a directory; choose another {flag}")
    if not probe:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".gptforge-probe-", dir=place)
    except OSError as e:
        way = ("make it writable, or branch the run into a writable place with --out NEW" if flag == "--resume"
               else f"choose a writable {flag}")
        raise CheckpointError(f"{flag} {path}: cannot write in {place} ({e.strerror}); {way}") from None
    os.close(fd)
    os.unlink(probe)


def free_bytes(path: Path) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem `path` is (or would be made) on; None if unknown."""
    place = Path(path).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        return shutil.disk_usage(place).free
    except OSError:
        return None


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse now, before writing, `need` bytes (of `what`) at `path` when its disk has less free."""
    free = free_bytes(path)
    if free is not None and need > free:
        raise CheckpointError(f"{path}: not enough free space: {what} needs about {human_bytes(need)} and "
                              f"{human_bytes(free)} is free there (No space left on device); free space or choose "
                              "another place")


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """The bytes a checkpoint directory's files take."""
    return sum(f.stat().st_size for f in Path(ckpt_dir).rglob("*") if f.is_file())


def saved_run_config(run_dir: Path) -> tuple[dict, str] | None:
    """(config.toml's content as saved in the newest checkpoint that has it, that checkpoint's name), or None."""
    for d in reversed(checkpoint_dirs(run_dir)):
        try:
            meta = read_weights_meta(checkpoint_weights(d))
            return json.loads(meta["run_config"]), d.name
        except (CheckpointError, KeyError, ValueError):
            continue  # damaged (train will pass over it) or written before configs were saved
    return None


def save_checkpoint(run_dir: Path, step: int, model: GPT, tokenizer: Tokenizer | str, state: dict, keep_last: int,
                    weights: dict[str, torch.Tensor] | None = None, run_config: dict | None = None,
                    keep: int | None = None) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest keep_last (0 keeps all) and the
    checkpoint of step `keep` (the run's best, never pruned).

    `run_config` (config.toml's content) goes into the weights' metadata: a damaged config.toml can
    be told and restored from it without loading the training state.
    """
    root = Path(run_dir) / CHECKPOINTS
    _clear_stale(root)
    previous = (checkpoint_dirs(run_dir) or [None])[-1]  # not verified here: only its size is read
    if previous is not None:  # the same model and state again: the same bytes
        try:
            check_free_space(root, checkpoint_bytes(previous), f"the checkpoint of step {step} (as large as "
                             f"{previous.name})")
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {previous.name} is intact: continue with --resume {run_dir}") from None
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        tmp.mkdir()
        extra = {"step": step, **({"run_config": json.dumps(run_config)} if run_config is not None else {})}
        save_weights(tmp / WEIGHTS, model, tokenizer, extra=extra, weights=weights)
        faults.point("ckpt-after-weights")
        torch.save(state, tmp / STATE)
        faults.point("ckpt-after-state")
        _seal(tmp, {f: file_sha256(tmp / f) for f in (WEIGHTS, STATE)})
    except WRITE_ERRORS as e:  # a full disk
        raise write_failed(run_dir, step, tmp, e) from None
    return _commit(run_dir, step, tmp, keep_last, keep)


def _clear_stale(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def _seal(tmp: Path, sums: dict[str, str]) -> None:
    """checksums.json of the files in `sums`, then every file and directory of the checkpoint fsynced."""
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    for f in (*sums, CHECKSUMS):
        _fsync_file(tmp / f)
    for d in {(tmp / f).parent for f in sums}:
        _fsync_dir(d)
    _fsync_dir(tmp)


# what a failed write raises: OSError from our writes, SafetensorError from safetensors, RuntimeError from torch.save
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_reason(e: Exception, place: Path | None = None) -> str:
    """The first line of why a write failed ("No space left on device"). A writer that does not say why (torch's:
    "[enforce fail at inline_container.cc:672] . unexpected pos ...") gets the free space of `place` beside its words,
    and "No space left on device" when that is (nearly) nothing."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    words = (str(e).strip().splitlines() or [repr(e)])[0]
    free = free_bytes(place) if place is not None else None
    if free is None:
        return words
    if free < 1 << 20:
        return f"No space left on device: {human_bytes(free)} free; the writer said: {words[:120]}"
    return f"{words[:160]}; {human_bytes(free)} free there"


@contextmanager
def cleaned_on_failure(out: Path, command: str):
    """Writing `out` (a new file, or a new or empty directory): if a write fails (a full disk), whatever was written
    there is removed and the failure becomes one line naming `out`."""
    existed = out.exists()
    try:
        yield
    except (OSError, SafetensorError) as e:
        if out.is_dir() and not out.is_symlink():
            for p in out.iterdir():  # the directory was new or empty: all of it is this command's
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if not existed:
                out.rmdir()
        elif out.is_file() and not existed:
            out.unlink()
        raise CheckpointError(f"{command}: could not write {out} ({write_reason(e, out)}); nothing was left there: "
                              "free space (or choose another place) and run it again") from None


def write_failed(run_dir: Path, step: int, tmp: Path, e: Exception) -> CheckpointError:
    """The error of a checkpoint write that failed (a full disk), after removing what it wrote."""
    shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints are untouched
    previous = latest_checkpoint(run_dir)
    reason = write_reason(e, Path(run_dir) / CHECKPOINTS)
    return CheckpointError(
        f"could not write the checkpoint for step {step} in {Path(run_dir) / CHECKPOINTS} ({reason}); "
        + (f"{previous.name} is intact: free space and continue with --resume {run_dir}" if previous
           else "no earlier checkpoint exists"))


def _commit(run_dir: Path, step: int, tmp: Path, keep_last: int, keep: int | None = None) -> Path:
    """Rename a complete, sealed temporary checkpoint to step-N, then prune to the newest keep_last (and the
    checkpoint of step `keep`, the best)."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    faults.point("ckpt-before-rename")
    if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    faults.point("ckpt-before-prune")
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            if old.name != step_name(keep):
                shutil.rmtree(old)
    return final


def step_name(step: int | None) -> str | None:
    """The directory name of step's checkpoint (step-00000400); None for None."""
    return None if step is None else f"step-{step:08d}"


# ----------------------------------------------------------------------------- sharded checkpoints
# Every rank writes its shards into one temporary directory (distributed.save_sharded); rank 0 then adds
# meta.json, state.pt and checksums.json (every rank's digests of its own files) and renames it.


def sharded_tmp(run_dir: Path, step: int) -> Path:
    """The temporary directory all ranks write step's sharded checkpoint into (one name, known to every rank)."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-step-{step:08d}"


def begin_sharded(run_dir: Path, step: int) -> Path:
    """Rank 0, before the shards are written: stale temporary checkpoints removed, a fresh one made."""
    _clear_stale(Path(run_dir) / CHECKPOINTS)
    tmp = sharded_tmp(run_dir, step)
    (tmp / SHARDS).mkdir(parents=True)
    return tmp


def shard_digests(tmp: Path, rank: int) -> dict[str, str]:
    """sha256 of the shard files this rank wrote (DCP's __RANK_N.distcp; rank 0 also .metadata), by relative name."""
    shards = Path(tmp) / SHARDS
    files = sorted(shards.glob(f"__{rank}_*.distcp")) + ([shards / ".metadata"] if rank == 0 else [])
    return {f"{SHARDS}/{f.name}": file_sha256(f) for f in files}


def finish_sharded(run_dir: Path, step: int, tmp: Path, meta: dict[str, str], state: dict, digests: dict[str, str],
                   keep_last: int, keep: int | None = None) -> Path:
    """Rank 0, once every rank's shards are written: meta.json, state.pt, checksums.json, rename, prune (never
    the checkpoint of step `keep`)."""
    try:
        atomic_write_bytes(tmp / META, json.dumps(meta).encode())
        torch.save(state, tmp / STATE)
        faults.point("ckpt-after-state")
        _seal(tmp, {**digests, META: file_sha256(tmp / META), STATE: file_sha256(tmp / STATE)})
    except (OSError, RuntimeError) as e:
        raise write_failed(run_dir, step, tmp, e) from None
    return _commit(run_dir, step, tmp, keep_last, keep)


def load_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {STATE}; this checkpoint cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only found something other than tensors and plain values
        raise CheckpointError(f"{path}: holds Python objects other than tensors, numbers and strings, which "
                              "gptforge never writes; refusing to load it (it could run code). Delete this "
                              "checkpoint to resume from the one before") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable training state ({str(e).splitlines()[0]})") from None
