"""The per-token softmax router of the token-routed methods (MixLoRA, HydraLoRA, MoV, MoLoRA and its family).

`token_router` builds it, `router_softmax` reads it (`molora.TokenRoutedLayer.router_probs` is the method form).
"""

from __future__ import annotations

import torch
from torch import nn


def token_router(in_features: int, num_outputs: int, init_std: float | None = None) -> nn.Linear:
    """A bias-free `nn.Linear(in_features -> num_outputs)` router. With `init_std` its weight is then redrawn
    from N(0, init_std) (after nn.Linear's own init: both draw from the random stream); None keeps that init."""
    router = nn.Linear(in_features, num_outputs, bias=False)
    if init_std is not None:
        nn.init.normal_(router.weight, std=init_std)
    return router


def router_softmax(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Softmax of `router(x)` over its outputs, (..., num_outputs) in float32 (x cast to the router's dtype)."""
    return router(x.to(router.weight.dtype)).float().softmax(-1)
