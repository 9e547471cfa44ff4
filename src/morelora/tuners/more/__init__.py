"""MoRE: Mixture of Low-Rank Experts (config / layer / model, as PEFT's tuners/lora)."""

from .config import MoREConfig
from .layer import MoRELinear
from .model import MoREModel, get_more_model

__all__ = ["MoREConfig", "MoRELinear", "MoREModel", "get_more_model"]
