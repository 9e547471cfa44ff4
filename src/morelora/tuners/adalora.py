"""AdaLoRA (Zhang et al., 2023) as PEFT implements it, in the shared multi-task harness.

Each adapted layer holds a PEFT `SVDLinear` (an `AdaLoraLayer`): P diag(E) Q with `init_r` triplets,
delta(x) = B (A * E) dropout(x) * lora_alpha / (ranknum + 1e-5). PEFT's `RankAllocator` scores every triplet
(sensitivity x uncertainty EMA of |p * grad|) and masks the least important ones on a cubic budget schedule from
`init_r` to `target_r` per module on average. `on_step_end(step)` runs PEFT's own
`AdaLoraModel.update_and_allocate`: call it after `optimizer.step()` and BEFORE `optimizer.zero_grad()` (PEFT
reads `p.grad`). PEFT's orthogonal regularisation is the auxiliary loss "orthogonal" (same value as PEFT adds).
One adapter shared by all tasks: it merges and exports as a PEFT LoRA of rank init_r (masked triplets are zero).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel as PeftAdaLoraModel
from peft.tuners.adalora.layer import RankAllocator, SVDLinear
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn

from .base import MoreLoraError, TaskAdapterConfig, TaskAdapterLayer, TaskAdapterModel, resolve_target_modules
from .common import check

ADAPTER = "default"


@dataclass
class AdaLoRAConfig(TaskAdapterConfig):
    """AdaLoRA: PEFT's SVD-form LoRA with importance-based rank budget (fields map to `peft.AdaLoraConfig`)."""

    init_r: int = field(default=12, metadata={"help": "Initial rank of every module."})
    target_r: int = field(default=8, metadata={"help": "Average rank per module after budget allocation."})
    lora_alpha: float = field(default=32, metadata={"help": "PEFT's AdaLoRA scale: alpha / current rank."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    total_step: int = field(
        default=1000, metadata={"help": "Total training steps (PEFT needs it for the budget schedule): set it "
                                "to the run's max_steps."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before the budget starts shrinking."})
    tfinal: int = field(default=0, metadata={"help": "Final steps with the budget fixed."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonal regularisation."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "PEFT's init (E = 0: identity change); False: random (for tests)."})
    rank_pattern: dict[str, list[bool]] | None = field(
        default=None, metadata={"help": "The mask PEFT's allocator last set (written during training)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.init_r, int) and self.init_r >= 1, f"init_r must be an integer >= 1, got {self.init_r!r}")
        check(isinstance(self.target_r, int) and 0 <= self.target_r <= self.init_r,
              f"target_r must be an integer in 0..init_r={self.init_r}, got {self.target_r!r}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(isinstance(self.total_step, int) and self.total_step > 0,
              f"total_step must be an integer > 0 (the run's number of steps), got {self.total_step!r}")
        check(0 <= self.tinit < self.total_step - self.tfinal,
              f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in total_step={self.total_step}: "
              "need 0 <= tinit < total_step - tfinal")
        check(self.deltaT >= 1, f"deltaT must be >= 1, got {self.deltaT}")
        check(0 < self.beta1 < 1 and 0 < self.beta2 < 1,
              f"beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        check(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")

    def peft_config(self, target_modules: list[str] | str) -> AdaLoraConfig:
        return AdaLoraConfig(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            total_step=self.total_step, tinit=self.tinit, tfinal=self.tfinal, deltaT=self.deltaT, beta1=self.beta1,
            beta2=self.beta2, orth_reg_weight=self.orth_reg_weight, init_lora_weights=self.init_lora_weights,
            target_modules=target_modules, rank_pattern=self.rank_pattern,
        )


def orthogonal_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's AdaLoRA regulariser for one layer: mean of ||A A^T - I||_F and ||B^T B - I||_F."""
    ca, cb = a @ a.T, b.T @ b
    eye = torch.eye(ca.shape[0], device=a.device, dtype=a.dtype)
    return (torch.linalg.matrix_norm(ca - eye) + torch.linalg.matrix_norm(cb - eye)) / 2


class AdaLoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus a PEFT `SVDLinear` (sharing the same base layer) that holds the adapter."""

    adapter_param_names = ()  # saved by AdaLoRAModel.adapter_state_dict (PEFT's ParameterDicts)

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: AdaLoraConfig) -> None:
        super().__init__(base_layer, num_tasks)
        self.adalora = SVDLinear(base_layer, ADAPTER, config=config, r=config.init_r, lora_alpha=config.lora_alpha)
        cast_adapter_dtype(self.adalora, ADAPTER)   # float32 adapter on a bf16 / fp16 base, as PeftModel does
        self.orth_reg = config.orth_reg_weight > 0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(A: r x d_in, E: r x 1, B: d_out x r, scale) of PEFT's SVDLinear."""
        s = self.adalora
        scale = s.scaling[ADAPTER] / (s.ranknum[ADAPTER] + 1e-5)
        return s.lora_A[ADAPTER], s.lora_E[ADAPTER], s.lora_B[ADAPTER], scale

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        s = self.adalora
        a, e, b = s.lora_A[ADAPTER], s.lora_E[ADAPTER], s.lora_B[ADAPTER]
        if self.training and self.orth_reg and torch.is_grad_enabled():
            self.aux_loss = orthogonal_penalty(a, b)
        h = s.lora_dropout[ADAPTER](x).to(a.dtype)      # SVDLinear.forward's adapter term, in PEFT's order
        return ((h @ (a * e).T @ b.T) * s.scaling[ADAPTER] / (s.ranknum[ADAPTER] + 1e-5)).to(x.dtype)

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same for every task: (A * E, B, alpha / ranknum)."""
        a, e, b, scale = self.factors()
        return a * e, b, float(scale)


class AdaLoRAModel(TaskAdapterModel):
    """PEFT's AdaLoRA on every target layer; shared by all tasks (task ids are accepted and ignored)."""

    method_name = "adalora"
    config_class = AdaLoRAConfig
    layer_class = AdaLoRALinear
    aux_loss_weights = {"orthogonal": "orth_reg_weight"}

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        self.peft_config = {ADAPTER: config.peft_config(resolve_target_modules(model, config.target_modules))}
        super().__init__(model, config)
        self.rankallocator = RankAllocator(self.base_model, self.peft_config[ADAPTER], ADAPTER)

    def make_layer(self, name: str, base: nn.Linear) -> AdaLoRALinear:
        return AdaLoRALinear(base, len(self.config.tasks), self.peft_config[ADAPTER])

    def on_step_end(self, step: int) -> None:
        """PEFT's `update_and_allocate(step)`: needs the step's gradients (call before zero_grad)."""
        params = [p for n, p in self.base_model.named_parameters() if "lora_" in n and ADAPTER in n]
        if all(p.grad is None for p in params):
            raise MoreLoraError("AdaLoRA's on_step_end needs the gradients of the step: call it after "
                                "optimizer.step() and before optimizer.zero_grad()")
        for p in params:
            if p.grad is None:       # a layer the batch did not reach (PEFT would fail on it)
                p.grad = torch.zeros_like(p)
        shim = types.SimpleNamespace(model=self.base_model, peft_config=self.peft_config,
                                     trainable_adapter_name=ADAPTER, rankallocator=self.rankallocator)
        PeftAdaLoraModel.update_and_allocate(shim, step)
        pattern = self.peft_config[ADAPTER].rank_pattern
        self.config.rank_pattern = {k: list(map(bool, v)) for k, v in pattern.items()} if pattern else None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict()
        for name, layer in self.adapter_layers():
            for pname, p in layer.adalora.named_parameters():
                if pname.split(".")[0] in ("lora_A", "lora_B", "lora_E"):
                    state[f"{name}.adalora.{pname}"] = p.detach().contiguous().cpu()
        return state

    def parameter_counts(self) -> dict[str, float]:
        """As the base, without PEFT's frozen `ranknum` scalars."""
        counts = super().parameter_counts()
        frozen = sum(p.numel() for _, layer in self.adapter_layers()
                     for n, p in layer.adalora.named_parameters() if n.startswith("ranknum."))
        counts["adapter"] -= frozen
        counts["per_task"] = counts["adapter"] / max(self.num_tasks, 1)
        return counts

    def rank_allocation(self) -> dict[str, int]:
        """{module name: triplets with a non-zero singular value}."""
        return {name: int(layer.adalora.lora_E[ADAPTER].ne(0).sum()) for name, layer in self.adapter_layers()}

    def _extra_metadata(self) -> dict[str, Any]:
        return {"rank_allocation": self.rank_allocation()}
