"""The method registry: the one place that maps a method name to its code.

Adding a method = one new file under `tuners/` plus one `register(...)` line here. The trainer
only calls `build_method`; it never branches on the method's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import MoreLoraError
from .tuners.adalora import AdaLoRAModel
from .tuners.adamoe import AdaMoEModel
from .tuners.alora import ALoRAModel
from .tuners.base import TaskAdapterModel, read_adapter_config
from .tuners.dylora import DyLoRAModel
from .tuners.hydralora import HydraLoRAModel
from .tuners.lora import SingleLoRAModel
from .tuners.loramoe import LoRAMoEModel
from .tuners.melora import MELoRAModel
from .tuners.mixlora import MixLoRAModel
from .tuners.moelora import MoELoRAModel
from .tuners.mola import MoLAModel
from .tuners.molora import MoLoRAModel
from .tuners.more import MoREModel
from .tuners.mov import MoVModel
from .tuners.multilora import MultiLoRAModel


@dataclass(frozen=True)
class MethodSpec:
    name: str
    model_class: type[TaskAdapterModel]
    description: str
    routing: str          # "per task", "per token" or "none"
    mergeable: bool


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


register(MethodSpec("more", MoREModel, "MoRE: one LoRA, per-task prefix-rank experts chosen by a router",
                    "per task", True))
register(MethodSpec("lora", SingleLoRAModel, "LoRA (PEFT's own): one adapter shared by all tasks", "none", True))
register(MethodSpec("multilora", MultiLoRAModel, "MultiLoRA: one separate LoRA per task, chosen per example",
                    "per task", True))
register(MethodSpec("moelora", MoELoRAModel, "MOELoRA: LoRA experts of rank r/N mixed by a per-task softmax gate",
                    "per task", True))
register(MethodSpec("mixlora", MixLoRAModel, "MixLoRA: top-k token-routed LoRA experts on the FFN, load balancing",
                    "per token", False))
register(MethodSpec("hydralora", HydraLoRAModel, "HydraLoRA: one shared A, several B heads mixed by a token router",
                    "per token", False))
register(MethodSpec("dylora", DyLoRAModel, "DyLoRA: one LoRA trained on random prefix ranks, served at a fixed rank",
                    "none", True))
register(MethodSpec("mov", MoVModel, "MoV: IA3 scaling-vector experts mixed per token by a softmax router",
                    "per token", False))
register(MethodSpec("molora", MoLoRAModel, "MoLoRA: small LoRA experts mixed per token by a softmax router",
                    "per token", False))
register(MethodSpec("loramoe", LoRAMoEModel, "LoRAMoE: dense token-routed LoRA experts on the FFN, localized "
                    "balancing of world-knowledge vs task experts", "per token", False))
register(MethodSpec("mola", MoLAModel, "MoLA: top-k token-routed LoRA experts, more experts in higher layers",
                    "per token", False))
register(MethodSpec("melora", MELoRAModel, "MELoRA: mini LoRAs on a block-diagonal split, shared by all tasks",
                    "none", True))
register(MethodSpec("alora", ALoRAModel, "ALoRA: LoRA with a learnable diagonal, ranks pruned and re-allocated "
                    "across modules", "none", True))
register(MethodSpec("adamoe", AdaMoEModel, "AdaMoE: top-k token routing over LoRA experts plus null experts",
                    "per token", False))
register(MethodSpec("adalora", AdaLoRAModel, "AdaLoRA (PEFT's own): SVD-form LoRA, importance-based rank budget",
                    "none", True))


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MoreLoraError(f"unknown method {name!r}; available methods: {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, base_model: nn.Module, tasks: list[str], **options: Any) -> TaskAdapterModel:
    """Wrap `base_model` with method `name` for `tasks`; `options` are the method config's fields."""
    spec = get_method(name)
    config = spec.model_class.config_class.from_dict({**options, "tasks": list(tasks)})
    return spec.model_class(base_model, config)


def load_adapter_model(base_model: nn.Module, directory: str | os.PathLike) -> TaskAdapterModel:
    """Load any saved morelora adapter onto `base_model` (the method is read from the folder)."""
    meta = read_adapter_config(directory)
    return get_method(meta.get("morelora_method", "")).model_class.from_pretrained(base_model, directory)
