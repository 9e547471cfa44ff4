"""MoLoRA (Zadouri et al., 2023): small LoRA experts mixed per token by a softmax router.

For a frozen linear layer W0 and n experts (A_e: r x d_in, B_e: d_out x r):

    w = softmax(R x)                          per token, over the n experts (optionally top-k, renormalized)
    delta(x) = (alpha / r) * sum_e w_e B_e A_e dropout(x)

The experts are computed as one rank-(n r) LoRA whose rank groups are weighted by the router between
the two products, so a forward costs two matmuls whatever n is. The routing depends on each token,
so the change is not a fixed weight matrix: these layers cannot be merged or exported as a LoRA.

This file also holds what the other token-routed LoRA-expert methods share (`LoRAExpertsLinear`,
`load_balancing_loss`): LoRAMoE, MoLA and AdaMoE build on it; FFN targets and the balance loss are MixLoRA's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoreLoraError, TaskAdapterLayer, TaskAdapterModel, lora_pair, model_type_of
from .lora import LowRankConfig, check_int
from .mixlora import TOKEN_ROUTED_NOT_MERGEABLE, ffn_target_modules
from .mixlora import load_balancing_loss as mixlora_balance
from .routing import router_softmax, token_router

__all__ = ["ffn_target_modules"]  # re-exported for LoRAMoE / AdaMoE


def check(condition: bool, message: str) -> None:
    """Raise `MoreLoraError(message)` unless `condition`."""
    if not condition:
        raise MoreLoraError(message)


def default_targets(model: nn.Module, table: dict[str, Any], what: str) -> list[str] | str:
    """`table[model_type]`, or a MoreLoraError asking for explicit target_modules."""
    mtype = model_type_of(model)
    if mtype not in table:
        raise MoreLoraError(f"no default {what} target_modules for model type {mtype!r}: set target_modules, "
                            "e.g. ['up_proj', 'down_proj']")
    value = table[mtype]
    return value if isinstance(value, str) else list(value)


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (its block / layer index), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def route(probs: torch.Tensor, top_k: int | None, normalize: bool = True) -> torch.Tensor:
    """Mixing weights from router probabilities (..., n): all of them, or the top-k (renormalized)."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    if normalize:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


def load_balancing_loss(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """MixLoRA's load-balancing loss n * sum_e f_e P_e (Switch / Mixtral form; = k when balanced).

    `probs`: (..., n) router softmax; f_e = fraction of tokens with e among their top-k, P_e = mean probability.
    """
    return mixlora_balance(probs, probs.topk(top_k, dim=-1).indices, probs.shape[-1])


# --------------------------------------------------------------------------------------------- shared layers
class TokenRoutedLayer(TaskAdapterLayer):
    """A layer whose change depends on each token (through its `router`): no fixed delta W, no merge or export."""

    method_label = "this method"
    router: nn.Linear   # set by the subclass, e.g. with `token_router`

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax router output (..., n experts + null experts, AdaMoE's) in float32."""
        return router_softmax(self.router, x)

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError(TOKEN_ROUTED_NOT_MERGEABLE.format(name=self.method_label)
                                  + "; run the adapter model itself (model(..., task_ids=...))")


@dataclass
class LoRAExpertsConfig(LowRankConfig):
    """Fields of every method built from token-routed LoRA experts (r, alpha, dropout: per expert)."""

    num_experts: int = field(default=4, metadata={"help": "LoRA experts per adapted layer."})
    top_k: int | None = field(
        default=None, metadata={"help": "Mix only the k most probable experts (renormalized); None: all."})
    router_init_std: float = field(default=0.02, metadata={"help": "Init std of the router weights."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        check(self.router_init_std >= 0, f"router_init_std must be >= 0, got {self.router_init_std}")


class LoRAExpertsLinear(TokenRoutedLayer):
    """A frozen `nn.Linear` plus `num_experts` LoRA experts mixed per token by a softmax router.

    `lora_A`: (n, r, d_in), Kaiming-uniform per expert; `lora_B`: (n, d_out, r), zeros; `router`:
    Linear(d_in -> n + num_null_experts), no bias; null experts (AdaMoE) are router outputs without an expert.
    Subclasses add an auxiliary loss in `set_aux_loss`.
    """

    adapter_param_names = ("lora_A", "lora_B", "router")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: LoRAExpertsConfig,
                 num_experts: int | None = None, num_null_experts: int = 0) -> None:
        super().__init__(base_layer, num_tasks)
        self.cfg = config
        self.num_experts = n = num_experts or config.num_experts
        self.num_null_experts = num_null_experts
        self.r = config.r
        self.top_k = config.top_k
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, self.r, config.init_lora_weights,
                                             n=n)
        self.router = token_router(self.in_features, n + num_null_experts, config.router_init_std)
        self.to(base_layer.weight.device)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., n) mixing weight of each real expert for each token."""
        return route(probs, self.top_k)[..., : self.num_experts]

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Hook for an auxiliary loss from the router output (training only)."""

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        probs = self.router_probs(x)
        if self.training and torch.is_grad_enabled():
            self.set_aux_loss(probs, task_ids)
        w = self.expert_weights(probs)                                           # (..., n)
        n, r = self.num_experts, self.r
        z = F.linear(self.lora_dropout(x), self.lora_A.reshape(n * r, -1).to(x.dtype))
        z = z * (w.repeat_interleave(r, dim=-1) * self.scaling).to(z.dtype)
        return F.linear(z, self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, r={self.r}, top_k={self.top_k}"


# --------------------------------------------------------------------------------------------- MoLoRA
@dataclass
class MoLoRAConfig(LoRAExpertsConfig):
    """MoLoRA: `num_experts` rank-r LoRA experts per layer, softmax router on each token (optional top-k)."""

    r: int = field(default=4, metadata={"help": "Rank of each (small) expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Each expert is scaled by lora_alpha / r."})


class MoLoRALinear(LoRAExpertsLinear):
    """MoLoRA's layer: the plain router-weighted sum of LoRA experts, no auxiliary loss."""

    method_label = "MoLoRA"


class MoLoRAModel(TaskAdapterModel):
    """MoLoRA on every target layer; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "molora"
    config_class = MoLoRAConfig
    layer_class = MoLoRALinear

    def make_layer(self, name: str, base: nn.Linear) -> MoLoRALinear:
        return MoLoRALinear(base, len(self.config.tasks), self.config)
