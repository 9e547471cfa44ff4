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
    # answers in a fixed order (yes / no): the train split's most frequent position is the majority class
    yes_no = [{"query": "", "choices": ["yes", "no"], "gold": g} for g in [0, 0, 0, 1, 0, 1, 0, 0]]
    assert reference_score(MC, yes_no[:3], yes_no) == pytest.approx(6 / 8)
    assert reference_score(MC, [{"gold": 1}], yes_no) == pytest.approx(0.5)   # position 1 scores 2/8: chance
    reg = [{"text": "", "label": v} for v in [0.0, 1.0, 5.0]]
    assert reference_score(STSB, reg, reg) == 0.0


def test_reference_score_on_offline_sst2():
    splits = get_task("sst2").load()
    majority = Counter(ex["label"] for ex in splits["train"]).most_common(1)[0][0]
    expected = sum(ex["label"] == majority for ex in splits["test"]) / len(splits["test"])
    assert reference_score(get_task("sst2"), splits["train"], splits["test"]) == pytest.approx(expected)
    assert 0.4 < expected < 0.6


def test_reference_gap_against_a_hand_bootstrap():
    import numpy as np
    from sklearn.metrics import f1_score

    from morelora.metrics import reference_gap

    rng = np.random.default_rng(1)
    spec = TaskSpec("pair", "classification", ["f1", "accuracy"], num_labels=2)
    train = [{"text": "x", "label": int(v)} for v in [1, 1, 1, 0]]          # majority label 1
    test = [{"text": "x", "label": int(v)} for v in rng.integers(0, 2, 60)]
    refs = np.array([ex["label"] for ex in test])
    good = np.where(rng.random(60) < 0.9, refs, 1 - refs)
    gap = reference_gap(spec, good.tolist(), train, test, n_resamples=300, seed=7)
    idx = np.random.default_rng(7).integers(0, 60, size=(300, 60))         # the same resamples, by hand
    diffs = np.array([f1_score(refs[i], good[i]) - f1_score(refs[i], np.ones(60, int)) for i in idx])
    assert gap["diff"] == pytest.approx(f1_score(refs, good) - f1_score(refs, np.ones(60, int)))
    assert gap["low"] == pytest.approx(np.quantile(diffs, 0.025))
    assert gap["high"] == pytest.approx(np.quantile(diffs, 0.975))
    assert gap["p"] == pytest.approx((np.sum(diffs <= 0) + 1) / 301) and gap["p"] < 0.01
    # the trivial predictor itself is not above the reference
    same = reference_gap(spec, [1] * 60, train, test, n_resamples=100)
    assert same["diff"] == 0 and same["p"] == 1.0

    # multiple choice: accuracy against chance (the mean of 1 / number of choices) on each resample
    mc = TaskSpec("mc", "multiple_choice", ["accuracy"], num_labels=4)
    test = [{"query": "q", "choices": ["a", "b", "c", "d"][: 2 + k % 3], "gold": 0} for k in range(40)]
    preds = [0 if k % 2 else 1 for k in range(40)]                          # half right
    gap = reference_gap(mc, preds, [], test, n_resamples=200, seed=3)
    chance = np.array([1 / len(ex["choices"]) for ex in test])
    right = (np.array(preds) == 0).astype(float)
    idx = np.random.default_rng(3).integers(0, 40, size=(200, 40))
    diffs = right[idx].mean(1) - chance[idx].mean(1)
    assert gap["diff"] == pytest.approx(0.5 - chance.mean())
    assert gap["low"] == pytest.approx(np.quantile(diffs, 0.025))
    assert gap["p"] == pytest.approx((np.sum(diffs <= 0) + 1) / 201)
    # the same against the position prior when it beats chance: train says position 0, right 100 % here
    gap = reference_gap(mc, preds, [{"gold": 0}], test, n_resamples=200, seed=3)
    assert gap["diff"] == pytest.approx(0.5 - 1.0) and gap["p"] == 1.0
