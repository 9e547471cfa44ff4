"""transformers' ``Trainer`` and TRL's ``SFTTrainer`` with a morelora adapter (a ``PeftModel`` from
``peft.get_peft_model(model, MoREConfig(...))``, see ``morelora.peft_integration``).

transformers' ``Trainer`` needs nothing from here to train: with a PeftModel it keeps the dataset's ``task_ids``
column (the wrapped model's forward takes ``task_ids``), stock collators pad it into the batch, ``out.loss`` already
holds the auxiliary losses, ``evaluate()`` reports ``eval_loss``, checkpoints hold the adapter only and
``resume_from_checkpoint`` loads it back. ``AuxLossCallback`` adds the auxiliary losses (unweighted, e.g.
``contrastive``) and the task loss to the logs.

TRL's ``SFTTrainer`` computes its loss from the model's log-probabilities (its fused LM head), not from ``out.loss``,
keeps a fixed set of dataset columns and collates only its own fields: ``TaskSFTTrainer`` (an ``SFTTrainer``)
adds the weighted auxiliary losses to its loss, keeps ``task_ids``, collates them, and logs like ``AuxLossCallback``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from .tuners.base import TaskAdapterModel

TASK_IDS = "task_ids"


def task_adapter(model: Any) -> TaskAdapterModel | None:
    """The ``TaskAdapterModel`` driving `model` (a PeftModel of a morelora method, or one itself); None otherwise."""
    for _ in range(4):   # DDP / accelerate wrappers -> PeftModel -> tuner -> TaskAdapterModel
        if isinstance(model, TaskAdapterModel):
            return model
        inner = model.__dict__.get("adapter") or model._modules.get("base_model") or model._modules.get("module")
        if inner is None:
            return None
        model = inner
    return None


class AuxLossCallback(TrainerCallback):
    """Adds the adapter's auxiliary losses (unweighted, e.g. ``contrastive``) and ``task_loss``, averaged over the
    optimizer steps since the last log, to the Trainer's logs and ``state.log_history``.

    >>> trainer = Trainer(model=peft_model, ..., callbacks=[AuxLossCallback()])
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        adapter = task_adapter(model)
        if adapter is None:
            return
        values = {name: float(v.detach()) for name, v in adapter.aux_losses.items()}
        if adapter.task_loss is not None:
            values["task_loss"] = float(adapter.task_loss)
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + v
        self.count += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self.count:   # training logs only (not eval / final summary)
            return
        means = {name: round(v / self.count, 6) for name, v in self.sums.items()}
        logs.update(means)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)
        self.sums, self.count = {}, 0


def collate_task_ids(collator: Any) -> Any:
    """`collator` that also returns the examples' ``task_ids`` (a LongTensor), for collators that drop fields they do
    not know (TRL's)."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or TASK_IDS not in examples[0]:
            return collator(examples)
        task_ids = torch.tensor([int(e[TASK_IDS]) for e in examples], dtype=torch.long)
        batch = collator([{k: v for k, v in e.items() if k != TASK_IDS} for e in examples])
        batch[TASK_IDS] = task_ids
        return batch

    return collate


def _sft_trainer_class() -> type:
    from trl import SFTTrainer

    class TaskSFTTrainer(SFTTrainer):
        """TRL's ``SFTTrainer`` for a morelora adapter: task ids from the dataset's ``task_ids`` column, the weighted
        auxiliary losses in the training loss, and the logs of ``AuxLossCallback``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator = collate_task_ids(self.data_collator)
            self.add_callback(AuxLossCallback())

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if TASK_IDS not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, TASK_IDS]

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            adapter = task_adapter(model)
            # training (return_outputs=False: one forward, whose auxiliary losses hold their graph; with
            # return_outputs=True TRL runs a second forward for the logits)
            aux = adapter.weighted_aux_loss() if adapter is not None and model.training else None
            if aux is None or not aux.requires_grad:
                return result
            if return_outputs:
                return result[0] + aux.to(result[0].dtype), result[1]
            return result + aux.to(result.dtype)

    return TaskSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "TaskSFTTrainer":   # built on first use: trl is optional
        cls = globals()["TaskSFTTrainer"] = _sft_trainer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
