"""What a run is made of and carries across a resume: its data (TrainData, build_data), its schedule,
its position (RunState), its model (build_model) and its checkpoints (Checkpointer: save, and restore
with the RNG and the world-size remap)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from .. import checkpoint as ckpt
from .. import distributed as dist
from .. import faults, perf
from ..config import ConfigError
from ..data import (
    Batches,
    RandomBatches,
    check_windows,
    document_eot,
    make_windows,
    open_prepared,
    prepared_dir,
    read_texts,
    split_texts,
    text_splits,
    tokens_digest,
    training_batches,
)
from ..models import build
from ..models.layers import torch_default_init
from ..runs.choose import write_best
from ..runs.metrics import human
from ..tokenizer import HFTokenizer, Tokenizer, get_tokenizer, train_bpe
from ..weights import SavedMoments, init_moments, load_any, load_model
from .best import Best
from .config import RunConfig, TrainConfig
from .optim import build_optimizer, lr_at


def run_tokenizer(cfg: RunConfig, run_dir: Path, resume: bool, warn=print) -> Tokenizer:
    """The run's tokenizer: --tokenizer's; with --tokenizer-vocab N, a byte-level BPE trained by rank 0 on the
    run's training text (train() keeps it as RUN_DIR/tokenizer.json, which a resume reads back). When the text
    gives fewer than N ids, the model's vocabulary (N unless set) follows the tokenizer, and `warn` says so."""
    tokenizer = _tokenizer(cfg, run_dir, resume)
    asked = cfg.data.tokenizer_vocab
    if not resume and asked is not None and tokenizer.vocab_size < asked == cfg.model.vocab_size:
        warn(f"gptforge: note: the training text gives a byte-level BPE of {tokenizer.vocab_size:,} ids, not the "
             f"{asked:,} of --tokenizer-vocab (too little text for more merges); the model's vocabulary follows it")
        cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; set --vocab-size to at least that")
    return tokenizer


def _tokenizer(cfg: RunConfig, run_dir: Path, resume: bool) -> Tokenizer:
    vocab = cfg.data.tokenizer_vocab
    if vocab is None:
        return get_tokenizer(cfg.data.tokenizer)
    path = run_dir / ckpt.RUN_TOKENIZER
    if resume and path.is_file():
        return get_tokenizer(str(path))
    json_text = dist.from_main(
        lambda: train_bpe(training_text(read_texts(cfg.inputs), cfg.data.val_fraction), vocab).json)
    return HFTokenizer(json_text, source=str(path))


def training_text(texts: list[str], val_fraction: float) -> list[str]:
    """The first (1 - val_fraction) of the documents' characters: about the text of the train split, which
    split_tokens cuts at the same share of the tokens (the tokenizer is trained before there are tokens)."""
    return split_texts(texts, val_fraction)[0]


