"""LoRAMoE (Dou et al., 2023): dense token-routed LoRA experts on the FFN with a localized balancing constraint.

Experts form two groups, "world" (world knowledge) and "downstream" (task skills); every sample has a type,
set per task (`downstream_tasks`). With router weights w (tokens x experts) in one layer:

    Q[n, m] = sum over the tokens of sample m of w[token, n]
    I[n, m] = 1 + delta if expert n's group is sample m's type, else 1 - delta
    L_lbc   = (std(I * Q) / mean(I * Q))^2          over all (n, m) entries (unbiased std)

so each group balances within itself while taking more of the samples of its own type. The loss is averaged
over the adapted layers and added with `balance_weight`. The change depends on each token: no merging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import TaskAdapterModel
from .common import LoRAExpertsConfig, LoRAExpertsLinear, check, ffn_target_modules

GROUPS = ("world", "downstream")


def localized_balance_loss(weights: torch.Tensor, sample_downstream: torch.Tensor,
                           expert_downstream: torch.Tensor, delta: float) -> torch.Tensor:
    """(std / mean)^2 of I * Q. `weights`: (samples, tokens, experts) or (samples, experts) router weights."""
    w = weights.reshape(weights.shape[0], -1, weights.shape[-1]).float()
    q = w.sum(1).T                                                        # (experts, samples)
    same = expert_downstream.bool()[:, None] == sample_downstream.bool()[None, :]
    iq = torch.where(same, 1.0 + delta, 1.0 - delta) * q
    if iq.numel() < 2:
        return iq.sum() * 0.0
    return (iq.std() / iq.mean()) ** 2


@dataclass
class LoRAMoEConfig(LoRAExpertsConfig):
    """LoRAMoE: dense LoRA experts on the FFN (target_modules None: the FFN layers) + localized balancing."""

    num_experts: int = field(default=6, metadata={"help": "LoRA experts per adapted layer."})
    r: int = field(default=4, metadata={"help": "Rank of each expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Each expert is scaled by lora_alpha / r."})
    expert_groups: list[str] | None = field(
        default=None,
        metadata={"help": "Group of each expert, 'world' or 'downstream' (one entry per expert); None: the first "
                  "half (rounded down) 'world', the rest 'downstream'."})
    downstream_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Tasks whose samples are of type 'downstream'; the other tasks are 'world' knowledge. "
                  "None: every task is downstream."})
    balance_delta: float = field(default=0.1, metadata={"help": "delta of the importance matrix I (0 <= delta < 1)."})
    balance_weight: float = field(default=0.1, metadata={"help": "Weight of the localized balancing loss."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_groups is None:
            half = self.num_experts // 2
            self.expert_groups = ["world"] * half + ["downstream"] * (self.num_experts - half)
        self.expert_groups = list(self.expert_groups)
        check(len(self.expert_groups) == self.num_experts and all(g in GROUPS for g in self.expert_groups),
              f"expert_groups must list {self.num_experts} entries, each 'world' or 'downstream'; "
              f"got {self.expert_groups}")
        if self.downstream_tasks is not None:
            self.downstream_tasks = list(self.downstream_tasks)
            unknown = [t for t in self.downstream_tasks if t not in self.tasks]
            check(not unknown, f"downstream_tasks {unknown} are not among tasks {self.tasks}")
        check(0.0 <= self.balance_delta < 1.0, f"balance_delta must be in [0, 1), got {self.balance_delta}")
        check(self.balance_weight >= 0, f"balance_weight must be >= 0, got {self.balance_weight}")

    def task_is_downstream(self) -> list[bool]:
        return [self.downstream_tasks is None or t in self.downstream_tasks for t in self.tasks]


class LoRAMoELinear(LoRAExpertsLinear):
    """LoRA experts mixed densely per token; the localized balancing loss is this layer's `aux_loss`."""

    method_label = "LoRAMoE"

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: LoRAMoEConfig) -> None:
        super().__init__(base_layer, num_tasks, config)
        dev = base_layer.weight.device
        self.register_buffer("expert_is_downstream", torch.tensor(
            [g == "downstream" for g in config.expert_groups], device=dev), persistent=False)
        self.register_buffer("task_is_downstream", torch.tensor(config.task_is_downstream(), device=dev),
                             persistent=False)

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        if self.cfg.balance_weight > 0:
            self.aux_loss = localized_balance_loss(self.expert_weights(probs), self.task_is_downstream[task_ids],
                                                   self.expert_is_downstream, self.cfg.balance_delta)

    def add_task(self, init_from: int | None = None) -> None:
        super().add_task(init_from)
        new = self.task_is_downstream[init_from : init_from + 1] if init_from is not None else \
            torch.ones(1, dtype=torch.bool, device=self.task_is_downstream.device)
        self.task_is_downstream = torch.cat([self.task_is_downstream, new])


class LoRAMoEModel(TaskAdapterModel):
    """LoRAMoE on the FFN layers; experts shared by all tasks, task ids only set each sample's type."""

    method_name = "loramoe"
    config_class = LoRAMoEConfig
    layer_class = LoRAMoELinear
    aux_loss_weights = {"balance": "balance_weight"}

    def __init__(self, model: nn.Module, config: LoRAMoEConfig) -> None:
        if config.target_modules is None:
            config.target_modules = ffn_target_modules(model)
        super().__init__(model, config)

    def add_task(self, name: str, init_from: str | int | None = None) -> int:
        """Append a task; its sample type copies `init_from`'s (a fresh task is 'downstream')."""
        downstream = True if init_from is None else self.config.task_is_downstream()[self.task_index(init_from)]
        idx = super().add_task(name, init_from)
        if downstream and self.config.downstream_tasks is not None:
            self.config.downstream_tasks.append(name)
        return idx
