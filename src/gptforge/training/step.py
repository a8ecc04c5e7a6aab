"""One optimizer step: the number format (Precision: autocast, fp16's GradScaler, clipping, the update),
train_step (micro-batches, one all-reduce, the non-finite check), the stop-signal flag, TrainingError; and
timing steps (RandomSteps, time_steps: what `bench train`, `plan` and `train --minutes` measure)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import distributed as dist
from .. import faults
from ..config import ConfigError
from ..errors import TrainingError
from ..evaluate import loss_batch
from ..models import build
from ..ops import IGNORE_INDEX
from ..perf import sync
from .config import TrainConfig
from .experts import ExpertLoad
from .optim import build_optimizer
from .state import RunState, TrainData


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

    def backward(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grad_accum: float = 1,
                 eot_id: int | None = None) -> float:
        """Forward and backward of one micro-batch (gradients add up); returns its share of the step's loss: its
        mean loss / grad_accum (train_step's loss_divisors). eot_id: --document-mask (loss_batch)."""
        with self.autocast:
            loss = loss_batch(model, x, y, eot_id) / grad_accum
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
             grad_accum: int = 1, eot_id: int | None = None) -> tuple[float, float]:
        """One whole optimizer step of one process (as the benchmark times it): returns (loss, grad norm)."""
        loss_sum = sum(self.backward(model, x, y, grad_accum, eot_id) for x, y in micro_batches)
        grad_norm = self.clip(model, optimizer, grad_clip)
        self.update(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm


DOCUMENT_TOKENS = 256  # RandomSteps with an end-of-text id: the mean length of its random documents


@dataclass
class RandomSteps:
    """Optimizer steps of a freshly built model on fixed random tokens, set up as train() sets a run up: the seed,
    activation checkpointing, torch.compile, the run's optimizer (AdamW or Muon) and precision, --grad-accum
    micro-batches of --batch-size windows, and --document-mask's end-of-text id (placed at random: documents of
    DOCUMENT_TOKENS on average). Calling it takes one step."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # the compiled model with --compile
    optimizer: torch.optim.Optimizer
    amp: Precision
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    grad_clip: float
    eot_id: int | None = None

    @classmethod
    def setup(cls, model_cfg, t: TrainConfig, device: torch.device, eot_id: int | None = None) -> RandomSteps:
        torch.manual_seed(t.seed)
        model = build(model_cfg).to(device)
        model.attention = t.attention
        if t.activation_checkpointing:
            dist.checkpoint_blocks(model)
        g = torch.Generator().manual_seed(t.seed)
        shape = (t.batch_size, model_cfg.context_length)
        micro_batches = []
        for _ in range(t.grad_accum):
            x, y = (torch.randint(0, model_cfg.vocab_size, shape, generator=g) for _ in "xy")
            if eot_id is not None:  # packed documents of about DOCUMENT_TOKENS tokens each
                x[torch.rand(shape, generator=g) < 1 / DOCUMENT_TOKENS] = eot_id
            micro_batches.append((x.to(device), y.to(device)))
        model.train()
        return cls(model, torch.compile(model) if t.compile else model, build_optimizer(model, t, device),
                   Precision(t.precision, device), micro_batches, t.grad_clip, eot_id)

    def __call__(self) -> float:
        """One optimizer step; returns its loss."""
        return self.amp.step(self.step_model, self.optimizer, self.micro_batches, self.grad_clip,
                             len(self.micro_batches), self.eot_id)[0]


def time_steps(step: Callable[[], float], steps: int, warmup: int, device: torch.device,
               log: Callable[[str], None] | None = None) -> list[float]:
    """Seconds of each of `steps` calls of step() after `warmup` untimed ones, the device synchronised around each;
    with `log`, one line per call (its time and loss)."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        if log is not None:
            log(f"{'warmup' if i < warmup else 'step'} {i + 1}: {dt * 1000:.0f} ms, loss {loss:.3f}")
    return times


@dataclass
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float
    finite: bool
    stop_requested: bool  # on any rank
    save_due: bool  # rank 0's --save-every-minutes clock
    tokens: int  # scored training tokens of the step, all ranks: the global batch, less padding (--packing pad)
    experts: dict = field(default_factory=dict)  # mixture of experts: aux_loss, expert_load (training/experts.py)


def loss_divisors(counts: list[int], grad_accum: int, padded: bool, device: torch.device) -> list[float]:
    """What each micro-batch's mean loss is divided by, so that the step's gradient is the mean over the scored
    targets of the whole job. Full rows: grad_accum. With padding (--packing pad) micro-batches score different
    numbers of targets: the job's scored targets over this micro-batch's, times the world size (DDP and FSDP
    average gradients over ranks), so that accumulation and ranks weigh each target alike and 2 processes = 1."""
    if not padded:
        return [grad_accum] * len(counts)
    assert all(counts), counts  # every padded row scores at least its EOS
    (total,) = dist.all_sum([float(sum(counts))], device)
    return [total / (count * dist.world_size()) for count in counts]


def train_step(model, step_model, optimizer, amp: Precision, t: TrainConfig, data: TrainData, state: RunState,
               device: torch.device, stop: list, save_due: bool) -> StepResult:
    """One optimizer step of the whole job: micro-batches, clipping, one all-reduce, the update (if finite). The
    loss is the cross-entropy; a mixture of experts' load-balancing loss, trained with it, is logged apart."""
    loss_sum, experts = 0.0, ExpertLoad.of(model)
    try:
        micro_batches = [state.next_batch(data.batches, device) for _ in range(t.grad_accum)]
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro_batches]  # y.numel() but for padding
        divisors = loss_divisors(counts, t.grad_accum, data.padded, device)
        for micro, ((x, y), divisor) in enumerate(zip(micro_batches, divisors)):
            with dist.grad_sync(model, sync=micro == t.grad_accum - 1):  # reduce on the last micro-step
                loss_sum += amp.backward(step_model, x, y, divisor, data.eot_id)
            if experts is not None:
                experts.add(divisor)
        faults.point("step-mid")
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of memory at step {state.step + 1} with micro-batch {t.batch_size}: keep the global batch with a "
            f"smaller micro-batch and more accumulation, e.g. --batch-size {max(1, t.batch_size // 2)} "
            f"--grad-accum {t.grad_accum * 2}"
        ) from None
    grad_norm = amp.clip(model, optimizer, t.grad_clip)
    # one all-reduce: the mean loss over ranks, whether any rank was asked to stop, rank 0's clock, scored tokens
    loss_total, stop_votes, save_votes, scored_total, *routing = dist.all_sum(
        [loss_sum, float(bool(stop)), float(save_due), float(sum(counts)), *(experts.values() if experts else ())],
        device)
    loss = loss_total / dist.world_size()
    # fp16: an overflowing gradient is the GradScaler's to skip (it lowers its scale), not an error
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or amp.scaler.is_enabled())
    if finite:
        amp.update(optimizer)
    elif not t.skip_nonfinite:  # stop before the bad update: no NaN ever reaches a checkpoint
        raise TrainingError(f"non-finite loss or gradient at step {state.step + 1} (loss {loss}, grad norm "
                            f"{float(grad_norm)}); lower --lr, keep --grad-clip on, or pass --skip-nonfinite")
    optimizer.zero_grad(set_to_none=True)
    routed = experts.finish(routing, applied=finite) if experts else {}
    loss -= routed.get("aux_loss", 0.0)  # the cross-entropy, comparable with val_loss
    return StepResult(loss, grad_norm, finite, stop_votes > 0, bool(save_votes), round(scored_total), routed)


