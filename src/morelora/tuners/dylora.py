"""DyLoRA baseline (Valipour et al., 2023): one LoRA trained on random prefix ranks, shared by all tasks.

For a frozen linear layer W0 (d_out x d_in), maximum rank r:

    A (r x d_in, Kaiming-uniform)   B (d_out x r, zeros)
    delta_b(x) = (alpha / b) * B[:, :b] A[:b] dropout(x)

Training: every forward pass of the model samples one b uniformly from 1..r (torch's global RNG) and
all layers use that truncation, so each step trains the nested rank-b model. Inference: the configured
`inference_rank` (default r); `set_inference_rank(k)` serves any prefix. Task ids are accepted and
ignored. Mergeable and exportable at the inference rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CallState, MoreLoraError, TaskAdapterLayer, TaskAdapterModel, lora_pair
from .common import LowRankConfig, check_int


@dataclass
class DyLoRAConfig(LowRankConfig):
    """One rank-r LoRA trained on random prefix ranks b ~ U{1..r}, served at `inference_rank`."""

    inference_rank: int | None = field(
        default=None, metadata={"help": "Prefix rank used at inference, merging and export (None: r)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inference_rank is not None:
            check_int("inference_rank", self.inference_rank)
            if self.inference_rank > self.r:
                raise MoreLoraError(f"inference_rank ({self.inference_rank}) must be <= r ({self.r})")


class DyLoRACall(CallState):
    """A DyLoRA call: the prefix rank b every layer trains in this forward (None: each layer samples its own)."""

    __slots__ = ("rank",)

    def __init__(self, task_ids: torch.Tensor | None, rank: int | None = None) -> None:
        super().__init__(task_ids)
        self.rank = rank


class DyLoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus one LoRA whose prefix rank varies during training."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: DyLoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.r = config.r
        self.cfg = config
        self.inference_rank = config.inference_rank or config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, self.r, config.init_lora_weights)
        self.to(base_layer.weight.device)

    def active_rank(self) -> int:
        if not self.training:
            return self.inference_rank
        call = self.call_state
        if isinstance(call, DyLoRACall) and call.rank is not None:   # the model's rank for this training forward
            return call.rank
        return int(torch.randint(1, self.r + 1, ()).item())

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.active_rank()
        z = F.linear(self.lora_dropout(x), self.lora_A[:b].to(x.dtype))
        return z, self.lora_B[:, :b], self.cfg.lora_alpha / b

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        k = self.inference_rank
        return self.lora_A[:k], self.lora_B[:, :k], self.cfg.lora_alpha / k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, inference_rank={self.inference_rank}"


class DyLoRAModel(TaskAdapterModel):
    """A frozen model with DyLoRA in every target layer (one rank b sampled per training forward)."""

    method_name = "dylora"
    config_class = DyLoRAConfig
    layer_class = DyLoRALinear

    def __init__(self, model: nn.Module, config: DyLoRAConfig) -> None:
        super().__init__(model, config)
        self.last_train_rank: int | None = None

    def _new_call_state(self, task_ids: torch.Tensor | None, inputs: dict[str, Any] | None = None) -> DyLoRACall:
        """A training forward samples one rank b for all layers (`last_train_rank`)."""
        if inputs is None or not self.training:
            return DyLoRACall(task_ids)
        b = int(torch.randint(1, self.config.r + 1, ()).item())
        self.last_train_rank = b
        return DyLoRACall(task_ids, b)

    def set_inference_rank(self, k: int) -> None:
        """Serve (and merge / export) prefix rank k from now on; saved with the config."""
        check_int("inference_rank", k)
        if k > self.config.r:
            raise MoreLoraError(f"inference_rank ({k}) must be <= r ({self.config.r})")
        if self.merged_task is not None:
            raise MoreLoraError("a task is merged at the current rank; unmerge() before changing inference_rank")
        self.config.inference_rank = k
        for _, layer in self.adapter_layers():
            layer.inference_rank = k
