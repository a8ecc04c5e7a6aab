"""A mixture-of-experts feed-forward layer: a softmax top-k router over SwiGLU experts, dispatched by sorting.

The router (``gate``, a Linear without bias) scores each token against every expert; a softmax over the
experts gives probabilities, the k largest choose the token's experts and, renormalised to sum to 1 when
``norm_topk_prob``, weigh their outputs (minimind's MOEFeedForward, transformers' Qwen3MoeSparseMoeBlock).
Tokens are not bucketed per expert in a Python loop: the (token, slot) pairs are sorted by expert, each
expert runs once on its contiguous slice, and the outputs go back to their slots by the inverse order.

Balancing the load: minimind's auxiliary loss (``aux``), coef · E · sum_e f_e · P_e, with f_e the routed
slots of expert e per token and P_e its mean probability, which the model adds to the training loss; or
DeepSeek-V3's auxiliary-loss-free bias (``bias``): a per-expert bias added to the probabilities for the
choice only (not the weights), moved after each optimizer step towards equal load (``update_bias``).
Names are minimind's and Hugging Face's checkpoint names: ``gate.weight``, ``experts.{e}.gate_proj.weight``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Dropout, SwiGLU

BALANCES = ("aux", "bias")


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (probabilities (N, E) in fp32, chosen experts (N, k), their weights (N, k) fp32).

    The softmax is over the experts; the top k of the probabilities (plus `bias`, for the choice only) are
    chosen, and their probabilities are the weights, divided by their sum when norm_topk_prob."""
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    scores = probs if bias is None else probs + bias
    chosen = torch.topk(scores, k, dim=-1).indices  # (N, k)
    weights = probs.gather(1, chosen)  # (N, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, chosen, weights


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, coef: float) -> torch.Tensor:
    """minimind's auxiliary loss: coef · E · sum_e f_e · P_e, f_e = the routed slots of expert e per token (they sum
    to k), P_e = the mean router probability of e over the tokens (the only part with a gradient)."""
    n_experts = probs.size(-1)
    slots = torch.bincount(chosen.flatten(), minlength=n_experts).to(probs.dtype) / chosen.size(0)  # (E,)
    return (slots * probs.mean(0)).sum() * n_experts * coef


class MoE(nn.Module):
    """Router + n_experts SwiGLU experts of hidden_dim, each token sent to experts_per_token of them.

    After each forward, ``load`` holds the routed slots per expert (E,), detached; in training with the ``aux``
    balance, ``aux`` holds the load-balancing loss of that forward, which the model adds to its loss."""

    def __init__(self, emb_dim: int, hidden_dim: int, n_experts: int, experts_per_token: int, *,
                 norm_topk_prob: bool, aux_loss_coef: float, balance: str, bias_speed: float, drop_rate: float):
        super().__init__()
        self.n_experts, self.k, self.norm_topk_prob = n_experts, experts_per_token, norm_topk_prob
        self.aux_loss_coef, self.balance, self.bias_speed = aux_loss_coef, balance, bias_speed
        self.drop = Dropout(drop_rate)
        self.gate = Router(emb_dim, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(emb_dim, hidden_dim, 0.0) for _ in range(n_experts))
        if balance == "bias":  # a buffer: saved in checkpoints, moved by update_bias, never by the optimizer
            self.register_buffer("expert_bias", torch.zeros(n_experts))
        else:
            self.expert_bias = None
        self.load: torch.Tensor | None = None
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        probs, chosen, weights = route(self.gate(flat), self.k, self.norm_topk_prob, self.expert_bias)
        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)  # (E,)
        self.load = counts.detach()
        if self.training and self.balance == "aux":
            self.aux = load_balancing_loss(probs, chosen, self.aux_loss_coef)
        y = dispatch(flat, chosen, weights.to(x.dtype), self.experts, counts)  # (N, C)
        return self.drop(y.view(B, T, C))

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's step: each expert's bias moves by bias_speed, up when its load (E,) is below the mean,
        down when above."""
        load = load.to(self.expert_bias)
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_speed)


class Router(nn.Linear):
    """The router's Linear (a class of its own: Muon leaves it to AdamW, as it is no hidden matrix)."""


def dispatch(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList,
             counts: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] · experts[chosen[n, j]](x[n]) for each token n of x (N, C), without a loop over tokens:
    the N·k (token, slot) pairs sorted by expert, each expert run once on its contiguous slice (every expert, an
    empty slice too, so each has a gradient), the results put back in slot order and summed per token."""
    N, k = chosen.shape
    order = chosen.flatten().argsort(stable=True)  # (N·k,) slots grouped by expert
    xs = x[order // k]  # (N·k, C) each slot's token, in expert order
    ys = torch.cat([expert(part) for expert, part in zip(experts, xs.split(counts.tolist()))])  # (N·k, C)
    out = torch.empty_like(ys)
    out[order] = ys  # back to slot order: (N·k, C) = (N, k, C)
    return (out.view(N, k, -1) * weights[..., None]).sum(dim=1)  # (N, C)
