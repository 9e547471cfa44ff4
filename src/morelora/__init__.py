"""morelora: multi-task parameter-efficient fine-tuning with MoRE, a Mixture of Low-Rank Experts.

The names below load on first use (PEP 562), so that ``import morelora.cli`` (``morelora --help``) does not
import torch, transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _quiet  # noqa: F401  (first: before PEFT imports bitsandbytes)
from .errors import CheckpointError, MoreLoraError, UnknownTaskError

if TYPE_CHECKING:
    from .methods import METHODS, build_method, get_method, load_adapter_model
    from .training import load_run
    from .tuners.base import TaskAdapterModel
    from .tuners.more import MoREConfig, MoRELinear, MoREModel, get_more_model

__version__ = "0.1.0"

_LAZY = {
    "METHODS": "methods", "build_method": "methods", "get_method": "methods", "load_adapter_model": "methods",
    "TaskAdapterModel": "tuners.base", "MoREConfig": "tuners.more", "MoRELinear": "tuners.more",
    "MoREModel": "tuners.more", "get_more_model": "tuners.more", "load_run": "training",
}

__all__ = [
    "METHODS", "CheckpointError", "MoREConfig", "MoRELinear", "MoREModel", "MoreLoraError",
    "TaskAdapterModel", "UnknownTaskError", "build_method", "get_method", "get_more_model",
    "load_adapter_model", "load_run",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'morelora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"morelora.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
