"""MoLoRA (Zadouri et al., 2023): small LoRA experts mixed per token by a softmax router.

For a frozen linear layer W0 and n experts (A_e: r x d_in, B_e: d_out x r):

    w = softmax(R x)                          per token, over the n experts (optionally top-k, renormalized)
    delta(x) = (alpha / r) * sum_e w_e B_e A_e dropout(x)

The experts are computed as one rank-(n r) LoRA whose rank groups are weighted by the router between
the two products, so a forward costs two matmuls whatever n is (`common.LoRAExpertsLinear`, which the other
token-routed LoRA-expert methods share). The routing depends on each token, so the change is not a fixed
weight matrix: these layers cannot be merged or exported as a LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import TaskAdapterModel
from .common import LoRAExpertsConfig, LoRAExpertsLinear


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
