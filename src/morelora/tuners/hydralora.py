"""HydraLoRA baseline (Tian et al., 2024): one shared A, several B heads mixed per token.

For a frozen linear layer W0 (d_out x d_in), rank r, h heads:

    A (r x d_in, Kaiming-uniform, shared)   B (h x d_out x r, zeros)   router W_r: Linear(d_in -> h, no bias)
    w(x) = softmax(W_r x)          (per token, dense: every head contributes)
    delta(x) = (alpha / r) * sum_i w_i(x) B_i A dropout(x)

Computed as one matmul through A and one through the h heads side by side (h*r columns, each head's
block scaled by its weight): no loop over heads. The mixture depends on each token, so no single
weight matrix per task exists: HydraLoRA cannot be merged or exported as a plain LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import TaskAdapterModel, kaiming_init_
from .common import LowRankConfig, TokenRoutedLayer, check_int, token_router


@dataclass
class HydraLoRAConfig(LowRankConfig):
    """A shared rank-r A and `num_heads` B matrices per layer, mixed by a per-token softmax router."""

    num_heads: int = field(default=3, metadata={"help": "Number of B heads (experts) sharing one A."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_heads", self.num_heads)


class HydraLoRALinear(TokenRoutedLayer):
    """A frozen `nn.Linear` plus a shared A and token-routed B heads."""

    adapter_param_names = ("lora_A", "lora_B", "router")
    method_label = "HydraLoRA"
    merge_hint = ""

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: HydraLoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.r, self.num_heads = config.r, config.num_heads
        self.cfg = config
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.num_heads, self.out_features, self.r))
        kaiming_init_(self.lora_A)
        if not config.init_lora_weights:
            for i in range(self.num_heads):
                kaiming_init_(self.lora_B.data[i])
        self.router = token_router(self.in_features, self.num_heads)
        self.to(base_layer.weight.device)

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        w = (self.router_probs(x) * self.scaling).to(x.dtype)                      # (..., h)
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))         # (..., r)
        u = (w[..., :, None] * z[..., None, :]).flatten(-2)                 # (..., h*r)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)     # (d_out, h*r)
        return F.linear(u, b.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, heads={self.num_heads}"


class HydraLoRAModel(TaskAdapterModel):
    """A frozen model with HydraLoRA (shared A, token-routed B heads) in every target layer."""

    method_name = "hydralora"
    config_class = HydraLoRAConfig
    layer_class = HydraLoRALinear
