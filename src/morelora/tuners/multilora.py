"""MultiLoRA baseline: one separate LoRA per task, chosen per example.

For a frozen linear layer W0 (d_out x d_in), rank r, tasks T:

    A (T x r x d_in, Kaiming-uniform per task)   B (T x d_out x r, zeros)
    delta(x_b) = (alpha / r) * B[t_b] A[t_b] dropout(x_b)      for example b of task t_b

A mixed batch gathers each example's factors and runs two batched matmuls (`bmm`), with no loop
over tasks. Task t's change is the plain LoRA (A[t], B[t]): mergeable and exportable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import TaskAdapterLayer, TaskAdapterModel, lora_pair
from .common import LowRankConfig


@dataclass
class MultiLoRAConfig(LowRankConfig):
    """T independent LoRA adapters of rank r per adapted layer (per task parameters = one LoRA)."""


class MultiLoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus one LoRA per task."""

    adapter_param_names = ("lora_A", "lora_B")
    per_task_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MultiLoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.r = config.r
        self.cfg = config
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, self.r, config.init_lora_weights,
                                             n=num_tasks)
        self.to(base_layer.weight.device)

    def _new_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = lora_pair(self.in_features, self.out_features, self.r, self.cfg.init_lora_weights)
        return a.data, b.data

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = self.lora_A[task_ids].to(x.dtype)                              # (B, r, d_in)
        h = self.lora_dropout(x).reshape(x.shape[0], -1, self.in_features)  # (B, n, d_in)
        z = torch.bmm(h, a.transpose(1, 2)).reshape(*x.shape[:-1], self.r)
        return z, self.lora_B[task_ids], self.scaling                      # output scale * z @ B[t]^T

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A[task], self.lora_B[task], self.scaling

    def add_task(self, init_from: int | None = None) -> None:
        super().add_task(init_from)
        with torch.no_grad():
            if init_from is not None:
                a, b = self.lora_A[init_from].clone(), self.lora_B[init_from].clone()
            else:
                a, b = (t.to(self.lora_A.device) for t in self._new_factors())
            self.lora_A = nn.Parameter(torch.cat([self.lora_A.data, a[None]]))
            self.lora_B = nn.Parameter(torch.cat([self.lora_B.data, b[None]]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


class MultiLoRAModel(TaskAdapterModel):
    """A frozen model with one LoRA per task in every target layer (per-example choice)."""

    method_name = "multilora"
    config_class = MultiLoRAConfig
    layer_class = MultiLoRALinear
