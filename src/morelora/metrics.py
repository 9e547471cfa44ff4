"""Task metrics (scikit-learn / scipy) and reference scores.

Metric names: ``accuracy``, ``f1`` (F1 of class 1 for binary tasks, macro F1 otherwise),
``matthews_correlation``, ``pearson``, ``spearman``, ``exact_match`` (stripped strings). Values are
fractions in [0, 1] (correlations in [-1, 1]); an undefined correlation (constant predictions) is 0.0.

Predictions and references are class indices (classification, multiple choice), floats (regression) or
strings (text-to-text); :func:`predictions_from_logits` and :func:`predictions_from_text` produce them from
model outputs and :func:`references` from examples.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from morelora.data.tasks import Example, TaskSpec


def _correlation(fn: Callable) -> Callable[[Sequence, Sequence, TaskSpec], float]:
    def metric(predictions: Sequence, refs: Sequence, spec: TaskSpec) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on constant input and returns nan
            value = float(fn(np.asarray(predictions, float), np.asarray(refs, float)).statistic)
        return 0.0 if math.isnan(value) else value

    return metric


def _f1(predictions: Sequence, refs: Sequence, spec: TaskSpec) -> float:
    if (spec.num_labels or 2) <= 2:  # F1 of the positive class; robust to unparsed predictions (-1)
        return float(f1_score(refs, predictions, labels=[1], average="macro", zero_division=0))
    return float(f1_score(refs, predictions, average="macro", zero_division=0))


METRICS: dict[str, Callable[[Sequence, Sequence, TaskSpec], float]] = {
    "accuracy": lambda p, r, spec: float(accuracy_score(r, p)),
    "f1": _f1,
    "matthews_correlation": lambda p, r, spec: float(matthews_corrcoef(r, p)),
    "pearson": _correlation(pearsonr),
    "spearman": _correlation(spearmanr),
    "exact_match": lambda p, r, spec: float(accuracy_score([str(x).strip() for x in r],
                                                           [str(x).strip() for x in p])),
}


def compute_metrics(spec: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """``{metric: value}`` for every metric of ``spec``, main metric first."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError(f"task {spec.name!r}: no examples to score")
    unknown = [m for m in spec.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, references, spec) for name in spec.metrics}


def references(spec: TaskSpec, examples: Sequence[Example]) -> list[Any]:
    """Gold values of ``examples``: label, gold choice index or target text."""
    if spec.kind == "multiple_choice":
        return [ex["gold"] for ex in examples]
    if spec.kind == "text2text":
        return [ex["target"] for ex in examples]
    if spec.kind == "regression":
        return [float(ex["label"]) for ex in examples]
    return [int(ex["label"]) for ex in examples]


def predictions_from_logits(spec: TaskSpec, logits: torch.Tensor | np.ndarray) -> list[Any]:
    """Class / choice index (argmax; ``-inf`` padding never wins) or regression value ``logits[:, 0]``."""
    logits = torch.as_tensor(logits).detach().float().cpu()
    if spec.kind == "regression":
        return logits[:, 0].tolist()
    if spec.kind == "text2text":
        raise ValueError(f"task {spec.name!r} is text2text: use predictions_from_text")
    return logits.argmax(dim=-1).tolist()


def predictions_from_text(spec: TaskSpec, texts: Sequence[str], examples: Sequence[Example]) -> list[Any]:
    """Map generated texts back to predictions: label word / choice text -> index (-1 if none matches),
    number -> float (0.0 if unparsable), text-to-text -> stripped text."""
    out: list[Any] = []
    for text, ex in zip(texts, examples):
        text = text.strip()
        if spec.kind == "classification":
            words = [w.lower() for w in (spec.label_words or [str(i) for i in range(spec.num_labels or 0)])]
            out.append(words.index(text.lower()) if text.lower() in words else -1)
        elif spec.kind == "multiple_choice":
            choices = [c.strip().lower() for c in ex["choices"]]
            out.append(choices.index(text.lower()) if text.lower() in choices else -1)
        elif spec.kind == "regression":
            try:
                out.append(float(text))
            except ValueError:
                out.append(0.0)
        else:
            out.append(text)
    return out


