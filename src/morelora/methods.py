"""The method registry: the one place that maps a method name to its code.

Adding a method = one new file under `tuners/` plus one `register(...)` line here. The trainer
only calls `build_method`; it never branches on the method's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from .tuners.base import MoreLoraError, TaskAdapterModel, read_adapter_config
from .tuners.more import MoREModel


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
