"""MoREModel: inject MoRE layers into a frozen transformers model (PEFT-style API)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..base import TaskAdapterModel
from .config import MoREConfig
from .layer import MoRELinear


class MoREModel(TaskAdapterModel):
    """A frozen model with one MoRE module per target linear layer.

    >>> model = get_more_model(hf_model, MoREConfig(tasks=["sst2", "rte"]))
    >>> out = model(**batch, task_ids=["sst2", "rte"])       # per-example tasks, mixed batches allowed
    >>> out.loss            # task loss + contrastive_weight * model.aux_losses["contrastive"]
    """

    method_name = "more"
    config_class = MoREConfig
    layer_class = MoRELinear
    aux_loss_weights = {"contrastive": "contrastive_weight"}

    def make_layer(self, name: str, base: nn.Linear) -> MoRELinear:
        return MoRELinear(base, len(self.config.tasks), self.config)

    def task_ranks(self) -> dict[str, dict[str, int]]:
        """{task: {module name: rank k_t}}: the prefix rank each task uses in each layer."""
        per_layer = {name: layer.task_ranks() for name, layer in self.adapter_layers()}
        return {task: {name: ranks[t] for name, ranks in per_layer.items()} for t, task in enumerate(self.tasks)}

    def after_weights_changed(self) -> None:
        for _, layer in self.adapter_layers():
            layer.clear_cache()

    def _extra_metadata(self) -> dict[str, Any]:
        return {"task_ranks": self.task_ranks()}


def get_more_model(model: nn.Module, config: MoREConfig) -> MoREModel:
    """Wrap `model` (frozen) with MoRE adapters as `config` says: PEFT's `get_peft_model` for MoRE."""
    return MoREModel(model, config)
