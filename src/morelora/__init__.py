"""morelora: multi-task parameter-efficient fine-tuning with MoRE, a Mixture of Low-Rank Experts."""

from . import _quiet  # noqa: F401  (first: before PEFT imports bitsandbytes)
from .methods import METHODS, build_method, get_method, load_adapter_model
from .tuners.base import CheckpointError, MoreLoraError, TaskAdapterModel, UnknownTaskError
from .tuners.more import MoREConfig, MoRELinear, MoREModel, get_more_model

__version__ = "0.1.0"

__all__ = [
    "METHODS", "CheckpointError", "MoREConfig", "MoRELinear", "MoREModel", "MoreLoraError",
    "TaskAdapterModel", "UnknownTaskError", "build_method", "get_method", "get_more_model",
    "load_adapter_model",
]