def reference_score(spec: TaskSpec, train: Sequence[Example], test: Sequence[Example]) -> float:
    """Main-metric score of a trivial predictor on ``test``.

    classification / text-to-text: always the most frequent train label / target (ties: the smallest);
    regression: always the train mean (correlation undefined -> 0.0); multiple choice: the better of chance
    (the mean of ``1 / num_choices``) and always the most frequent train answer position, which is the majority
    class of a task whose choices come in a fixed order (BoolQ: "yes" / "no").
    """
    if spec.kind == "multiple_choice":
        return float(_mc_reference(train, test).mean())
    constant = _constant_prediction(spec, train)
    return compute_metrics(spec, [constant] * len(test), references(spec, test))[spec.main_metric]


def _mc_reference(train: Sequence[Example], test: Sequence[Example]) -> np.ndarray:
    """Per test example, the multiple-choice reference's score: 1 / num_choices (chance) or, when it scores
    higher on ``test``, whether the gold is the train split's most frequent answer position (ties: the first)."""
    chance = np.array([1.0 / len(ex["choices"]) for ex in test])
    if not train:
        return chance
    counts = Counter(int(ex["gold"]) for ex in train)
    position = min(counts, key=lambda j: (-counts[j], j))
    prior = np.array([float(int(ex["gold"]) == position) for ex in test])
    return prior if prior.mean() > chance.mean() else chance


def _constant_prediction(spec: TaskSpec, train: Sequence[Example]) -> Any:
    train_refs = references(spec, train)
    if spec.kind == "regression":
        return float(np.mean(train_refs))
    counts = Counter(train_refs)
    return min(counts, key=lambda v: (-counts[v], v))


def bootstrap_tail(diffs: np.ndarray, upper: bool = False) -> float:
    """One-sided bootstrap p-value: the add-one fraction ``(#{d <= 0} + 1) / (B + 1)`` of the resampled
    differences at or below 0 (``upper``: at or above 0). The add-one keeps it above 0 with finitely many
    resamples."""
    d = np.asarray(diffs)
    count = np.count_nonzero(d >= 0) if upper else np.count_nonzero(d <= 0)
    return float((count + 1) / (len(d) + 1))


def reference_gap(spec: TaskSpec, predictions: Sequence, train: Sequence[Example], test: Sequence[Example],
                  n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """How far the main score is above the trivial predictor's (:func:`reference_score`), with uncertainty.

    Test examples are resampled with replacement (``n_resamples`` times); on each resample both the model's
    and the trivial predictor's score are computed. Returns ``diff`` (observed score - reference score), the
    percentile ``confidence`` interval ``low`` / ``high`` of the difference, and the one-sided bootstrap
    ``p`` of "no better than the reference": ``(#{diff* <= 0} + 1) / (n_resamples + 1)``
    (:func:`bootstrap_tail`, the tail of compare's two-sided p in :mod:`morelora.experiments.statistics`).
    """
    refs, preds = references(spec, test), list(predictions)
    n, main = len(refs), spec.main_metric
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    if spec.kind == "multiple_choice":
        reference = _mc_reference(train, test)[idx].mean(1)
    else:
        constant = _constant_prediction(spec, train)
    if main in ("accuracy", "exact_match"):
        norm = (lambda x: str(x).strip()) if main == "exact_match" else (lambda x: x)
        right = np.array([norm(p) == norm(r) for p, r in zip(preds, refs)], dtype=float)
        scores = right[idx].mean(1)
        if spec.kind != "multiple_choice":
            reference = np.array([norm(constant) == norm(r) for r in refs], dtype=float)[idx].mean(1)
    else:
        metric = METRICS[main]
        scores = np.array([metric([preds[j] for j in i], [refs[j] for j in i], spec) for i in idx])
        if spec.kind != "multiple_choice":
            reference = np.array([metric([constant] * n, [refs[j] for j in i], spec) for i in idx])
    diffs = scores - reference
    observed = compute_metrics(spec, preds, refs)[main] - reference_score(spec, train, test)
    alpha = (1.0 - confidence) / 2
    return {"diff": float(observed), "low": float(np.quantile(diffs, alpha)),
            "high": float(np.quantile(diffs, 1.0 - alpha)),
            "p": bootstrap_tail(diffs)}
