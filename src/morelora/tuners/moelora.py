"""MOELoRA baseline (Liu et al., 2024): LoRA experts mixed by a per-task softmax gate.

For a frozen linear layer W0 (d_out x d_in), total rank r, N experts of rank r/N each, tasks T:

    A (r x d_in, Kaiming-uniform)  B (d_out x r, zeros)    expert i = rows / columns i*r/N .. (i+1)*r/N - 1
    E (T x d_emb, N(0, 1), a per-layer task embedding)       W_g: Linear(d_emb -> N, no bias)
    g_t = softmax(W_g E[t])                                   (N,)
    delta_t(x) = (alpha / r) * sum_i g_t,i B_i A_i dropout(x)

The gate depends on the task only, so each example gets a length-r coefficient vector (g_t repeated
r/N times) applied between the two low-rank products: one pair of matmuls serves a mixed batch. Task
t's change is the rank-r LoRA ([g_t,i A_i] stacked, [B_i] side by side): mergeable and exportable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoreLoraError, TaskAdapterLayer, TaskAdapterModel, grow_rows, lora_pair, per_example
from .common import LowRankConfig, check_int


@dataclass
class MoELoRAConfig(LowRankConfig):
    """N LoRA experts of rank r/N per layer, mixed by a softmax gate over a task embedding."""

    num_experts: int = field(default=4, metadata={"help": "Number of experts N; each has rank r / N."})
    task_embedding_dim: int = field(default=64, metadata={"help": "Size of the task embedding fed to the gate."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        check_int("task_embedding_dim", self.task_embedding_dim)
        if self.r % self.num_experts:
            raise MoreLoraError(f"r ({self.r}) must be a multiple of num_experts ({self.num_experts}): each "
                                "expert has rank r / num_experts")


class MoELoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus N LoRA experts weighted per task."""

    adapter_param_names = ("lora_A", "lora_B", "task_embedding", "gate")
    per_task_param_names = ("task_embedding",)

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MoELoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.r, self.num_experts = config.r, config.num_experts
        self.cfg = config
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, self.r, config.init_lora_weights)
        self.task_embedding = nn.Parameter(torch.randn(num_tasks, config.task_embedding_dim))
        self.gate = nn.Linear(config.task_embedding_dim, self.num_experts, bias=False)
        self.to(base_layer.weight.device)

    def gate_weights(self) -> torch.Tensor:
        """g: (T, N) softmax over the experts for every task."""
        return self.gate(self.task_embedding.to(self.gate.weight.dtype)).float().softmax(-1)

    def rank_weights(self) -> torch.Tensor:
        """(T, r): each rank carries its expert's gate weight."""
        return self.gate_weights().repeat_interleave(self.r // self.num_experts, dim=1)

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        coef = self.rank_weights()[task_ids] * self.scaling                 # (B, r)
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))         # (B, ..., r)
        z = z * per_example(coef, z)
        return z, self.lora_B, 1.0                                          # output z @ B^T

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """([g_i A_i] stacked: r x d_in, [B_i] side by side: d_out x r, alpha / r)."""
        return self.lora_A * self.rank_weights()[task][:, None], self.lora_B, self.scaling

    def add_task(self, init_from: int | None = None) -> None:
        super().add_task(init_from)
        self.task_embedding = grow_rows(self.task_embedding, init_from, std=1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, experts={self.num_experts}"


class MoELoRAModel(TaskAdapterModel):
    """A frozen model with MOELoRA experts in every target layer (per-task gates)."""

    method_name = "moelora"
    config_class = MoELoRAConfig
    layer_class = MoELoRALinear
