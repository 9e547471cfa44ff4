"""Run assembly: a :class:`~morelora.config.RunConfig` made into tasks, data, tokenizer and adapted model.

:func:`build_run` is what the training loop (``trainer.py``) starts from; :func:`load_run` rebuilds a trained
run from its folder with a checkpoint's adapter, for evaluation, export, merging, serving and analysis. The
method comes from :func:`morelora.methods.build_method` with the config's ``method`` block, so nothing here
depends on which method a run uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from morelora.config import ConfigError, ModelConfig, RunConfig, load_run_config
from morelora.data import TaskSpec, get_task
from morelora.errors import CheckpointError
from morelora.training import checkpoint as ckpt

__all__ = [
    "Run", "build_base_model", "build_model", "build_run", "build_tasks", "check_finite_adapter", "check_method",
    "enable_gradient_checkpointing", "load_data", "load_run", "method_options", "model_kind", "nonfinite_tensors",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


@dataclass
class Run:
    """Everything a run is made of: config, tasks with their data, tokenizer and adapted model."""

    cfg: RunConfig
    kind: str  # encoder | seq2seq | causal
    specs: list[TaskSpec]
    data: list[dict[str, list[dict]]]  # per task: {"train", "validation", "test"}
    tokenizer: Any
    model: Any  # a TaskAdapterModel

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]


def model_kind(model_cfg: ModelConfig) -> str:
    """encoder | seq2seq | causal: ``model.kind`` or, for "auto", read from the HF config."""
    if model_cfg.kind != "auto":
        return model_cfg.kind
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hf = AutoConfig.from_pretrained(model_cfg.name_or_path)
    if getattr(hf, "is_encoder_decoder", False):
        return "seq2seq"
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())   # GPT-2's is GPT2LMHeadModel
    if any(a.endswith("ForCausalLM") or a in causal_classes for a in getattr(hf, "architectures", None) or []):
        return "causal"
    return "encoder"


def build_tasks(cfg: RunConfig) -> list[TaskSpec]:
    """TaskSpecs for ``cfg.tasks``: local files, then registered names (``data.source: hub`` maps plain
    GLUE / commonsense names to their hub versions). The spec takes the name used in the config."""
    specs = []
    for name in cfg.tasks:
        if name in cfg.task_files:
            f = cfg.task_files[name]
            spec = TaskSpec.from_file(name, f.path, f.kind, labels=f.labels)
        else:
            spec = get_task(_source_name(name, cfg.data.source))
            spec.name = name
        specs.append(spec)
    return specs


def _source_name(name: str, source: str) -> str:
    if source != "hub" or "/" in name:
        return name
    from morelora.data import list_tasks

    hub = list_tasks("hub")
    return next((h for h in (f"glue/{name}", f"hub/{name}") if h in hub), name)


def load_data(cfg: RunConfig, specs: list[TaskSpec]) -> list[dict[str, list[dict]]]:
    """Each task's ``{"train", "validation", "test"}`` examples, subsampled as ``cfg.data`` says."""
    d = cfg.data
    return [s.load(max_train=d.max_train_per_task, max_eval=d.max_eval_per_task, seed=cfg.train.seed)
            for s in specs]


def build_model(cfg: RunConfig, kind: str, specs: list[TaskSpec]) -> tuple[Any, Any]:
    """(tokenizer, adapted model): the frozen base model wrapped by the configured method."""
    from morelora.methods import build_method

    tokenizer, base = build_base_model(cfg, kind, specs)
    try:
        model = build_method(cfg.method_name, base, [s.name for s in specs], **method_options(cfg))
    except TypeError as e:  # e.g. an option of the wrong type reaching the method's config
        raise ConfigError(f"method: {e}") from None
    return tokenizer, model


