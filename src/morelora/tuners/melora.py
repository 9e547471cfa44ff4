"""MELoRA (Ren et al., 2024): n mini LoRAs on a block-diagonal split, shared by all tasks.

The input (d_in) and output (d_out) are each cut into n equal slices; mini LoRA i (A_i: r x d_in/n,
B_i: d_out/n x r) maps input slice i to output slice i:

    delta(x)[slice i] = (alpha / (n r)) * B_i A_i dropout(x)[slice i]

i.e. delta W = (alpha / (n r)) * blockdiag(B_1..B_n) blockdiag(A_1..A_n): a rank-(n r) LoRA with n times
fewer parameters. It is one fixed matrix, so it merges and exports as a PEFT LoRA of rank n r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import MoreLoraError, TaskAdapterLayer, TaskAdapterModel, lora_pair
from .common import LowRankConfig, check_int


@dataclass
class MELoRAConfig(LowRankConfig):
    """MELoRA: `num_minis` mini LoRAs of rank r on a block-diagonal split (total rank num_minis * r)."""

    num_minis: int = field(default=4, metadata={"help": "Mini LoRAs per layer (d_in and d_out must divide by it)."})
    r: int = field(default=2, metadata={"help": "Rank of each mini LoRA (total rank num_minis * r)."})
    lora_alpha: float = field(
        default=32, metadata={"help": "Scale alpha / (num_minis * r), as a LoRA of the total rank."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_minis", self.num_minis)


class MELoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus n mini LoRAs: `lora_A` (n, r, d_in/n), `lora_B` (n, d_out/n, r)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MELoRAConfig, name: str = "") -> None:
        super().__init__(base_layer, num_tasks)
        n, r = config.num_minis, config.r
        if self.in_features % n or self.out_features % n:
            raise MoreLoraError(f"MELoRA splits {name or 'a layer'} ({self.in_features} -> {self.out_features}) into "
                                f"num_minis={n} slices: both sizes must divide by it; pick num_minis dividing both")
        self.n, self.r = n, r
        self.scaling = config.lora_alpha / (n * r)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features // n, self.out_features // n, r,
                                             config.init_lora_weights, n=n)
        self.to(base_layer.weight.device)

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x).unflatten(-1, (self.n, -1))                      # (..., n, d_in/n)
        z = torch.einsum("...ni,nri->...nr", h, self.lora_A.to(x.dtype))
        y = torch.einsum("...nr,nor->...no", z, self.lora_B.to(x.dtype))
        return y.flatten(-2) * self.scaling

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same for every task: (blockdiag(A_i): n r x d_in, blockdiag(B_i): d_out x n r, alpha / (n r))."""
        return torch.block_diag(*self.lora_A), torch.block_diag(*self.lora_B), self.scaling

    def dense_delta(self) -> torch.Tensor:
        """delta W built slice by slice (for checks)."""
        dw = torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        di, do = self.in_features // self.n, self.out_features // self.n
        for i in range(self.n):
            dw[i * do : (i + 1) * do, i * di : (i + 1) * di] = self.lora_B[i].float() @ self.lora_A[i].float()
        return dw * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, minis={self.n}, r={self.r}"


class MELoRAModel(TaskAdapterModel):
    """MELoRA on every target layer; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "melora"
    config_class = MELoRAConfig
    layer_class = MELoRALinear

    def make_layer(self, name: str, base: nn.Linear) -> MELoRALinear:
        return MELoRALinear(base, len(self.config.tasks), self.config, name=name)

