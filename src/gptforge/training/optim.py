"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay every parameter with 2 or more dimensions (matmul weights, embeddings); not biases or norms."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")  # one fused kernel where PyTorch has one (CPU: ~10x the for-loop)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


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
    for group in optimizer.param_groups:
        group["lr"] = lr
