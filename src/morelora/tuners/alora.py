"""ALoRA (Liu et al., 2024): LoRA with a learnable diagonal, whose ranks are re-allocated across modules.

Each layer holds `max_rank` rank slots, of which a 0/1 mask marks the active ones (`r` at the start):

    delta(x) = (alpha / r) * B diag(lambda * mask) A dropout(x)          lambda: learnable, init ones

The importance of rank i is the first-order estimate of the loss change when it is removed,
|sum over tokens z_i dL/dz_i| with z = diag(lambda * mask) A x (equal to |lambda_i dL/dlambda_i|), kept as an
exponential moving average. It is read from a backward hook on z, so it needs no gradients at step end.
Every `prune_interval` steps in [prune_start, prune_end], `prune_and_reallocate` removes the least important
active ranks (over all layers) and gives the same number of ranks to the modules whose active ranks are most
important on average (a fresh slot: Kaiming A, zero B, lambda = 1). The total budget stays r per module.
The change is one matrix shared by all tasks: it merges and exports as a PEFT LoRA (active ranks only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import TaskAdapterLayer, TaskAdapterModel, kaiming_init_, lora_pair
from .common import LowRankConfig, check


@dataclass
class ALoRAConfig(LowRankConfig):
    """ALoRA: LoRA with a learnable diagonal; low-importance ranks are pruned and re-allocated in training."""

    r: int = field(default=8, metadata={"help": "Initial (and average) active rank per module."})
    lora_alpha: float = field(default=32, metadata={"help": "Scale alpha / r (fixed, whatever the active rank)."})
    max_rank: int | None = field(default=None, metadata={"help": "Rank slots per module; None: 2 * r."})
    prune_start: int = field(default=100, metadata={"help": "First step at which ranks are re-allocated."})
    prune_end: int = field(default=800, metadata={"help": "Last step at which ranks are re-allocated."})
    prune_interval: int = field(default=50, metadata={"help": "Steps between two re-allocations."})
    prune_ranks: int = field(default=4, metadata={"help": "Ranks pruned (and re-allocated) at each re-allocation."})
    min_rank: int = field(default=0, metadata={"help": "Pruning never takes a module below this active rank."})
    importance_beta: float = field(default=0.85, metadata={"help": "EMA factor of the rank importance."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_rank is None:
            self.max_rank = 2 * self.r
        check(isinstance(self.max_rank, int) and self.max_rank >= self.r,
              f"max_rank must be an integer >= r={self.r}, got {self.max_rank!r}")
        check(self.prune_interval >= 1, f"prune_interval must be >= 1, got {self.prune_interval}")
        check(self.prune_ranks >= 0, f"prune_ranks must be >= 0, got {self.prune_ranks}")
        check(0 <= self.min_rank <= self.r, f"min_rank must be in 0..r={self.r}, got {self.min_rank}")
        check(0.0 <= self.importance_beta < 1.0, f"importance_beta must be in [0, 1), got {self.importance_beta}")


class ALoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus `B diag(lambda * mask) A` with `max_rank` slots."""

    adapter_param_names = ("lora_A", "lora_B", "lora_lambda", "rank_mask", "importance")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: ALoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        slots = config.max_rank
        self.max_rank = slots
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, slots, config.init_lora_weights)
        self.lora_lambda = nn.Parameter(torch.ones(slots))
        mask = torch.zeros(slots)
        mask[: config.r] = 1.0
        self.register_buffer("rank_mask", mask)
        self.register_buffer("importance", torch.zeros(slots))
        self.register_buffer("importance_acc", torch.zeros(slots), persistent=False)
        self.to(base_layer.weight.device)

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)) * (self.lora_lambda * self.rank_mask).to(x.dtype)
        if self.training and z.requires_grad:
            value = z.detach()
            z.register_hook(lambda g: self._accumulate(value, g))
        return z, self.lora_B, self.scaling

    @torch.no_grad()
    def _accumulate(self, z: torch.Tensor, grad: torch.Tensor) -> None:
        self.importance_acc += (z.float() * grad.float()).reshape(-1, self.max_rank).sum(0).abs()

    @torch.no_grad()
    def fold_importance(self, beta: float) -> None:
        """importance <- beta * importance + (1 - beta) * (accumulated since the last call); masked ranks: 0."""
        self.importance.mul_(beta).add_(self.importance_acc, alpha=1 - beta).mul_(self.rank_mask)
        self.importance_acc.zero_()

    @property
    def active_rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def mean_importance(self) -> float:
        k = self.active_rank
        return float((self.importance * self.rank_mask).sum() / k) if k else 0.0

    @torch.no_grad()
    def prune(self, idx: int) -> None:
        self.rank_mask[idx] = 0.0
        self.importance[idx] = 0.0

    @torch.no_grad()
    def grow(self) -> int:
        """Activate a free slot (Kaiming A row, zero B column, lambda 1, importance = the mean): its index."""
        j = int((self.rank_mask == 0).nonzero()[0])
        mean = self.mean_importance()
        kaiming_init_(self.lora_A.data[j : j + 1])
        self.lora_B[:, j] = 0.0
        self.lora_lambda[j] = 1.0
        self.rank_mask[j] = 1.0
        self.importance[j] = mean
        return j

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same for every task: the active ranks, lambda folded into A."""
        idx = self.rank_mask.nonzero().flatten()
        if idx.numel() == 0:
            return self.lora_A.new_zeros(1, self.in_features), self.lora_B.new_zeros(self.out_features, 1), 1.0
        return self.lora_A[idx] * self.lora_lambda[idx, None], self.lora_B[:, idx], self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, max_rank={self.max_rank}"


class ALoRAModel(TaskAdapterModel):
    """ALoRA on every target layer; shared by all tasks. The trainer calls `on_step_end(step)` every step."""

    method_name = "alora"
    config_class = ALoRAConfig
    layer_class = ALoRALinear

    def on_step_end(self, step: int) -> None:
        """Fold the importance gathered since the last step; re-allocate ranks on the schedule."""
        for _, layer in self.adapter_layers():
            layer.fold_importance(self.config.importance_beta)
        c = self.config
        if c.prune_start <= step <= c.prune_end and (step - c.prune_start) % c.prune_interval == 0:
            self.prune_and_reallocate(step)

    @torch.no_grad()
    def prune_and_reallocate(self, step: int) -> list[tuple[str, str]]:
        """Move up to `prune_ranks` ranks from the least important ranks to the most important modules.

        Returns the moves as (pruned module, receiving module). A module that gives a rank does not receive one
        in the same call and vice versa; a move happens only when some other module has a free slot.
        """
        layers = dict(self.adapter_layers())
        givers: set[str] = set()
        takers: set[str] = set()
        moves: list[tuple[str, str]] = []
        for _ in range(self.config.prune_ranks):
            candidates = [(float(layer.importance[i]), name, int(i)) for name, layer in layers.items()
                          if name not in takers and layer.active_rank > self.config.min_rank
                          for i in layer.rank_mask.nonzero().flatten()]
            if not candidates:
                break
            _, src, idx = min(candidates)
            receivers = [(layer.mean_importance(), name) for name, layer in layers.items()
                         if name not in givers | {src} and layer.active_rank < layer.max_rank]
            if not receivers:
                break
            _, dst = max(receivers)
            layers[src].prune(idx)
            layers[dst].grow()
            givers.add(src)
            takers.add(dst)
            moves.append((src, dst))
        return moves

    def rank_allocation(self) -> dict[str, int]:
        """{module name: active rank}."""
        return {name: layer.active_rank for name, layer in self.adapter_layers()}

    def parameter_counts(self) -> dict[str, float]:
        """As the base, but `adapter` / `per_task` count the active ranks (r (d_in + d_out + 1) per rank set);
        `adapter_allocated` counts every slot."""
        counts = super().parameter_counts()
        active = sum(layer.active_rank * (layer.in_features + layer.out_features + 1)
                     for _, layer in self.adapter_layers())
        counts["adapter_allocated"] = counts["adapter"]
        counts["adapter"] = active
        counts["per_task"] = active / max(self.num_tasks, 1)
        return counts

    def _extra_metadata(self) -> dict[str, Any]:
        return {"rank_allocation": self.rank_allocation()}