def build_base_model(cfg: RunConfig, kind: str, specs: list[TaskSpec]) -> tuple[Any, Any]:
    """(tokenizer, base model): the model every method wraps (an encoder gets one head per task)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path, dtype, quant = cfg.model.name_or_path, DTYPES[cfg.model.dtype], cfg.model.quantization
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load(auto_class: Any) -> Any:
        if quant is None:
            return auto_class.from_pretrained(path, dtype=dtype)
        from morelora.quantization import bnb_config, check_bitsandbytes, prepare_quantized

        check_bitsandbytes(quant.bits)
        return prepare_quantized(auto_class.from_pretrained(path, dtype=dtype, quantization_config=bnb_config(quant)),
                                 path)

    if kind == "encoder":
        from morelora.heads import MultiTaskHeadModel

        try:
            base = MultiTaskHeadModel(load(AutoModel), specs, pooling=cfg.model.pooling,
                                      encoding=cfg.model.encoding, scorer=cfg.model.scorer,
                                      task_prefix=cfg.model.task_prefix)
        except ValueError as e:   # a task the shared scorer cannot score
            raise ConfigError(f"model.scorer: {e}") from None
    elif kind == "seq2seq":
        base = load(AutoModelForSeq2SeqLM)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = load(AutoModelForCausalLM)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    return tokenizer, base


def enable_gradient_checkpointing(base: Any) -> None:
    """transformers' gradient checkpointing (non-reentrant) on `base` or, for the encoder heads, its backbone;
    the adapter model keeps its layers' task ids alive for the recomputation (tuners/base.py)."""
    hf = base if hasattr(base, "supports_gradient_checkpointing") else getattr(base, "backbone", None)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing: {type(hf or base).__name__} does not support gradient "
                          "checkpointing in transformers; set model.gradient_checkpointing to false")
    enable = getattr(hf, "activation_checkpointing_enable", None)   # transformers >= 5 (the old name warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def method_options(cfg: RunConfig) -> dict[str, Any]:
    """The ``method`` block's options; a method whose config has a ``total_step`` field (a schedule over
    the run, e.g. AdaLoRA's rank budget) gets ``train.max_steps`` there unless the config sets it."""
    from morelora.methods import get_method

    options = dict(cfg.method_options)
    fields = {f.name for f in dataclasses.fields(get_method(cfg.method_name).model_class.config_class)}
    if "total_step" in fields and "total_step" not in options:
        options["total_step"] = cfg.train.max_steps
    return options


def check_method(cfg: RunConfig, task_names: list[str]) -> None:
    """Validate the ``method`` block against the method's config class before any model is loaded."""
    from morelora.methods import get_method

    try:
        get_method(cfg.method_name).model_class.config_class.from_dict(
            {**method_options(cfg), "tasks": list(task_names)})
    except TypeError as e:
        raise ConfigError(f"method: {e}") from None


def build_run(cfg: RunConfig, with_data: bool = True) -> Run:
    """Tasks, data, tokenizer and model for ``cfg`` (bad tasks / files / method options raise here).

    ``with_data=False`` leaves every task's splits empty: a trained model can be looked at without reading
    its data sets."""
    specs = build_tasks(cfg)
    check_method(cfg, [s.name for s in specs])
    data = load_data(cfg, specs) if with_data else [{"train": [], "validation": [], "test": []} for _ in specs]
    kind = model_kind(cfg.model)
    if cfg.model.chat_template and kind != "causal":
        raise ConfigError(f"model.chat_template applies to causal models; {cfg.model.name_or_path} is {kind}")
    tokenizer, model = build_model(cfg, kind, specs)
    if cfg.model.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.chat_template: the tokenizer of {cfg.model.name_or_path} has no chat template; "
                          "set model.chat_template: false (the plain prompt)")
    return Run(cfg, kind, specs, data, tokenizer, model)


# ------------------------------------------------------------------------------------------ run folders


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, full_precision: bool = False,
             with_data: bool = True) -> Run:
    """Rebuild a trained run from its folder: config, data, model with the checkpoint's adapter.

    ``checkpoint`` defaults to the newest complete one. ``full_precision``: load the base unquantised even when
    the run trained on a 4-bit / 8-bit one (the adapter does not depend on how the base is stored), e.g. to
    merge a task into float weights. ``with_data=False``: empty splits (see :func:`build_run`)."""
    run_dir = Path(run_dir)
    path = ckpt.resolve_checkpoint(run_dir, checkpoint)
    cfg = load_run_config(run_dir)
    if full_precision:
        cfg.model.quantization = None
    set_seed(cfg.train.seed)
    run = build_run(cfg, with_data)
    run.model.load_adapter(path / ckpt.ADAPTER_DIR)
    check_finite_adapter(run.model, path)
    return run


def nonfinite_tensors(model: Any) -> tuple[list[str], int]:
    """(names of the adapter tensors holding nan / inf, number of adapter tensors) of a method's model."""
    state = model.adapter_state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return bad, len(state)


def check_finite_adapter(model: Any, checkpoint: Path) -> None:
    """:class:`~morelora.errors.CheckpointError` when ``checkpoint``'s adapter (loaded into ``model``) holds nan /
    inf: nothing is evaluated, exported or served from a run that diverged."""
    bad, total = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"{checkpoint} holds non-finite values (nan / inf) in {len(bad)} of {total} adapter "
                              f"tensors (e.g. {bad[0]}): the run diverged; use an earlier checkpoint (--checkpoint) "
                              "or train again with a lower train.lr / train.head_lr")
