"""How far training moved each task's weights: ``||dW_t||_F`` per adapted module and task.

A MoRE task with expert k changes a layer by ``(alpha / r) B[:, :k] S^2 A[:k]``; with the linear rank scaling and
small k that change can be a fraction of what one LoRA of the same r learns on the same data. These functions
measure it on trained models, for any method whose task change is a weight matrix (MoRE, LoRA, MultiLoRA,
MoELoRA, ...; not the token-routed mixtures, whose change depends on the input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["relative_update_norms", "run_update_norms", "task_update_norms"]


def _delta(layer: Any, task: int) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):   # PEFT's own LoRA (the `lora` baseline): the same change for every task
        return layer.get_delta_weight(next(iter(layer.lora_A)))
    return layer.delta_weight(task)


@torch.no_grad()
def task_update_norms(model: Any) -> dict[str, dict[str, float]]:
    """``{task: {module: ||dW_t||_F}}`` of a `TaskAdapterModel`.

    Raises `MoreLoraError` for a method whose change is not one weight matrix per task (token routing)."""
    from morelora.errors import MoreLoraError

    out: dict[str, dict[str, float]] = {t: {} for t in model.tasks}
    for name, layer in model.adapter_layers():
        for t, task in enumerate(model.tasks):
            try:
                dw = _delta(layer, t)
            except NotImplementedError as e:
                raise MoreLoraError(f"{type(layer).__name__} has no per-task weight change (its experts are "
                                    f"routed per token): update norms apply to task-routed methods only") from e
            out[task][name] = float(dw.float().norm())
    return out


def run_update_norms(run_dir: str | Path, checkpoint: str | Path | None = None) -> dict[str, dict[str, float]]:
    """`task_update_norms` of a trained run (its newest complete checkpoint unless ``checkpoint``)."""
    from morelora.analysis import load_trained_model

    return task_update_norms(load_trained_model(run_dir, checkpoint).model)


def relative_update_norms(norms: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]
                          ) -> dict[str, float]:
    """Per task, ``sum_modules ||dW_t|| / sum_modules ||dW_t^ref||`` over the modules both runs adapt."""
    out = {}
    for task, per_module in norms.items():
        ref = reference[task]
        common = [m for m in per_module if m in ref]
        if not common:
            raise ValueError(f"the two runs adapt no module in common for task {task!r}")
        out[task] = sum(per_module[m] for m in common) / max(sum(ref[m] for m in common), 1e-30)
    return out
