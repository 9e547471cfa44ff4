"""`morelora methods`: one row per registered method, with its size on a given base model.

`describe_methods()` lists name, description, routing and mergeability; given a base model and tasks it also
wraps a deep copy of the model with every method (default options, or those the config gives) and reports the
adapter parameters per task, the paper's way (adapter parameters / number of tasks). The model passed in is
never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .errors import MoreLoraError
from .methods import METHODS, build_method


def _tasks_and_options(config: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Tasks and per-method options from a RunConfig, a mapping or a list of task names."""
    if config is None:
        return [], {}
    if isinstance(config, str):
        return [config], {}
    if isinstance(config, Sequence):
        return list(config), {}
    if isinstance(config, Mapping):
        tasks = list(config.get("tasks") or [])
        options = {k: dict(v) for k, v in (config.get("methods") or {}).items()}
        method = dict(config.get("method") or {})
    else:                                                     # a RunConfig
        tasks, options, method = list(getattr(config, "tasks", []) or []), {}, dict(getattr(config, "method", {}))
    name = method.pop("name", None)
    if name:
        options.setdefault(name, {}).update(method)
    return tasks, options


def describe_methods(model: nn.Module | None = None, config: Any = None) -> list[dict[str, Any]]:
    """One dict per method: name, description, routing ("per task" / "per token" / "none"), mergeable.

    With `model` and tasks (`config`: a RunConfig, a list of task names, or a mapping with "tasks", optional
    "methods": {name: options} and "method": {"name": ..., options}), each row also has `params_per_task`,
    `trainable` and `adapted_layers`, measured by wrapping a deep copy of `model`; a method that cannot wrap
    this model gets `params_per_task` None and the reason in `error`.
    """
    tasks, options = _tasks_and_options(config)
    rows = []
    for name, spec in METHODS.items():
        row: dict[str, Any] = {"name": name, "description": spec.description, "routing": spec.routing,
                               "mergeable": spec.mergeable}
        if model is not None and tasks:
            try:
                wrapped = build_method(name, copy.deepcopy(model), tasks, **options.get(name, {}))
            except MoreLoraError as e:
                row.update(params_per_task=None, trainable=None, adapted_layers=None, error=str(e))
            else:
                counts = wrapped.parameter_counts()
                row.update(params_per_task=counts["per_task"], trainable=counts["trainable"],
                           adapted_layers=len(wrapped.adapted_names))
                del wrapped
        rows.append(row)
    return rows
