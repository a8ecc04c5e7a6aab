"""The training loop: one function, read top to bottom."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import faults
from .config import ConfigError
from .data import (
    Batches,
    RandomBatches,
    TokenWindows,
    check_windows,
    open_prepared,
    prepared_dir,
    read_texts,
    split_tokens,
    tokenize_documents,
    tokens_digest,
    training_batches,
)
from .devices import pick_device
from .evaluate import evaluate, loss_batch, perplexity
from .generate import SampleConfig, sample_text
from .loggers import check_loggers, open_trackers
from .models import build, spec_for
from .optim import lr_at, make_optimizer, set_lr
from .perf import keep_freed_cpu_memory, mfu, peak_flops
from .report import MetricsLog, Progress, format_eval, human, plot_losses
from .runconfig import RunConfig, TrainConfig
from .tokenizer import Tokenizer, get_tokenizer
from .weights import load_any, load_model


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and what to change."""


@contextlib.contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag instead of killing the run: the loop finishes its step, saves, exits.

    A second signal of the same kind while the flag is set falls back to the usual behaviour.
    """
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if requested:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
        requested.append(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class Precision:
    """A device's number format for training: the autocast context and, for fp16, a GradScaler."""

    def __init__(self, name: str, device: torch.device):
        if name == "auto":
            if device.type == "cuda":
                name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                name = "fp32"  # CPUs without bf16 matrix units are fastest (and exact) in fp32
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")
        self.name = name
        if device.type == "cuda":  # fp32 matmuls on tensor cores (TF32)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def backward(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grad_accum: int = 1) -> float:
        """Forward and backward of one micro-batch (gradients add up); returns its share of the step's loss."""
        with self.autocast:
            loss = loss_batch(model, x, y) / grad_accum
        self.scaler.scale(loss).backward()
        return loss.item()

    def clip(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
        """Unscale (fp16) and clip the gradients; returns their global norm before clipping."""
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    def update(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches, grad_clip: float,
             grad_accum: int = 1) -> tuple[float, float]:
        """One whole optimizer step of one process (as the benchmark times it): returns (loss, grad norm)."""
        loss_sum = sum(self.backward(model, x, y, grad_accum) for x, y in micro_batches)
        grad_norm = self.clip(model, optimizer, grad_clip)
        self.update(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm


def describe_model(model: torch.nn.Module) -> str:
    n = model.num_params()
    head = "tied head" if model.cfg.tie_weights else "untied head"
    arch = spec_for(model.cfg).arch
    positions = (f"; {model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings"
                 if spec_for(model.cfg).learned_positions else "")
    return f"model: {arch}, {n / 1e6:.2f}M parameters ({head}{positions}), {n * 4 / 1e6:.1f} MB in fp32"


def load_splits(cfg: RunConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if (data_dir := prepared_dir(cfg.inputs)) is not None:  # shards, memory-mapped; this rank's share of train
        return open_prepared(data_dir, tokenizer, dist.rank(), dist.world_size())
    tokens = tokenize_documents(read_texts(cfg.inputs), tokenizer)
    return split_tokens(tokens, cfg.data.val_fraction)


# ----------------------------------------------------------------------------- the pieces train() calls


@dataclass
class TrainData:
    """What a run trains and evaluates on: this rank's batches, the evaluation sets, the data's hash."""

    batches: Batches | RandomBatches
    eval_sets: dict[str, Batches]
    data_hash: str
    summary: str  # the log line describing the data


def build_data(cfg: RunConfig, tokenizer) -> TrainData:
    t, world = cfg.train, dist.world_size()
    train_tokens, val_tokens = load_splits(cfg, tokenizer)
    ctx = cfg.model.context_length
    train_windows = TokenWindows(train_tokens, ctx, cfg.data.stride)
    val_windows = TokenWindows(val_tokens, ctx, cfg.data.stride)
    batches = training_batches(train_windows, cfg.data.sampling, t.batch_size, t.seed, dist.rank(), world)
    check_windows(train_windows, len(train_tokens), "train", t.batch_size * batches.world if isinstance(
        batches, Batches) else t.batch_size, drop_last=True)
    if cfg.data.val_fraction > 0 and prepared_dir(cfg.inputs) is None:  # prepared data: its own split
        check_windows(val_windows, len(val_tokens), "val", t.batch_size, drop_last=False)
    # evaluation scores whole global batches on every rank: the same numbers whatever the world size
    eval_sets = {"train": Batches(train_windows, t.batch_size * world, shuffle=False, drop_last=True)}
    if len(val_windows):
        eval_sets["val"] = Batches(val_windows, t.batch_size * world, shuffle=False, drop_last=False)
    if len(batches) < t.grad_accum and t.max_steps is None:
        raise ConfigError(f"one epoch has {len(batches)} batches, fewer than --grad-accum {t.grad_accum}; "
                          "lower --grad-accum or --batch-size, or set --max-steps")
    summary = (f"data: {human(len(train_tokens))} train tokens ({len(train_windows)} windows), "
               f"{human(len(val_tokens))} val tokens ({len(val_windows)} windows); "
               f"{len(batches)} batches of {t.batch_size * world} per epoch"
               + (f" ({world} processes x {t.batch_size}, {t.parallel})" if world > 1 else ""))
    return TrainData(batches, eval_sets, tokens_digest(train_tokens), summary)


@dataclass
class Schedule:
    """The run's length and learning-rate schedule: linear warmup, cosine decay to min_lr."""

    lr: float
    min_lr: float
    warmup: int
    total_steps: int

    @classmethod
    def plan(cls, t: TrainConfig, batches_per_epoch: int) -> Schedule:
        total = t.max_steps or t.epochs * (batches_per_epoch // t.grad_accum)
        return cls(t.lr, t.min_lr if t.min_lr is not None else t.lr / 10,
                   t.warmup_steps if t.warmup_steps is not None else max(1, total // 20), total)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.total_steps)

    def state_dict(self) -> dict:
        return dict(lr=self.lr, min_lr=self.min_lr, warmup=self.warmup, total_steps=self.total_steps)


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


def build_model(cfg: RunConfig, device: torch.device, resume: bool, log) -> torch.nn.Module:
    """Random initial weights from the seed, or --init-from's weights (a resumed run loads its own later)."""
    if cfg.init_from and not resume:

        model = load_any(cfg.init_from, device, context_length=cfg.model.context_length,
                         drop_rate=cfg.model.drop_rate)[0]
        if model.cfg != cfg.model:
            raise ConfigError(f"the model in {cfg.init_from} ({model.cfg}) differs from the run's model config "
                              f"({cfg.model}); use weights.init_model_config to build the config")
        log(f"initialised from {cfg.init_from}")
    else:
        model = build(cfg.model).to(device)
    if dist.world_size() > 1:
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank())  # same initial weights, a dropout stream per rank
    if cfg.train.activation_checkpointing:
        dist.checkpoint_blocks(model)
    return model


@dataclass
class Checkpointer:
    """Saving a run's checkpoints and picking a resumed run up from the newest intact one."""

    run_dir: Path
    cfg: RunConfig
    tokenizer: Tokenizer
    data: TrainData
    schedule: Schedule
    amp: Precision
    log: Callable
    warn: Callable

    def restore(self, model: torch.nn.Module, state: RunState) -> dict | None:
        """Load the newest intact checkpoint into the model, scaler, RNG and `state`; returns the optimizer
        state to load once the optimizer exists (None for a new run, whose directory is made here)."""
        t, world, run_dir = self.cfg.train, dist.world_size(), self.run_dir
        last, damaged = ckpt.resume_point(run_dir, warn=self.warn)
        if last is None:
            self.log(f"{run_dir}: no checkpoint yet; starting the run from step 0")
            return None
        saved = ckpt.load_state(last)
        if saved["data_hash"] != self.data.data_hash:
            raise ConfigError(f"{run_dir}: the training data differs from the data the run started with "
                              f"(token hash {self.data.data_hash} vs {saved['data_hash']}); restore it or start a "
                              "new run")
        if dist.is_main():
            ckpt.set_aside(damaged, self.warn)
        model.load_state_dict(load_model(last / ckpt.WEIGHTS)[0].state_dict())  # verified just above
        if "scaler" in saved and self.amp.scaler.is_enabled():
            self.amp.scaler.load_state_dict(saved["scaler"])
        state.load_state_dict(saved)
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        old_world, old_batch = saved.get("world_size", 1), saved.get("batch_size", t.batch_size)
        if (old_world, old_batch) != (world, t.batch_size):
            state.batch = state.batch * old_batch * old_world // (t.batch_size * world)  # same windows consumed
            self.log(f"resuming with {world} process(es) x batch {t.batch_size} (was {old_world} x {old_batch}): "
                     f"data position mapped to batch {state.batch} of epoch {state.epoch}; dropout streams re-seeded")
        else:
            ckpt.set_rng_state(rngs[dist.rank()])
        if state.step >= self.schedule.total_steps:
            raise ConfigError(f"{run_dir}: the run already finished at step {state.step}; "
                              f"pass a larger --max-steps to extend it")
        self.log(f"resuming {run_dir} from step {state.step} ({human(state.tokens)} tokens seen), training to "
                 f"{self.schedule.total_steps}")
        return saved["optimizer"]

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
        # collectives first (every rank takes part), then rank 0 writes
        weights, optim_state = dist.full_model_state(model), dist.full_optimizer_state(model, optimizer)
        rngs = dist.gather(ckpt.rng_state())
        if dist.is_main():
            t = self.cfg.train
            saved = dict(state.state_dict(), data_hash=self.data.data_hash, world_size=dist.world_size(),
                         batch_size=t.batch_size, optimizer=optim_state, rng=rngs,
                         schedule=self.schedule.state_dict())
            if self.amp.scaler.is_enabled():
                saved["scaler"] = self.amp.scaler.state_dict()
            ckpt.save_checkpoint(self.run_dir, state.step, dist.unwrap(model), self.tokenizer, saved, t.keep_last,
                                 weights=weights, run_config=self.cfg.to_toml())
        dist.barrier()


@dataclass
class Evaluator:
    """Evaluation at a step: train/val loss, a sample, metrics.jsonl, trackers and loss.png."""

    cfg: RunConfig
    tokenizer: Tokenizer
    data: TrainData
    schedule: Schedule
    metrics: MetricsLog
    trackers: object
    progress: Progress
    run_dir: Path
    device: torch.device

    def __call__(self, model: torch.nn.Module, state: RunState) -> dict:
        t, step = self.cfg.train, state.step
        losses = {f"{name}_loss": evaluate(model, b, t.eval_batches, self.device).loss
                  for name, b in self.data.eval_sets.items()}
        # every rank scores the same batches (FSDP needs all ranks in each forward), so the losses agree
        record = dict(event="eval", step=step, tokens=state.tokens, lr=self.schedule.lr_at(max(step - 1, 0)),
                      **losses)
        if "val_loss" in losses:
            record["val_perplexity"] = perplexity(losses["val_loss"])
        self.progress.write(format_eval(step, state.tokens, losses.get("train_loss"), losses.get("val_loss")))
        if t.sample_tokens > 0:  # its own seeded generator: the training RNG stays untouched
            sample_cfg = SampleConfig(t.sample_tokens, t.sample_temperature, t.sample_top_k)
            text = sample_text(dist.unwrap(model), self.tokenizer, t.sample_prompt, sample_cfg, seed=t.seed + step,
                               device=self.device)[0]
            record["sample"] = t.sample_prompt + text
            self.progress.write(f"  sample: {record['sample']!r}")
        self.metrics.log(**record)
        if dist.is_main():
            self.trackers.log(self.metrics.records[-1])
            plot_losses(self.metrics.records, self.run_dir / "loss.png")
        return record


@dataclass
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float
    finite: bool
    stop_requested: bool  # on any rank
    save_due: bool  # rank 0's --save-every-minutes clock


def train_step(model, step_model, optimizer, amp: Precision, t: TrainConfig, data: TrainData, state: RunState,
               device: torch.device, stop: list, save_due: bool) -> StepResult:
    """One optimizer step of the whole job: micro-batches, clipping, one all-reduce, the update (if finite)."""
    loss_sum = 0.0
    try:
        for micro in range(t.grad_accum):
            x, y = state.next_batch(data.batches, device)
            with dist.grad_sync(model, sync=micro == t.grad_accum - 1):  # reduce on the last micro-step
                loss_sum += amp.backward(step_model, x, y, t.grad_accum)
        faults.point("step-mid")
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of memory at step {state.step + 1} with micro-batch {t.batch_size}: keep the global batch with a "
            f"smaller micro-batch and more accumulation, e.g. --batch-size {max(1, t.batch_size // 2)} "
            f"--grad-accum {t.grad_accum * 2}"
        ) from None
    grad_norm = amp.clip(model, optimizer, t.grad_clip)
    # one all-reduce: the mean loss over ranks, whether any rank was asked to stop, and rank 0's clock
    loss_total, stop_votes, save_votes = dist.all_sum([loss_sum, float(bool(stop)), float(save_due)], device)
    loss = loss_total / dist.world_size()
    # fp16: an overflowing gradient is the GradScaler's to skip (it lowers its scale), not an error
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or amp.scaler.is_enabled())
    if finite:
        amp.update(optimizer)
    elif not t.skip_nonfinite:  # stop before the bad update: no NaN ever reaches a checkpoint
        raise TrainingError(f"non-finite loss or gradient at step {state.step + 1} (loss {loss}, grad norm "
                            f"{float(grad_norm)}); lower --lr, keep --grad-clip on, or pass --skip-nonfinite")
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, finite, stop_votes > 0, bool(save_votes))


def log_step(result: StepResult, state: RunState, lr: float, tok_s: float, mfu: float | None, t: TrainConfig,
             metrics: MetricsLog, trackers, progress: Progress) -> None:
    if not result.finite:
        progress.write(f"step {state.step}: non-finite loss or gradient, update skipped")
        metrics.log(event="skipped", step=state.step, tokens=state.tokens, lr=lr)
    elif state.step % t.log_every == 0:
        metrics.log(event="train", step=state.step, tokens=state.tokens, lr=lr, train_loss=result.loss,
                    grad_norm=result.grad_norm, tokens_per_s=round(tok_s, 1),
                    mfu=round(mfu, 4) if mfu is not None else None)
        trackers.log(metrics.records[-1])


def tokens_per_step(cfg: RunConfig) -> int:
    """Training tokens in one optimizer step of the whole job (the global batch)."""
    t = cfg.train
    return t.batch_size * t.grad_accum * cfg.model.context_length * dist.world_size()


def describe_run(cfg: RunConfig, core: torch.nn.Module, data: TrainData, schedule: Schedule, device, amp: Precision,
                 run_dir: Path, log) -> tuple[float, float | None]:
    """The start-up lines (model, data, schedule, speed); returns (FLOPs per token, peak FLOP/s or None)."""
    t = cfg.train
    log(describe_model(core))
    log(data.summary)
    log(f"training: {schedule.total_steps} steps of {human(tokens_per_step(cfg))} tokens on {device}, lr {t.lr:g} "
        f"(warmup {schedule.warmup}, cosine to {schedule.min_lr:g}) -> {run_dir}")
    fpt = spec_for(cfg.model).flops_per_token(cfg.model)
    peak, peak_source = peak_flops(device, amp.name)
    log(f"speed: precision {amp.name}, {fpt / 1e6:.1f} MFLOP per token; "
        + (f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source))
    return fpt, peak


# ----------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train (or resume) the run in run_dir; returns a summary of the last evaluation."""
    t, run_dir = cfg.train, Path(run_dir)
    device = dist.setup(pick_device(t.device))
    if device.type == "cpu":
        keep_freed_cpu_memory()  # no page faults for the step's large tensors after the first steps
    main = dist.is_main()
    log = log if main else (lambda *args, **kwargs: None)  # only rank 0 prints, plots and writes
    warn = (lambda message: print(message, file=sys.stderr, flush=True)) if main else (lambda message: None)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; set --vocab-size to at least that")
    torch.manual_seed(t.seed)
    check_loggers(t.logger)

    data = build_data(cfg, tokenizer)
    schedule = Schedule.plan(t, len(data.batches))
    model = build_model(cfg, device, resume, log)  # the optimizer comes after wrapping: FSDP replaces parameters
    amp = Precision(t.precision, device)
    state, checkpointer = RunState(), Checkpointer(run_dir, cfg, tokenizer, data, schedule, amp, log, warn)
    optimizer_state = checkpointer.restore(model, state) if resume else None
    resumed = optimizer_state is not None
    if main and not resumed:
        run_dir.mkdir(parents=True, exist_ok=True)
    model = dist.wrap(model, device, t.parallel)
    core = dist.unwrap(model)  # the GPT itself: evaluation, sampling, saving (no _orig_mod. prefixes)
    step_model = torch.compile(model) if t.compile else model  # what the training step calls
    optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device)
    if resumed:
        dist.load_optimizer_state(model, optimizer, optimizer_state)
    if main:
        ckpt.atomic_write_bytes(run_dir / ckpt.CONFIG, _toml_bytes(cfg))
    metrics = MetricsLog(run_dir / ckpt.METRICS if main else None, resume_step=state.step if resumed else -1,
                         warn=warn)
    trackers = open_trackers(t.logger, run_dir, cfg.to_toml(), resume_step=state.step if resumed else None)
    fpt, peak = describe_run(cfg, core, data, schedule, device, amp, run_dir, log)
    progress = Progress(schedule.total_steps, state.step, enabled=t.progress and main, quiet=not main,
                        flops_per_token=fpt, peak_flops=peak)
    evaluator = Evaluator(cfg, tokenizer, data, schedule, metrics, trackers, progress, run_dir, device)

    step_tokens = tokens_per_step(cfg)
    last_eval = evaluator(model, state) if state.step == 0 else {}
    save_every = t.save_every or t.eval_every
    model.train()
    train_seconds, start_step, stopping, last_save = 0.0, state.step, False, time.monotonic()
    with stop_requests() as stop:
        while state.step < schedule.total_steps and not stopping:
            t0 = time.perf_counter()
            lr = schedule.lr_at(state.step)
            set_lr(optimizer, lr)
            save_due = main and t.save_every_minutes is not None and \
                time.monotonic() - last_save >= 60 * t.save_every_minutes
            result = train_step(model, step_model, optimizer, amp, t, data, state, device, stop, save_due)
            stopping = result.stop_requested
            state.step, state.tokens = state.step + 1, state.tokens + step_tokens
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            tok_s = progress.step(result.loss, step_tokens, seconds, lr)
            log_step(result, state, lr, tok_s, mfu(fpt, tok_s, peak), t, metrics, trackers, progress)
            if state.step % t.eval_every == 0 or state.step == schedule.total_steps:
                last_eval = evaluator(model, state)
            if state.step % save_every == 0 or state.step == schedule.total_steps or stopping or result.save_due:
                checkpointer.save(model, optimizer, state)
                last_save = time.monotonic()
    progress.close()
    trackers.close()
    stopped_by = (stop[0] if stop else "a signal to another rank") if stopping and \
        state.step < schedule.total_steps else None
    if stopped_by:
        log(f"stopped by {stopped_by} at step {state.step}; checkpoint saved, continue with --resume {run_dir}")
    return dict(last_eval, steps=state.step, train_seconds=train_seconds, stopped_by=stopped_by,
                tokens_per_s=(state.step - start_step) * step_tokens / max(train_seconds, 1e-9))


def _toml_bytes(cfg: RunConfig) -> bytes:
    import tomli_w

    return tomli_w.dumps(cfg.to_toml()).encode()
