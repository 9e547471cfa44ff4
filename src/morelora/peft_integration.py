"""morelora's methods as PEFT methods: ``peft.get_peft_model(model, MoREConfig(...))`` returns a ``PeftModel``.

Every method config is a ``peft.PeftConfig`` (``TaskAdapterConfig``). Each method class declares itself here when
it is defined (``declare``; this module imports no other morelora module, so no import circle runs through it), and
the first config built registers the declared methods with PEFT's public hook (``peft.utils.register_peft_method``),
each with the tuner ``TaskAdapterTuner``: PEFT's tuner interface over morelora's own ``TaskAdapterModel`` (the
same layers, task table, routing, save format), so ``PeftModel`` save / load / ``AutoPeftModelFor*`` / Trainer
checkpoints work as for PEFT's methods. Keys in the saved safetensors are PEFT's
(``base_model.model.<module>.<param>``); morelora's own save format (a run folder's ``adapter/``) loads through
PEFT too (its ``adapter_config.json`` carries ``peft_type``).

PEFT is closed in two places, and this module is the only one that patches it (``tests/test_peft_integration.py``
fails loudly when PEFT changes either):

1. ``PeftType`` is a closed Enum: ``register_peft_method`` refuses a name without a member, so one member per method
   (``MORE``, ``MULTILORA``, ...) is added to it (``_add_peft_type``).
2. ``PeftModelForCausalLM.forward`` (and the other task classes) pass ``task_ids`` on only for PEFT's Poly, and plain
   ``PeftModel.forward`` calls the base model directly, skipping the tuner. For a morelora tuner, ``forward``,
   ``generate`` and ``disable_adapter`` of ``PeftModel`` and its task classes are the tuner's (``forward``:
   ``TaskAdapterModel.forward``, task ids to the layers and auxiliary losses added to ``out.loss``;
   ``disable_adapter``: ``TaskAdapterModel.disable_adapter``, as PEFT's reads ``BaseTuner`` layer states); other
   PEFT methods are untouched (``_route_to_tuner``).

The base model's ``forward`` also takes ``task_ids`` (an instance attribute, as TRL's fused LM head does): it shows
in the signature transformers' ``Trainer`` reads to keep dataset columns, and a wrapper that calls the inner model
with ``task_ids`` reaches the layers too.

Supported: peft >= 0.21, < 0.22 (tested with 0.21.2).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, ClassVar

import peft
import peft.peft_model
from peft.utils import PeftType, register_peft_method
from torch import nn

from .errors import CheckpointError, MoreLoraError

#: PEFT versions this module was written and tested against (the patches read PEFT's internals)
SUPPORTED_PEFT = (">=0.21", "<0.22")
#: morelora methods that are PEFT's own (``lora``, ``adalora`` wrap PEFT's LoRA / AdaLoRA): not registered again
PEFT_OWN_METHODS = ("lora", "adalora")
#: the prefix of PEFT's keys of the wrapped model's tensors in a PeftModel's state dict
PEFT_KEY_PREFIX = "base_model.model."

#: the methods of PeftModel (and its task classes) that a morelora tuner answers itself
ROUTED_METHODS = ("forward", "generate", "disable_adapter")

_registered: dict[type, PeftType] = {}
#: {config class: (method name, TaskAdapterModel class)}: every morelora method class defined so far (``declare``)
_declared: dict[type, tuple[str, type]] = {}


# --------------------------------------------------------------------------------------------- registration
def _add_peft_type(name: str) -> PeftType:
    """The member `name` of PEFT's closed `PeftType` enum, added when missing (patch 1 of 2)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    type.__setattr__(PeftType, name, member)   # EnumType.__setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def declare(config_class: type, method_name: str, model_class: type) -> None:
    """Record a morelora method (``TaskAdapterModel.__init_subclass__`` calls this for every method class, so this
    module imports no other morelora module: the registry, the tuners and their base all import it)."""
    _declared[config_class] = (method_name, model_class)


