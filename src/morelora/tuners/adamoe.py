"""AdaMoE (Zeng et al., 2024): top-k token routing over LoRA experts plus "null" experts that output zero.

The router scores n real LoRA experts and m null experts; each token takes its top-k of the n + m
(weights renormalized over those k), and a null expert adds nothing, so a token uses between 0 and k real
experts. The load-balancing loss (Switch / Mixtral form, as MixLoRA's) runs over all n + m experts, which
lets the router send easy tokens to null experts. The change depends on each token: no merging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import TaskAdapterModel
from .common import LoRAExpertsConfig, LoRAExpertsLinear, check, ffn_target_modules, top_k_balancing_loss


@dataclass
class AdaMoEConfig(LoRAExpertsConfig):
    """AdaMoE: LoRA experts + null experts on the FFN (target_modules None: the FFN layers)."""

    num_null_experts: int = field(default=4, metadata={"help": "Null experts (output zero) per adapted layer."})
    top_k: int | None = field(default=4, metadata={"help": "Experts (real or null) chosen per token."})
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.num_null_experts, int) and self.num_null_experts >= 0,
              f"num_null_experts must be an integer >= 0, got {self.num_null_experts!r}")
        total = self.num_experts + self.num_null_experts
        check(self.top_k is not None and self.top_k <= total,
              f"top_k must be an integer in 1..{total} (num_experts + num_null_experts), got {self.top_k!r}")
        check(self.balance_weight >= 0, f"balance_weight must be >= 0, got {self.balance_weight}")


class AdaMoELinear(LoRAExpertsLinear):
    """Router over n real + m null experts; only the real experts' weights reach the output."""

    method_label = "AdaMoE"

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: AdaMoEConfig) -> None:
        super().__init__(base_layer, num_tasks, config, num_null_experts=config.num_null_experts)

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        if self.cfg.balance_weight > 0:
            self.aux_loss = top_k_balancing_loss(probs, self.top_k)

    def real_experts_used(self, x: torch.Tensor) -> torch.Tensor:
        """(...,) number of real experts among each token's top-k."""
        with torch.no_grad():
            return (self.router_probs(x).topk(self.top_k, -1).indices < self.num_experts).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, null_experts={self.num_null_experts}"


class AdaMoEModel(TaskAdapterModel):
    """AdaMoE on the FFN layers; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "adamoe"
    config_class = AdaMoEConfig
    layer_class = AdaMoELinear
    aux_loss_weights = {"balance": "balance_weight"}

    def __init__(self, model: nn.Module, config: AdaMoEConfig) -> None:
        if config.target_modules is None:
            config.target_modules = ffn_target_modules(model)
        super().__init__(model, config)
