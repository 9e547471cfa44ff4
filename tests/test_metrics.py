"""Metrics against hand-derived values and scikit-learn / scipy called directly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import matthews_corrcoef

from morelora.data import TaskSpec, get_task
from morelora.metrics import (
    compute_metrics,
    predictions_from_logits,
    predictions_from_text,
    reference_score,
    references,
)

CLS = TaskSpec("cls", "classification", ["accuracy"], num_labels=2, label_words=["neg", "pos"])
MRPC = get_task("mrpc")
COLA = get_task("glue/cola")
STSB = get_task("glue/stsb")
MC = TaskSpec("mc", "multiple_choice", ["accuracy"], num_labels=4)


def test_accuracy_and_f1_hand_values():
    assert compute_metrics(CLS, [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}
    # tp = 2 (idx 0, 3), fp = 1 (idx 1), fn = 1 (idx 4): F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    result = compute_metrics(MRPC, [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert list(result) == ["f1", "accuracy"]  # main metric first
    assert result["f1"] == pytest.approx(2 / 3) and result["accuracy"] == pytest.approx(0.6)
    # an unparsed text prediction (-1) counts as wrong, not as an extra class of F1
    assert compute_metrics(MRPC, [1, -1], [1, 1])["f1"] == pytest.approx(2 / 3)


def test_matthews_and_correlations():
    preds, refs = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    # TP=2 TN=2 FP=1 FN=1 -> (4 - 1) / sqrt(3*3*3*3) = 1/3
    mcc = compute_metrics(COLA, preds, refs)["matthews_correlation"]
    assert mcc == pytest.approx(1 / 3) and mcc == pytest.approx(matthews_corrcoef(refs, preds))
    result = compute_metrics(STSB, [1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert list(result) == ["pearson", "spearman"]
    assert result == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    p, r = [0.1, 0.4, 0.35, 0.8, 0.5], [0.0, 1.0, 2.0, 3.0, 2.5]
    result = compute_metrics(STSB, p, r)
    assert result["pearson"] == pytest.approx(pearsonr(p, r).statistic)
    assert result["spearman"] == pytest.approx(0.9)  # one adjacent rank swap: 1 - 6*2/(5*24)
    assert compute_metrics(STSB, [1.0] * 3, [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert spearmanr(p, r).statistic == pytest.approx(0.9)


def test_exact_match_and_errors():
    t2t = TaskSpec("t", "text2text", [])
    assert compute_metrics(t2t, ["4 ", "five"], ["4", "5"]) == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="2 predictions for 3"):
        compute_metrics(CLS, [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(TaskSpec("x", "classification", ["bleu"]), [0], [0])


def test_predictions_from_logits_and_text():
    logits = torch.tensor([[0.1, 2.0, float("-inf")], [3.0, -1.0, 0.0], [float("-inf"), -5.0, -4.0]])
    assert predictions_from_logits(MC, logits) == [1, 0, 2]
    reg_logits = torch.tensor([[0.5, float("-inf")], [2.0, float("-inf")]])
    assert predictions_from_logits(STSB, reg_logits) == [0.5, 2.0]
    assert predictions_from_text(CLS, [" pos", "NEG", "maybe"], [{}] * 3) == [1, 0, -1]
    mc_examples = [{"choices": ["Mars", "the Moon"]}, {"choices": ["a", "b"]}]
    assert predictions_from_text(MC, ["the moon", "c"], mc_examples) == [1, -1]
    assert predictions_from_text(STSB, ["3.4", "n/a"], [{}] * 2) == [3.4, 0.0]
    assert references(MC, [{"gold": 2}]) == [2] and references(STSB, [{"label": 1}]) == [1.0]


def test_reference_scores_hand_values():
    train = [{"text": "", "label": y} for y in [1, 1, 0]]
    test = [{"text": "", "label": y} for y in [1, 0, 0, 0]]
    assert reference_score(CLS, train, test) == pytest.approx(0.25)
    # always 1: precision 1/4, recall 1 -> F1 = 0.4
    assert reference_score(MRPC, train, test) == pytest.approx(0.4)
    tie = [{"text": "", "label": y} for y in [1, 0]]
    assert reference_score(CLS, tie, test) == pytest.approx(0.75)  # tie -> smallest label (0)
    mc_test = [{"query": "", "choices": list("ab"), "gold": 0},
               {"query": "", "choices": list("abcd"), "gold": 1}]
    assert reference_score(MC, [], mc_test) == pytest.approx(0.375)
    reg = [{"text": "", "label": v} for v in [0.0, 1.0, 5.0]]
    assert reference_score(STSB, reg, reg) == 0.0


def test_reference_score_on_offline_sst2():
    splits = get_task("sst2").load()
    majority = Counter(ex["label"] for ex in splits["train"]).most_common(1)[0][0]
    expected = sum(ex["label"] == majority for ex in splits["test"]) / len(splits["test"])
    assert reference_score(get_task("sst2"), splits["train"], splits["test"]) == pytest.approx(expected)
    assert 0.4 < expected < 0.6