def register() -> dict[type, PeftType]:
    """Register every declared morelora method with PEFT (each once): ``{config class: PeftType}``. The methods of
    ``morelora.methods`` are all declared once that module is imported."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for config_class, (name, _) in list(_declared.items()):
        if name in PEFT_OWN_METHODS or config_class in _registered:
            continue
        peft_type = _add_peft_type(name.upper())
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            register_peft_method(name=name, config_cls=config_class, model_cls=TaskAdapterTuner)
        _registered[config_class] = peft_type
    _route_to_tuner()
    return _registered


def peft_type_of(config_class: type) -> PeftType | None:
    """The PeftType of a morelora config class; None for ``lora`` / ``adalora`` (PEFT's own methods)."""
    return register().get(config_class)


def model_class_of(config: Any) -> type:
    """The morelora method class (a ``TaskAdapterModel``) whose config `config` is."""
    try:
        return _declared[type(config)][1]
    except KeyError:
        raise MoreLoraError(f"{type(config).__name__} is not the config of a morelora method") from None


# --------------------------------------------------------------------------------------------- patch 2: routing
def _route_to_tuner() -> None:
    """``forward`` / ``generate`` of PeftModel and its task classes call a morelora tuner itself (patch 2 of 2)."""
    classes = [c for c in vars(peft.peft_model).values() if isinstance(c, type) and issubclass(c, peft.PeftModel)]
    for cls in classes:
        for name in ROUTED_METHODS:
            original = cls.__dict__.get(name)
            if original is None or getattr(original, "_morelora_routed", False):
                continue

            def routed(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any):
                tuner = self._modules.get("base_model")
                if isinstance(tuner, TaskAdapterTuner):
                    return getattr(tuner, _name)(*args, **kwargs)
                return _original(self, *args, **kwargs)

            functools.update_wrapper(routed, original)
            routed._morelora_routed = True
            setattr(cls, name, routed)


# --------------------------------------------------------------------------------------------- the tuner
class TaskAdapterTuner(nn.Module):
    """PEFT's tuner (``PeftModel.base_model``) for a morelora method: holds the wrapped model as ``model`` (PEFT's key
    layout) and drives it with a ``TaskAdapterModel`` (``adapter``: morelora's layers, routing and losses).

    ``config`` is the wrapped model's config, as in PEFT; the adapter's is ``peft_config[adapter_name]``. Other
    attributes come from the ``TaskAdapterModel`` (``aux_losses``, ``task_ranks()``, ``merge_task``,
    ``export_lora``...).
    """

    #: the task ids reach the layers through the model's per-call state: `inject_adapter_in_model` alone cannot run it
    uses_shared_state: ClassVar[bool] = True

    def __init__(self, model: nn.Module, peft_config: dict[str, Any] | Any, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config = dict(peft_config) if isinstance(peft_config, dict) else {adapter_name: peft_config}
        self.active_adapter = adapter_name
        config = self.peft_config[adapter_name]
        adapter = model_class_of(config)(model, config)
        self.__dict__["adapter"] = adapter   # not a submodule: its modules are `model`'s (one state-dict entry each)
        if config.inference_mode:
            self.set_requires_grad(adapter_name, False)
        _take_task_ids(model, adapter)

    # -- what PeftModel reads
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter") or "adapter" not in self.__dict__:
                raise
            return getattr(self.__dict__["adapter"], name)

    def train(self, mode: bool = True) -> TaskAdapterTuner:
        super().train(mode)
        self.adapter.train(mode)   # its own flag (routing reads it); its modules are model's, already set
        return self

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        if task_ids is None and self.adapter.adapter_disabled:
            return self.model(*args, **kwargs)   # PeftModel.disable_adapter(): the base model, no task ids needed
        return self.adapter(*args, task_ids=task_ids, **kwargs)

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        if task_ids is None and self.adapter.adapter_disabled:
            return self.model.generate(*args, **kwargs)
        return self.adapter.generate(*args, task_ids=task_ids, **kwargs)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = self.adapter.adapter_state_dict().keys()
        params = dict(self.model.named_parameters())
        for key in names:
            if key in params:
                params[key].requires_grad_(requires_grad)

    def disable_adapter_layers(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self.adapter.disable_adapter())
        self.__dict__["_disabled"] = stack

    def enable_adapter_layers(self) -> None:
        stack = self.__dict__.pop("_disabled", None)
        if stack is not None:
            stack.close()

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise MoreLoraError("a morelora adapter holds every task in one adapter: PeftModel.add_adapter / load_adapter "
                            "with a second adapter name is not supported (add a task with model.add_task(name))")

    def merge_and_unload(self, task: str | int | None = None, **_: Any) -> nn.Module:
        """The wrapped model with task `task` merged and the adapter removed (PEFT's, for one task)."""
        if task is None:
            raise MoreLoraError(f"name the task to merge: merge_and_unload(task=...), one of {self.adapter.tasks}")
        self.model.__dict__.pop("forward", None)
        return self.adapter.merge_and_unload(task)

    # -- PEFT's state-dict hooks (save_pretrained, load_adapter, Trainer checkpoints)
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: Any, adapter_name: str,
                                state_dict: dict[str, Any], unwanted_adapter_names: list[str]) -> dict[str, Any]:
        """The adapter's tensors of `state_dict` (a PeftModel's, keys ``base_model.model.<name>``)."""
        keys = _adapter_keys(model)
        return {k: state_dict[k] for k in keys if k in state_dict}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key   # one adapter per model: its keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: Any, adapter_name: str,
                                           state_dict: dict[str, Any]) -> dict[str, Any]:
        """PEFT's keys (morelora's own save has the wrapped model's names: the prefix is added), all of them."""
        state = {k if k.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + k: v for k, v in state_dict.items()}
        expected = set(_adapter_keys(model))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(f"the adapter weights do not fit this model: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
        return state


def _adapter_keys(model: nn.Module) -> list[str]:
    """PeftModel state-dict keys of the adapter's trainable tensors (adapter parameters, task heads)."""
    tuner = model.base_model if isinstance(model, peft.PeftModel) else model
    return [PEFT_KEY_PREFIX + k for k in tuner.adapter.adapter_state_dict()]


def _take_task_ids(model: nn.Module, adapter: nn.Module) -> None:
    """`model.forward` takes `task_ids` too (`TaskIdsForward`)."""
    if "task_ids" not in inspect.signature(model.forward).parameters:
        model.forward = TaskIdsForward(model, adapter)


class TaskIdsForward:
    """A model's forward that also takes `task_ids`: with them it runs through `adapter` (task ids to the layers,
    auxiliary losses), without them it is the model's own forward (which the adapter calls). An object, not a
    closure, so that `copy.deepcopy` of the model gives a forward of the copy."""

    def __init__(self, model: nn.Module, adapter: nn.Module) -> None:
        self.model, self.adapter = model, adapter
        own = type(model).forward.__get__(model)
        sig = inspect.signature(own)
        params = list(sig.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        self.__signature__ = sig.replace(parameters=params)
        self.__doc__ = own.__doc__

    def __call__(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        if task_ids is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.adapter(*args, task_ids=task_ids, **kwargs)
