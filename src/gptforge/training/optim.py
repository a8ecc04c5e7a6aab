"""The optimizers (AdamW; Muon for the hidden matrices with AdamW for the rest) and the learning-rate schedule."""

from __future__ import annotations

import functools
import math
from collections import ChainMap
from collections.abc import Iterable

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..models import spec_for
from ..models.moe import Router
from ..runs.metrics import human

OPTIMIZERS = ("adamw", "muon")
WEIGHT_DECAY_ON = ("matrices", "all")
MUON_SINCE = "2.9"  # torch.optim.Muon first shipped in torch 2.9


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, weight_decay_on: str = "matrices"
                 ) -> list[dict]:
    """AdamW's two groups: decayed (parameters with 2 or more dimensions: matmul weights, embeddings; with
    weight_decay_on="all" every parameter, as torch.optim.AdamW(model.parameters()) decays) and the rest."""
    decay, no_decay = [], []
    for p in params:  # tied parameters appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": weight_decay if weight_decay_on == "all" else 0.0},
    ]


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float],
          device: torch.device, weight_decay_on: str = "matrices") -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")  # one fused kernel where PyTorch has one (CPU: ~10x the for-loop)
    return torch.optim.AdamW(param_groups(params, weight_decay, weight_decay_on), lr=lr, betas=betas,
                             fused=fused or None)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device,
    weight_decay_on: str = "matrices",
) -> torch.optim.AdamW:
    """AdamW over all of the model's parameters (a default run's optimizer, and the benchmark's)."""
    return adamw(model.parameters(), lr, weight_decay, betas, device, weight_decay_on)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Muon's parameters: the 2-D weights inside the transformer blocks (attention, GPT-2's fused c_attn
    as one matrix, MLP, each expert's three matrices); not the embeddings, the head (tied or not), norms, biases
    or a mixture of experts' router."""
    core = dist.unwrap(model)
    return [p for block in spec_for(core.cfg).blocks(core) for m in block.modules() if not isinstance(m, Router)
            for p in m.parameters(recurse=False) if p.dim() == 2 and p.requires_grad]


def check_optimizer(name: str) -> None:
    """Refuse --optimizer muon on a torch without torch.optim.Muon, before any work."""
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer muon needs torch.optim.Muon (torch {MUON_SINCE} or newer), this is torch "
                          f"{torch.__version__}; upgrade torch or use --optimizer adamw")


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch < 2.9: check_optimizer refuses first
    """torch.optim.Muon, with the Newton–Schulz orthogonalisation on the whole matrix under FSDP2
    (distributed.whole_matrix): each rank keeps momentum for its shard and applies its shard of the update.

    The step is torch's _single_tensor_muon, parameter by parameter: momentum as an EMA (buf.lerp_), Nesterov
    as grad.lerp(buf, momentum), decoupled weight decay lr * weight_decay, and the lr adjustment by shape.
    """

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        assert closure is None
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            orthogonalise = functools.partial(_zeropower_via_newtonschulz, ns_coefficients=group["ns_coefficients"],
                                              ns_steps=group["ns_steps"], eps=group["eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = dist.whole_matrix(orthogonalise, update)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest), so GradScaler,
    clipping, zero_grad and checkpoints take it as they take AdamW.

    The parts own their groups and state (no Optimizer.__init__: nothing is copied); `lr_scale` says each
    part's learning rate as a multiple of the schedule's (Muon: --muon-lr / --lr). Its state dict is
    {part name: the part's state dict}; distributed.py hands FSDP the list of parts (`parts`).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], lr_scale: dict[str, float]):
        self.optimizers, self.lr_scale, self.defaults = optimizers, lr_scale, {}

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())

    @property
    def param_groups(self) -> list[dict]:  # live: a part's load_state_dict replaces its group dicts
        return [g for o in self.parts for g in o.param_groups]

    @property
    def state(self) -> ChainMap:
        return ChainMap(*(o.state for o in self.parts))

    def step(self, closure=None):
        assert closure is None
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, o in self.optimizers.items():
            o.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        return f"Combined({', '.join(self.optimizers)})"


def build_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer from its TrainConfig `t`: AdamW, or Muon for the hidden matrices + AdamW for the rest."""
    betas = (t.beta1, t.beta2)
    if t.optimizer == "adamw":
        return make_optimizer(model, t.lr, t.weight_decay, betas, device, t.weight_decay_on)
    check_optimizer(t.optimizer)
    hidden = hidden_matrices(model)
    ids = {id(p) for p in hidden}
    parts = {"muon": Muon(hidden, lr=t.muon_lr, weight_decay=t.muon_weight_decay, momentum=t.muon_momentum,
                          nesterov=t.muon_nesterov),
             "adamw": adamw([p for p in model.parameters() if id(p) not in ids], t.lr, t.weight_decay, betas, device,
                            t.weight_decay_on)}
    return Combined(parts, {"muon": t.muon_lr / t.lr, "adamw": 1.0})


def describe_optimizer(optimizer: torch.optim.Optimizer, lr: float) -> str:
    """One line: which optimizer takes how many tensors and parameters, at what peak learning rate (`lr`: --lr)."""
    parts = optimizer.optimizers if isinstance(optimizer, Combined) else {"adamw": optimizer}
    scale = optimizer.lr_scale if isinstance(optimizer, Combined) else {"adamw": 1.0}

    def part(name: str) -> str:
        params = [p for g in parts[name].param_groups for p in g["params"]]
        return (f"{name} for {len(params)} {'matrices' if name == 'muon' else 'tensors'} "
                f"({human(sum(p.numel() for p in params))} parameters, lr {lr * scale[name]:g})")

    return "optimizer: " + ", ".join(part(name) for name in parts)


SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup reaches `lr` at step warmup_steps - 1. Then, by `schedule`: cosine decay reaches
    `min_lr` at the last step, total_steps - 1, and stays there; wsd (warmup-stable-decay) holds `lr`
    and decays linearly to `min_lr` over the last `decay_fraction` of the steps (so a run extended
    with more steps stays in its stable phase longer); constant holds `lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        start = max(warmup_steps, total_steps - decay_steps)  # the first step of the decay
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / (total_steps - start))
        return min_lr + (lr - min_lr) * (1.0 - progress)
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr if step < total_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group to the schedule's `lr`; a Combined optimizer's parts to their multiple of it (lr_scale)."""
    if isinstance(optimizer, Combined):
        for name, part in optimizer.optimizers.items():
            set_lr(part, lr * optimizer.lr_scale[name])
        return
    for group in optimizer.param_groups:
        group["lr"] = lr
