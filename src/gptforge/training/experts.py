"""A training step's mixture-of-experts routing: its load-balancing loss and the load of every expert, summed over
the step's micro-batches and all ranks; what metrics.jsonl logs of them; and the routing-bias update
(--router-balance bias) that follows each optimizer step; and the warning for a collapsed router."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed as dist
from ..models.moe import MoE


class ExpertLoad:
    """The routing of one optimizer step of a model with mixture-of-experts layers (`of` gives None without)."""

    def __init__(self, layers: list[MoE]):
        self.layers = layers
        self.aux = 0.0  # the step's load-balancing loss, the mean over ranks (as the step's loss)
        self.counts = torch.zeros(len(layers), layers[0].n_experts, dtype=torch.float64)  # (L, E) routed slots
        self.sums: torch.Tensor | None = None  # on the model's device: this rank's aux share, then its counts

    @classmethod
    def of(cls, model: torch.nn.Module) -> ExpertLoad | None:
        layers = [m for m in dist.unwrap(model).modules() if isinstance(m, MoE)]
        return cls(layers) if layers else None

    def add(self, divisor: float) -> None:
        """Count the micro-batch the model just ran forward (its loss divided by divisor, as the step's), on the
        device: no wait for it until the step's all-reduce."""
        load = torch.stack([m.load for m in self.layers]).double()  # (L, E)
        aux = sum((m.aux.detach().double() for m in self.layers if m.aux is not None), load.new_zeros(()))
        row = torch.cat([(aux / divisor).reshape(1), load.flatten()])
        self.sums = row if self.sums is None else self.sums + row

    def values(self) -> list[float]:
        """What the step's all-reduce sums over ranks: the loss share, then the counts."""
        return self.sums.tolist()

    def finish(self, summed: list[float], applied: bool) -> dict:
        """Take the sums over ranks; move the routing biases (when the step's update was applied); returns the
        metrics record's part: aux_loss (the mean over ranks, as the loss) and expert_load, per layer the
        fraction of the step's routed slots each expert took."""
        self.aux = summed[0] / dist.world_size()
        self.counts = torch.tensor(summed[1:], dtype=torch.float64).view_as(self.counts)
        if applied:
            for layer, load in zip(self.layers, self.counts):
                if layer.balance == "bias":
                    layer.update_bias(load)
        share = self.counts / self.counts.sum(dim=1, keepdim=True).clamp(min=1)
        record = {"expert_load": [[round(f, 4) for f in row] for row in share.tolist()]}
        if any(layer.balance == "aux" for layer in self.layers):
            record["aux_loss"] = self.aux
        return record


@dataclass
class CollapseWatch:
    """One warning line for a collapsed router: one expert took over 90% of a layer's tokens in the last train
    record (expert_load) at each of 3 evaluations in a row."""

    experts_per_token: int = 1
    streak: int = 0
    warned: bool = False

    def observe(self, records: list[dict]) -> str | None:
        load = next((r["expert_load"] for r in reversed(records) if "expert_load" in r), None)
        if load is None or self.warned:
            return None
        tokens = [[share * self.experts_per_token for share in layer] for layer in load]  # fraction of tokens
        collapsed = [(i, max(range(len(row)), key=row.__getitem__), max(row)) for i, row in enumerate(tokens)
                     if max(row) > 0.9]
        self.streak = self.streak + 1 if collapsed else 0
        if self.streak < 3:
            return None
        self.warned = True
        layer, expert, share = collapsed[0]
        return (f"warning: the router of layer {layer} has collapsed: expert {expert} took {share:.0%} of its tokens "
                f"at 3 evaluations in a row ({len(collapsed)} layer(s) so); raise --router-aux-loss-coef or use "
                "--router-balance bias")
