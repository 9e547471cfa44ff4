"""MixLoRA baseline (Li et al., 2024): top-k token-routed LoRA experts on the FFN.

For a frozen linear layer W0 (d_out x d_in), n experts of rank r, top-k routing:

    A (n x r x d_in, Kaiming-uniform per expert)  B (n x d_out x r, zeros)  router W_r: Linear(d_in -> n, no bias)
    p(x) = softmax(W_r x)          (per token; the router sees the layer input before dropout)
    w(x) = p(x) on its k largest entries, renormalised to sum 1, zero elsewhere
    delta(x) = (alpha / r) * sum_i w_i(x) B_i A_i dropout(x)

Load balancing (Switch Transformer, in the top-k form of Mixtral that MixLoRA's code uses), over the
N tokens of the layer's batch (padding included: the layer does not see the attention mask):

    f_i = (# tokens with expert i among their top k) / N,   P_i = mean over tokens of p_i(x)
    L_balance = n * sum_i f_i P_i        (= k at perfect balance; Switch's loss for k = 1)

reported as aux loss "balance" (mean over layers, training only), weighted by `balance_weight`.

Cost: every token runs all n experts densely (one matmul through the n*r stacked ranks, experts outside
the top k weighted 0), i.e. the cost of one rank n*r LoRA per token, with no Python loop over experts.
Differences from MixLoRA: each adapted linear layer has its own router (MixLoRA shares one router per
FFN block across its linear layers); attention LoRAs are not added here (select them with target_modules).

Token routing makes the change depend on each token, so no single weight matrix per task exists:
MixLoRA cannot be merged or exported as a plain LoRA adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import MoreLoraError, TaskAdapterModel
from .common import LoRAExpertsLinear, LowRankConfig, check_int, ffn_target_modules, top_k_balancing_loss


@dataclass
class MixLoRAConfig(LowRankConfig):
    """n LoRA experts of rank r per FFN linear layer, top-k routed per token, with a balancing loss."""

    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per adapted layer."})
    top_k: int = field(default=2, metadata={"help": "Experts used by each token."})
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    router_init_std: float = field(default=0.02, metadata={"help": "Init std of the router weights."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        check_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise MoreLoraError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.balance_weight < 0:
            raise MoreLoraError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.router_init_std < 0:
            raise MoreLoraError(f"router_init_std must be >= 0, got {self.router_init_std}")


class MixLoRALinear(LoRAExpertsLinear):
    """A frozen `nn.Linear` plus n LoRA experts, top-k routed per token; the balance loss is its `aux_loss`."""

    method_label = "MixLoRA"
    merge_hint = ""
    aux_loss_without_grad = True

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """The top-k probabilities renormalised, also when k = n (`route` passes those through as they are)."""
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_idx, top_p / top_p.sum(-1, keepdim=True))

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        self.aux_loss = top_k_balancing_loss(probs, self.top_k)


class MixLoRAModel(TaskAdapterModel):
    """A frozen model with token-routed LoRA experts on its FFN layers (default targets)."""

    method_name = "mixlora"
    config_class = MixLoRAConfig
    layer_class = MixLoRALinear
    aux_loss_weights = {"balance": "balance_weight"}

    def __init__(self, model: nn.Module, config: MixLoRAConfig) -> None:
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=ffn_target_modules(model))
        super().__init__(model, config)
