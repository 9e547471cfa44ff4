"""MoLA (Gao et al., 2024): top-k token-routed LoRA experts, with a different number of experts per layer.

A layer's depth is the first integer in its module name (`encoder.layer.3.attention...` -> 3; T5's encoder
and decoder blocks with the same index get the same depth); L = largest depth + 1 over the adapted layers.
A layer outside the numbered blocks (BERT's `pooler.dense`, an `lm_head`) takes the depth of the blocks
next to it: 0 if it comes before the first numbered block in module order, L - 1 otherwise.
Named schedules split the depths into four equal bands (band = depth * 4 // L):

    inverted_triangle  2-4-6-8   (few experts in low layers, many in high ones: the paper's best)
    triangle           8-6-4-2
    square             5-5-5-5
    hourglass          8-2-2-8

or `experts_per_layer` lists one count per depth. Each token mixes its top-k experts (renormalized); the
load-balancing loss is MixLoRA's (Switch / Mixtral form). The change depends on each token: no merging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import MoreLoraError, TaskAdapterModel, adaptable_targets, resolve_target_modules
from .common import LoRAExpertsConfig, LoRAExpertsLinear, check, top_k_balancing_loss

SCHEDULES: dict[str, tuple[int, int, int, int]] = {
    "inverted_triangle": (2, 4, 6, 8),
    "triangle": (8, 6, 4, 2),
    "square": (5, 5, 5, 5),
    "hourglass": (8, 2, 2, 8),
}


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (its block / layer index), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def schedule_counts(schedule: list[int] | str, num_layers: int) -> list[int]:
    """Experts for each depth 0..num_layers-1."""
    if isinstance(schedule, str):
        bands = SCHEDULES[schedule]
        return [bands[d * len(bands) // num_layers] for d in range(num_layers)]
    if len(schedule) != num_layers:
        raise MoreLoraError(f"experts_per_layer lists {len(schedule)} counts but the adapted layers span "
                            f"{num_layers} depths (0..{num_layers - 1}): give one count per depth")
    return list(schedule)


@dataclass
class MoLAConfig(LoRAExpertsConfig):
    """MoLA: top-k routed LoRA experts, a per-depth number of experts, MixLoRA's balance loss."""

    top_k: int | None = field(default=2, metadata={"help": "Experts mixed per token (renormalized)."})
    experts_per_layer: list[int] | str = field(
        default="inverted_triangle",
        metadata={"help": "Experts at each depth: a list (one count per layer depth) or a schedule: "
                  f"{', '.join(SCHEDULES)}. Overrides num_experts."})
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.top_k is not None, "MoLA routes each token to its top_k experts: set top_k (e.g. 2)")
        if isinstance(self.experts_per_layer, str):
            check(self.experts_per_layer in SCHEDULES,
                  f"experts_per_layer must be a list of counts or one of {list(SCHEDULES)}, "
                  f"got {self.experts_per_layer!r}")
            low = min(SCHEDULES[self.experts_per_layer])
        else:
            self.experts_per_layer = list(self.experts_per_layer)
            check(len(self.experts_per_layer) > 0 and all(isinstance(c, int) and c >= 1
                                                          for c in self.experts_per_layer),
                  f"experts_per_layer must list integers >= 1, got {self.experts_per_layer}")
            low = min(self.experts_per_layer)
        check(self.top_k <= low, f"top_k={self.top_k} exceeds the smallest expert count {low} of experts_per_layer")
        check(self.balance_weight >= 0, f"balance_weight must be >= 0, got {self.balance_weight}")


class MoLALinear(LoRAExpertsLinear):
    """Top-k routed LoRA experts; MixLoRA's load-balancing loss is this layer's `aux_loss`."""

    method_label = "MoLA"

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        if self.cfg.balance_weight > 0:
            self.aux_loss = top_k_balancing_loss(probs, self.top_k)


class MoLAModel(TaskAdapterModel):
    """MoLA on every target layer; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "mola"
    config_class = MoLAConfig
    layer_class = MoLALinear
    aux_loss_weights = {"balance": "balance_weight"}

    def make_layer(self, name: str, base: nn.Linear) -> MoLALinear:
        return MoLALinear(base, len(self.config.tasks), self.config, num_experts=self._expert_counts()[name])

    def _expert_counts(self) -> dict[str, int]:
        """{module name: experts} for every layer that will be adapted (computed once, before injection)."""
        if self.__dict__.get("_counts") is None:
            targets = resolve_target_modules(self.base_model, self.config.target_modules)
            names = adaptable_targets(self.base_model, targets)
            depths = {n: layer_index(n) for n in names}
            indexed = [d for d in depths.values() if d is not None]
            if not indexed:
                raise MoreLoraError(f"MoLA needs layer depths from the block indices in module names; none of "
                                    f"{names[:3]} has one: choose target_modules inside numbered blocks")
            num_layers = max(indexed) + 1
            seen_block = False
            for n, d in depths.items():  # outside the blocks: the depth of the nearest end (module order)
                seen_block |= d is not None
                if d is None:
                    depths[n] = num_layers - 1 if seen_block else 0
            counts = schedule_counts(self.config.experts_per_layer, num_layers)
            self._counts = {n: counts[d] for n, d in depths.items()}
        return self._counts

    def experts_per_layer(self) -> dict[str, int]:
        """{adapted module name: number of experts}."""
        return {name: layer.num_experts for name, layer in self.adapter_layers()}

    def _extra_metadata(self) -> dict[str, object]:
        return {"experts_per_layer": self.experts_per_layer()}