def load_splits(cfg: RunConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if (data_dir := prepared_dir(cfg.inputs)) is not None:  # shards, memory-mapped; this rank's share of train
        return open_prepared(data_dir, tokenizer, dist.rank(), dist.world_size())
    return text_splits(read_texts(cfg.inputs), tokenizer, cfg.data.val_fraction, cfg.data.val_split)




@dataclass
class TrainData:
    """What a run trains and evaluates on: this rank's batches, the evaluation sets, the data's hash."""

    batches: Batches | RandomBatches
    eval_sets: dict[str, Batches]
    data_hash: str
    summary: str  # the log line describing the data
    eot_id: int | None = None  # --document-mask: the document separator loss_batch masks attention at
    padded: bool = False  # --packing pad: rows score different numbers of targets (train_step weighs them)


def build_data(cfg: RunConfig, tokenizer) -> TrainData:
    t, world = cfg.train, dist.world_size()
    train_tokens, val_tokens = load_splits(cfg, tokenizer)
    ctx = cfg.model.context_length
    train_windows = make_windows(train_tokens, ctx, cfg.data, tokenizer)
    val_windows = make_windows(val_tokens, ctx, cfg.data, tokenizer)
    batches = training_batches(train_windows, cfg.data.sampling, t.batch_size, t.seed, dist.rank(), world)
    check_windows(train_windows, len(train_tokens), "train", t.batch_size * batches.world if isinstance(
        batches, Batches) else t.batch_size, drop_last=True)
    if cfg.data.val_fraction > 0 and prepared_dir(cfg.inputs) is None:  # prepared data: its own split
        check_windows(val_windows, len(val_tokens), "val", t.batch_size, drop_last=False)
    # evaluation batches are global batches, each rank scoring its share of the rows (evaluate's ranks)
    eval_sets = {"train": Batches(train_windows, t.batch_size * world, shuffle=False, drop_last=True)}
    if len(val_windows):
        eval_sets["val"] = Batches(val_windows, t.batch_size * world, shuffle=False, drop_last=False)
    if len(batches) < t.grad_accum and t.max_steps is None:
        raise ConfigError(f"one epoch has {len(batches)} batches, fewer than --grad-accum {t.grad_accum}; "
                          "lower --grad-accum or --batch-size, or set --max-steps")
    rows = "documents" if cfg.data.packing == "pad" else "windows"
    summary = (f"data: {human(len(train_tokens))} train tokens ({len(train_windows)} {rows}), "
               f"{human(len(val_tokens))} val tokens ({len(val_windows)} {rows}); "
               f"{len(batches)} batches of {t.batch_size * world} per epoch"
               + (f" ({world} processes x {t.batch_size}, {t.parallel})" if world > 1 else ""))
    eot_id = document_eot(tokenizer, "document_mask") if cfg.data.document_mask else None
    return TrainData(batches, eval_sets, tokens_digest(train_tokens), summary, eot_id, cfg.data.packing == "pad")


@dataclass
class Schedule:
    """The run's length and learning-rate schedule: linear warmup, then cosine, wsd or constant (optim.lr_at)."""

    lr: float
    min_lr: float
    warmup: int
    total_steps: int
    kind: str = "cosine"
    decay_fraction: float = 0.2

    @classmethod
    def plan(cls, t: TrainConfig, batches_per_epoch: int, tokens_per_step: int) -> Schedule:
        if t.max_tokens is not None:
            total = -(-t.max_tokens // tokens_per_step)  # whole steps of the global batch, rounded up
        else:
            total = t.max_steps or t.epochs * (batches_per_epoch // t.grad_accum)
        if t.warmup_steps is not None and t.warmup_steps > total:
            raise ConfigError(f"--warmup-steps {t.warmup_steps} must not exceed the run's {total} steps "
                              "(the learning rate would never reach --lr)")
        return cls(t.lr, t.min_lr if t.min_lr is not None else t.lr / 10,
                   t.warmup_steps if t.warmup_steps is not None else max(1, total // 20), total, t.schedule,
                   t.decay_fraction)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.total_steps, self.kind, self.decay_fraction)

    def describe(self) -> str:
        then = {"cosine": f"cosine to {self.min_lr:g}", "constant": "constant",
                "wsd": f"stable, then linear to {self.min_lr:g} over the last {self.decay_fraction:g} of the steps"}
        return f"warmup {self.warmup}, {then[self.kind]}"

    def state_dict(self) -> dict:
        return dict(lr=self.lr, min_lr=self.min_lr, warmup=self.warmup, total_steps=self.total_steps,
                    schedule=self.kind, decay_fraction=self.decay_fraction)


@dataclass
class RunState:
    """Where a run is: optimizer steps done, tokens seen, and the data position (epoch, batch)."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict:
        return dict(step=self.step, tokens=self.tokens, epoch=self.epoch, batch=self.batch)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens, self.epoch, self.batch = d["step"], d["tokens"], d["epoch"], d["batch"]

    def next_batch(self, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the data position, on the device; the position moves on by one."""
        if self.batch >= len(batches):
            self.epoch, self.batch = self.epoch + 1, 0
        x, y = batches.batch(self.epoch, self.batch)
        self.batch += 1
        if device.type == "cuda":  # page-locked host memory: the copies overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def count_params(model_cfg) -> int:
    """The parameters of a model config, counted on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(model_cfg).parameters())


def check_memory(model_cfg, t: TrainConfig, device: torch.device, params: int | None = None) -> None:
    """Refuse, before anything is allocated, training whose estimated peak (weights, gradients, optimizer state:
    perf.TRAIN_BYTES_PER_PARAM each; activations: perf.activation_bytes) is more than the device has free.
    `params`: the config's parameter count when the caller has it."""
    free = perf.available_memory(device)
    if free is None:
        return
    params = count_params(model_cfg) if params is None else params
    share = dist.world_size() if t.parallel == "fsdp" else 1  # FSDP: each rank holds its share of the state
    need = perf.TRAIN_BYTES_PER_PARAM * params // share + perf.activation_bytes(model_cfg, t.batch_size)
    if need > free:
        raise ConfigError(f"training needs about {perf.human_bytes(need)} of memory on {device} ({params:,} "
                          f"parameters x {perf.TRAIN_BYTES_PER_PARAM} bytes, and activations for batch {t.batch_size} "
                          f"x {model_cfg.context_length}) and {perf.human_bytes(free)} is free: reduce the model "
                          "(--emb-dim, --n-layers, --vocab-size), --batch-size or --context-length")


def rng_state() -> dict:
    """This process's random number generator states (Python, NumPy, torch CPU and CUDA)."""
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


def check_resources(model_cfg, t: TrainConfig, device: torch.device, run_dir: Path | None) -> None:
    """The memory training needs (check_memory) and, given run_dir (rank 0), the disk its first checkpoint needs."""
    params = count_params(model_cfg)  # counted once for both checks
    check_memory(model_cfg, t, device, params)
    if run_dir is not None:
        check_disk(params, run_dir)


def check_disk(params: int, run_dir: Path) -> None:
    """Refuse, before training, a run of `params` parameters whose first checkpoint cannot fit on run_dir's disk: the
    weights and at least one optimizer moment per parameter, float32 (AdamW keeps two, Muon one for its matrices)."""
    ckpt.check_free_space(Path(run_dir), 8 * params,
                          f"a checkpoint ({params:,} parameters: weights and optimizer state)")


def build_model(cfg: RunConfig, device: torch.device, resume: bool, log) -> torch.nn.Module:
    """Random initial weights from the seed (as --init says), or --init-from's weights (a resumed run loads
    its own later)."""
    if cfg.init_from and not resume:

        model = load_any(cfg.init_from, device, context_length=cfg.model.context_length,
                         drop_rate=cfg.model.drop_rate)[0]
        if model.cfg != cfg.model:
            raise ConfigError(f"the model in {cfg.init_from} ({model.cfg}) differs from the run's model config "
                              f"({cfg.model}); use weights.init_model_config to build the config")
        log(f"initialised from {cfg.init_from}")
    else:
        model = build(cfg.model).to(device)
        if cfg.train.init == "torch":
            torch_default_init(model)
    model.attention = cfg.train.attention
    if dist.world_size() > 1:
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank())  # same initial weights, a dropout stream per rank
    if cfg.train.activation_checkpointing:
        dist.checkpoint_blocks(model)
    return model


def start_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device, restored, warn
                    ) -> torch.optim.Optimizer:
    """The run's optimizer (after wrapping: FSDP replaces parameters): a resumed run's state from its checkpoint
    (`restored`, what Checkpointer.restore returned), a new run --init-from a file with AdamW moments those moments
    (adopt_moments), else fresh."""
    optimizer = build_optimizer(model, cfg.train, device)
    if restored is not None:
        Checkpointer.load_optimizer(model, optimizer, restored)
    elif cfg.init_from:
        adopt_moments(cfg, model, optimizer, warn)
    return optimizer


def adopt_moments(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, warn) -> None:
    """--init-from a file that carries its optimizer's state (the book's model_and_optimizer.pth): its AdamW
    moments and step counts go into the run's optimizer when that is the same optimizer (AdamW with the same
    betas), as the book's `optimizer.load_state_dict` continues them; otherwise the run starts with fresh moments.
    `warn` (stderr) says which. The run's own settings (lr, weight decay) stay the run's."""
    t, where = cfg.train, f"gptforge: --init-from {cfg.init_from}"
    saved = init_moments(cfg.init_from, dist.unwrap(model))
    why = saved if isinstance(saved, str) else moments_mismatch(saved, t)
    if why is None and t.parallel == "fsdp" and dist.world_size() > 1:
        why = "its moments are not spread over FSDP's shards"
    if why is not None:
        warn(f"{where}: {why}; AdamW starts with fresh moments")
        return
    number = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    params = dict(dist.unwrap(model).named_parameters())
    state_dict = optimizer.state_dict()
    state_dict["state"] = {number[id(params[name])]: s for name, s in saved.state.items()}
    dist.load_optimizer_state(model, optimizer, state_dict)
    steps = sorted({int(s["step"]) for s in saved.state.values()})
    warn(f"{where}: kept its AdamW moments ({len(saved.state)} tensors, step {'/'.join(map(str, steps))}); "
         "the run continues them")


def moments_mismatch(saved: SavedMoments, t: TrainConfig) -> str | None:
    """Why a file's AdamW moments do not fit the run's optimizer (None: they do)."""
    if t.optimizer != "adamw":
        return f"the run trains with --optimizer {t.optimizer}, not AdamW"
    if saved.settings.get("amsgrad"):
        return "its AdamW used amsgrad, which gptforge does not"
    betas = tuple(saved.settings.get("betas", ()))
    if betas != (t.beta1, t.beta2):
        return (f"its AdamW betas {betas} are not the run's ({t.beta1}, {t.beta2}); give --beta1 and --beta2 to "
                "continue them")
    return None


@dataclass
class PendingSave:
    """A sharded checkpoint whose shards are being (or have been) written: what rank 0 seals it with."""

    step: int
    tmp: Path
    saved: dict  # state.pt's content
    meta: dict  # meta.json's content
    future: object = None  # --async-checkpoint: the background write


@dataclass
class Checkpointer:
    """Saving a run's checkpoints (whole, or sharded: every rank its own part) and picking a resumed run up
    from the newest intact one."""

    run_dir: Path
    cfg: RunConfig
    tokenizer: Tokenizer
    data: TrainData
    schedule: Schedule
    scaler: torch.amp.GradScaler  # fp16's loss scale is part of the run's state
    log: Callable
    warn: Callable
    pending: PendingSave | None = None
    group: object = None  # --async-checkpoint: the process group background writes use
    best: Best = field(default_factory=Best)  # the best evaluation so far: its checkpoint is never pruned

    def __post_init__(self) -> None:
        self.sharded = checkpoint_format(self.cfg.train) == "sharded"
        if self.sharded and self.cfg.train.async_checkpoint:
            self.group = dist.checkpoint_group()  # every rank, in the same order: a collective

    def restore(self, model: torch.nn.Module, state: RunState) -> dict | Path | None:
        """Load the newest intact checkpoint into the model, scaler, RNG and `state`; returns what `load_optimizer`
        takes once the optimizer exists: the optimizer state, or a sharded checkpoint's shards (model and optimizer
        both, loaded after wrapping); None for a new run, whose directory is made here."""
        t, world, run_dir = self.cfg.train, dist.world_size(), self.run_dir
        last, damaged = ckpt.resume_point(run_dir, warn=self.warn, verify=_verify_together)
        if last is None:
            self.log(f"{run_dir}: no checkpoint yet; starting the run from step 0")
            return None
        saved = ckpt.load_state(last)
        if (kind := saved.get("optimizer_kind", "adamw")) != t.optimizer:  # checkpoints before Muon: AdamW's
            raise ConfigError(f"{run_dir}: the run trains with --optimizer {kind} (its checkpoint holds that "
                              f"optimizer's state), not {t.optimizer}; resume with --optimizer {kind} or start a new "
                              "run")
        if saved["data_hash"] != self.data.data_hash:
            raise ConfigError(f"{run_dir}: the training data differs from the data the run started with "
                              f"(token hash {self.data.data_hash} vs {saved['data_hash']}); restore it or start a "
                              "new run")
        if dist.is_main():
            ckpt.set_aside(damaged, self.warn)
        sharded = ckpt.is_sharded(last)
        if not sharded:
            model.load_state_dict(load_model(last / ckpt.WEIGHTS, verify=False)[0].state_dict())  # verified just above
        if "scaler" in saved and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])
        state.load_state_dict(saved)
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        old_world, old_batch = saved.get("world_size", 1), saved.get("batch_size", t.batch_size)
        if (old_world, old_batch) != (world, t.batch_size):
            state.batch = state.batch * old_batch * old_world // (t.batch_size * world)  # same windows consumed
            self.log(f"resuming with {world} process(es) x batch {t.batch_size} (was {old_world} x {old_batch}): "
                     f"data position mapped to batch {state.batch} of epoch {state.epoch}; dropout streams re-seeded")
        else:
            set_rng_state(rngs[dist.rank()])
        if state.step >= self.schedule.total_steps:
            raise ConfigError(f"{run_dir}: the run already finished at step {state.step}; "
                              f"pass a larger --max-steps to extend it")
        self.best.load_state_dict(saved.get("best", {}))  # checkpoints before best.json: none yet
        if t.early_stop and self.best.stale >= t.early_stop:
            why = self.best.stopped_because(t.early_stop)
            raise ConfigError(f"{run_dir}: the run ended early at step {state.step} ({why}); to train on, resume "
                              "with a larger --early-stop, or --early-stop 0 for none")
        if dist.is_main() and self.best.step is not None:
            write_best(run_dir, self.best.record())  # as of the checkpoint resumed from
        self.log(f"resuming {run_dir} from step {state.step} ({human(state.tokens)} tokens seen), training to "
                 f"{self.schedule.total_steps}")
        return last / ckpt.SHARDS if sharded else saved["optimizer"]

    @staticmethod
    def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, restored: dict | Path) -> None:
        """What restore returned, into the wrapped model's optimizer (and, from shards, the model too)."""
        if isinstance(restored, Path):
            dist.load_sharded(model, optimizer, restored)
        else:
            dist.load_optimizer_state(model, optimizer, restored)

    def _saved(self, state: RunState, optim_state: dict | None) -> dict:
        t = self.cfg.train
        saved = dict(state.state_dict(), data_hash=self.data.data_hash, world_size=dist.world_size(),
                     batch_size=t.batch_size, optimizer_kind=t.optimizer, rng=dist.gather(rng_state()),
                     schedule=self.schedule.state_dict(), best=self.best.state_dict())
        if optim_state is not None:
            saved["optimizer"] = optim_state
        if self.scaler.is_enabled():
            saved["scaler"] = self.scaler.state_dict()
        return saved

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
        if self.sharded:
            return self._save_sharded(model, optimizer, state)
        # collectives first (every rank takes part), then rank 0 writes
        weights, optim_state = dist.full_model_state(model), dist.full_optimizer_state(model, optimizer)
        saved = self._saved(state, optim_state)
        if dist.is_main():
            ckpt.save_checkpoint(self.run_dir, state.step, dist.unwrap(model), self.tokenizer, saved,
                                 self.cfg.train.keep_last, weights=weights, run_config=self.cfg.to_toml(),
                                 keep=self.best.step)
            self._note_best(saved["best"], state.step)
        dist.barrier()

    def _note_best(self, best: dict, step: int) -> None:
        """best.json, once the checkpoint of a new best is committed (rank 0)."""
        if best.get("step") == step:
            write_best(self.run_dir, best)

    def _save_sharded(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
        """Every rank writes its shards (in the background with --async-checkpoint: sealed by the next save or
        by `finish`); rank 0 seals the checkpoint when all are written."""
        self.finish()  # one write at a time
        tmp = ckpt.sharded_tmp(self.run_dir, state.step)
        if dist.is_main():
            ckpt.begin_sharded(self.run_dir, state.step)
        dist.barrier()
        extra = {"step": state.step, "run_config": json.dumps(self.cfg.to_toml())}
        meta = ckpt.weights_metadata(dist.unwrap(model), self.tokenizer, extra)
        try:
            future = dist.save_sharded(model, optimizer, tmp / ckpt.SHARDS, self.cfg.train.async_checkpoint,
                                       self.group)
        except (OSError, RuntimeError, CheckpointException) as e:  # a full disk
            raise ckpt.write_failed(self.run_dir, state.step, tmp, e) from None
        self.pending = PendingSave(state.step, tmp, self._saved(state, None), meta, future)
        if future is None:
            self.finish()

    def finish(self) -> None:
        """Seal the sharded checkpoint being written, once every rank's shards are on disk (all ranks call it)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        failed = None
        if pending.future is not None:
            try:
                pending.future.result()
            except (OSError, RuntimeError, CheckpointException) as e:
                failed = e
        faults.point("ckpt-after-shards")
        digests = {} if failed else ckpt.shard_digests(pending.tmp, dist.rank())
        every = dist.gather((None if failed is None else str(failed) or repr(failed), digests))
        if errors := [error for error, _ in every if error]:  # one rank's write failed: every rank says so
            raise ckpt.write_failed(self.run_dir, pending.step, pending.tmp, RuntimeError(errors[0]))
        if dist.is_main():
            ckpt.finish_sharded(self.run_dir, pending.step, pending.tmp, pending.meta, pending.saved,
                                {k: v for _, d in every for k, v in d.items()}, self.cfg.train.keep_last,
                                keep=pending.saved["best"].get("step"))
            self._note_best(pending.saved["best"], pending.step)
        dist.barrier()


def checkpoint_format(t: TrainConfig) -> str:
    """--checkpoint-format, or its default: sharded under torchrun with FSDP2 or with --async-checkpoint, else full."""
    if t.checkpoint_format is not None:
        return t.checkpoint_format
    return "sharded" if (dist.is_distributed() and t.parallel == "fsdp") or t.async_checkpoint else "full"


def _verify_together(ckpt_dir: Path) -> None:
    """verify_checkpoint with the files shared among the ranks (each reads 1/W of a sharded checkpoint); the
    checkpoint is damaged for all when it is for one."""
    error = None
    try:
        ckpt.verify_checkpoint(ckpt_dir, part=(dist.rank(), dist.world_size()))
    except ckpt.CheckpointError as e:
        error = str(e)
    errors = [e for e in dist.gather(error) if e]
    if errors:
        raise ckpt.CheckpointError(errors[0])
