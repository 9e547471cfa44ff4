"""LoRA baseline: PEFT's own LoRA, one adapter shared by every task.

The layers are exactly those of `peft.inject_adapter_in_model(LoraConfig(...), model)` (PEFT's
`lora.Linear`, adapter name "default"); this file only fits them to the `TaskAdapterModel` interface:
task ids are checked and ignored, there is no auxiliary loss, merging any task applies the same change,
and `export_lora` writes the adapter as a standard PEFT LoRA adapter.

The fields are `common.LowRankConfig`'s (r, lora_alpha, lora_dropout, init_lora_weights), which every LoRA-style
baseline shares.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import (
    CallState,
    MoreLoraError,
    TaskAdapterModel,
    adaptable_names,
    adaptable_targets,
    refuse_quantized_merge,
    resolve_target_modules,
)
from .common import LowRankConfig

ADAPTER = "default"


@dataclass
class SingleLoRAConfig(LowRankConfig):
    """One PEFT LoRA adapter for all tasks (the fields map one to one onto `peft.LoraConfig`)."""


class _PeftFactors:
    """A PEFT LoRA layer seen through `TaskAdapterLayer.lora_factors` (the same factors for every task)."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        layer = self.layer
        return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]


class SingleLoRAModel(TaskAdapterModel):
    """A frozen model with PEFT's LoRA injected: every task uses the same adapter.

    >>> model = SingleLoRAModel(hf_model, SingleLoRAConfig(tasks=["sst2", "rte"]))
    >>> model(**batch, task_ids=["sst2", "rte"])      # ids are validated, then ignored (None is fine too)
    """

    method_name = "lora"
    config_class = SingleLoRAConfig

    def __init__(self, model: nn.Module, config: SingleLoRAConfig) -> None:
        super().__init__(model, config)
        self._merged: int | None = None
        self._factor_views = False

    def lora_config(self) -> LoraConfig:
        """The `peft.LoraConfig` this adapter is built from."""
        c = self.config
        targets = resolve_target_modules(self.base_model, c.target_modules)
        conv1d = any(isinstance(self.base_model.get_submodule(n), Conv1D) for n in adaptable_targets(self.base_model,
                                                                                                      targets))
        return LoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          init_lora_weights=c.init_lora_weights, target_modules=targets,
                          fan_in_fan_out=conv1d)   # GPT-2's Conv1D stores its weight (in, out)

    def _inject(self) -> list[str]:
        cfg = self.lora_config()
        try:
            inject_adapter_in_model(cfg, self.base_model, adapter_name=ADAPTER)
        except ValueError as e:
            raise MoreLoraError(f"PEFT could not inject LoRA with target_modules={cfg.target_modules!r} ({e}); "
                                f"linear layer names in this model: {adaptable_names(self.base_model)}") from e
        self.base_model.__dict__.pop("peft_config", None)  # PEFT's bookkeeping; self.config is the record
        cast_adapter_dtype(self.base_model, ADAPTER)   # float32 adapter on a bf16 / fp16 base, as PeftModel does
        return [n for n, m in self.base_model.named_modules() if isinstance(m, LoraLayer)]

    def adapter_layers(self) -> Iterator[tuple[str, Any]]:
        for name in self.adapted_names:
            layer = self.base_model.get_submodule(name)
            yield name, (_PeftFactors(layer) if self.__dict__.get("_factor_views") else layer)

    # -- task ids and aux losses: PEFT's layers need neither
    def _task_ids_handed_to_layers(self, task_ids: torch.Tensor | None, call: CallState | None = None):
        return contextlib.nullcontext()

    def _prepare(self, task_ids: Any) -> torch.Tensor | None:
        return None if task_ids is None else self.resolve_task_ids(task_ids, self._device())

    def _collect_aux_losses(self, call: CallState | None) -> dict[str, torch.Tensor]:
        return {}

    # -- disable_adapter: PEFT's own switch
    @contextlib.contextmanager
    def _adapter_layers_disabled(self) -> Iterator[None]:
        """PEFT's `enable_adapters(False)` on every LoRA layer inside; after it `enable_adapters(True)` on those that
        were enabled, and every adapter parameter's `requires_grad` as it was (PEFT's switch sets it: False when
        disabling, True for the active adapter when enabling, whatever it was before)."""
        layers = [layer for _, layer in self.adapter_layers() if not layer.disable_adapters]
        flags = [(p, p.requires_grad) for layer in layers
                 for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
        try:
            for layer in layers:
                layer.enable_adapters(False)
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in flags:
                p.requires_grad_(flag)

    # -- merging: PEFT's merge / unmerge
    @property
    def merged_task(self) -> int | None:
        return self.__dict__.get("_merged")

    def merge_task(self, task: str | int) -> None:
        """Fold the adapter into the frozen weights (the change is the same for every task)."""
        t = self.task_index(task)
        self._refuse_while_disabled("merge a task")
        refuse_quantized_merge(self.adapter_layers())   # PEFT would re-round the packed weights
        if self._merged is not None:
            raise MoreLoraError(f"task {self.tasks[self._merged]!r} is already merged; call model.unmerge() "
                                f"before merging {self.tasks[t]!r}")
        # PEFT's safe merge writes W0 + dW into a new tensor: W0 is kept (one more weight per layer while merged)
        # and put back by `unmerge` bit for bit, where PEFT's subtraction would drift by a rounding step a cycle
        originals = self.__dict__.setdefault("_unmerged_weights", {})
        for name, layer in self.adapter_layers():
            originals[name] = layer.get_base_layer().weight.data
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        self._merged = t

    def unmerge(self) -> None:
        originals = self.__dict__.pop("_unmerged_weights", {})
        for name, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()   # PEFT's bookkeeping; the weight itself comes back from the kept W0
                if name in originals:
                    layer.get_base_layer().weight.data = originals[name]
        self._merged = None

    def merge_and_unload(self, task: str | int) -> nn.Module:
        self.task_index(task)
        self._refuse_while_disabled("merge and unload")
        refuse_quantized_merge(self.adapter_layers())
        self.unmerge()
        for name, layer in list(self.adapter_layers()):
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.get_base_layer())
        self.adapted_names = []
        return self.base_model

    def add_task(self, name: str, init_from: str | int | None = None) -> int:
        """Append a task; it shares the one adapter (`init_from` is checked and has nothing to copy)."""
        if name in self.tasks:
            raise MoreLoraError(f"task {name!r} already exists")
        if init_from is not None:
            self.task_index(init_from)
        self.tasks.append(name)
        self.config.tasks = list(self.tasks)
        return len(self.tasks) - 1

    # -- save / export
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{name}.{p}": t for name in self.adapted_names
                 for p, t in self.base_model.get_submodule(name).named_parameters() if not p.startswith("base_layer.")}
        state.update({f"{n}.{p}": t for n in self.saved_module_names
                      for p, t in self.base_model.get_submodule(n).named_parameters()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def export_lora(self, task: str | int, save_directory: str | os.PathLike,
                    base_model_name_or_path: str | None = None, uniform_rank: bool = False) -> Path:
        """Write the adapter (identical for every task) as a standard PEFT LoRA adapter."""
        self._factor_views = True
        try:
            return super().export_lora(task, save_directory, base_model_name_or_path, uniform_rank)
        finally:
            self._factor_views = False
