"""MoV (Zadouri et al., 2023): a mixture of IA3 scaling-vector experts, routed per token.

For a frozen linear layer W0 (with bias b) and n experts l_e (each a d_out vector, initialised to ones):

    w = softmax(R x)                      per token, over the n experts (optionally top-k, renormalized)
    y = (W0 x + b) * sum_e w_e l_e        elementwise: IA3 scales the layer's output

At init every l_e = 1 and the weights sum to one, so the model starts unchanged. The scale differs per
token, so it cannot be folded into W0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3
from torch import nn

from .base import MoreLoraError, TaskAdapterConfig, TaskAdapterModel
from .common import TokenRoutedLayer, check, default_targets, route, token_router

#: IA3 default targets for model types PEFT's IA3 table lacks, in its convention (keys, values, FFN output)
EXTRA_IA3_TARGET_MODULES: dict[str, list[str]] = {
    "phi3": ["qkv_proj", "down_proj"],
    **dict.fromkeys(["olmo", "olmo2", "granite", "cohere", "stablelm", "smollm3"], ["k_proj", "v_proj", "down_proj"]),
}


@dataclass
class MoVConfig(TaskAdapterConfig):
    """MoV: IA3 vector experts mixed per token. target_modules None: PEFT's IA3 defaults (k, v, FFN out)."""

    num_experts: int = field(default=4, metadata={"help": "IA3 vector experts per adapted layer."})
    top_k: int | None = field(
        default=None, metadata={"help": "Mix only the k most probable experts (renormalized); None: all."})
    router_init_std: float = field(default=0.02, metadata={"help": "Init std of the router weights."})
    init_ia3_weights: bool = field(
        default=True, metadata={"help": "Vectors start at ones (identity); False: ones + N(0, 0.1) (for tests)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.num_experts, int) and self.num_experts >= 1,
              f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
              f"top_k must be None or an integer >= 1, got {self.top_k!r}")


class MoVLinear(TokenRoutedLayer):
    """A frozen `nn.Linear` whose output is scaled elementwise by a per-token mix of IA3 vectors."""

    adapter_param_names = ("ia3_l", "router")
    method_label = "MoV"

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MoVConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.ia3_l = nn.Parameter(torch.ones(config.num_experts, self.out_features))
        if not config.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.add_(torch.randn_like(self.ia3_l) * 0.1)
        self.router = token_router(self.in_features, config.num_experts, config.router_init_std)
        self.to(base_layer.weight.device)

    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_out): sum_e w_e l_e for every token."""
        return route(self.router_probs(x), self.top_k) @ self.ia3_l.float()

    def forward(self, x: torch.Tensor, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any):
        if self.adapter_disabled:   # the model's disable_adapter()
            return self.base_layer(x, *args, **kwargs)
        if task_ids is None and (self.call_state is None or self.call_state.task_ids is None):
            raise MoreLoraError("task_ids are required: pass task_ids=... (one task index or name per example)")
        result = self.base_layer(x, *args, **kwargs)
        return result * self.output_scale(x).to(result.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, top_k={self.top_k}"


class MoVModel(TaskAdapterModel):
    """MoV on every target layer; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "mov"
    config_class = MoVConfig
    layer_class = MoVLinear

    def __init__(self, model: nn.Module, config: MoVConfig) -> None:
        if config.target_modules is None:
            config.target_modules = default_targets(model, {**EXTRA_IA3_TARGET_MODULES, **IA3}, "IA3")
        super().__init__(model, config)
