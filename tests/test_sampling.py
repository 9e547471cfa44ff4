"""MultiTaskSampler: probabilities, empirical frequencies, epochs and exact resume."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from morelora.data.sampling import MultiTaskSampler, task_probabilities

SIZES = [100, 300, 600]


def test_probability_formulas():
    total = sum(SIZES)
    exp = [math.exp(n / total) for n in SIZES]
    assert np.allclose(task_probabilities(SIZES, "exp"), [w / sum(exp) for w in exp])
    assert np.allclose(task_probabilities(SIZES, "proportional"), [0.1, 0.3, 0.6])
    assert np.allclose(task_probabilities(SIZES, "uniform"), [1 / 3] * 3)
    roots = [10.0, math.sqrt(300), math.sqrt(600)]
    assert np.allclose(task_probabilities(SIZES, "temperature", 2.0), [r / sum(roots) for r in roots])
    # temperature 1 is proportional; a huge temperature approaches uniform
    assert np.allclose(task_probabilities(SIZES, "temperature", 1.0), [0.1, 0.3, 0.6])
    assert np.allclose(task_probabilities(SIZES, "temperature", 1e6), [1 / 3] * 3, atol=1e-4)
    sampler = MultiTaskSampler(SIZES, 4, strategy="proportional")
    assert sampler.task_probabilities() == pytest.approx([0.1, 0.3, 0.6])
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        task_probabilities(SIZES, "sqrt")
    with pytest.raises(ValueError):
        MultiTaskSampler([5, 0], 2)


@pytest.mark.parametrize("strategy,mixed", [("exp", False), ("proportional", False), ("temperature", True)])
def test_empirical_task_frequencies(strategy, mixed):
    sampler = MultiTaskSampler(SIZES, batch_size=4, strategy=strategy, temperature=3.0, mixed=mixed, seed=1)
    counts: Counter = Counter()
    for batch in islice(sampler, 6000):
        assert len(batch) == 4
        if not mixed:
            assert len({t for t, _ in batch}) == 1  # one task per batch
            counts[batch[0][0]] += 1
        else:
            counts.update(t for t, _ in batch)
    total = sum(counts.values())
    freqs = [counts[t] / total for t in range(3)]
    assert np.allclose(freqs, task_probabilities(SIZES, strategy, 3.0), atol=0.02)


def test_mixed_batches_do_mix_tasks():
    sampler = MultiTaskSampler([50, 50], batch_size=16, strategy="uniform", mixed=True)
    assert any(len({t for t, _ in batch}) == 2 for batch in islice(sampler, 10))


def test_each_epoch_is_a_permutation():
    sizes = [7, 10]
    sampler = MultiTaskSampler(sizes, batch_size=3, strategy="uniform", seed=3)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in islice(sampler, 200):
        for task, index in batch:
            seen[task].append(index)
    epoch_orders = []
    for task, n in enumerate(sizes):
        stream = seen[task]
        full_epochs = len(stream) // n
        assert full_epochs >= 5
        for e in range(full_epochs):
            epoch = stream[e * n : (e + 1) * n]
            assert sorted(epoch) == list(range(n))  # no repeats within an epoch
            epoch_orders.append(tuple(epoch))
    assert len(set(epoch_orders)) > 2  # reshuffled per epoch


def test_exact_resume_and_determinism():
    sizes = [7, 20, 33]  # small, so that the saved state is in the middle of later epochs
    sampler = MultiTaskSampler(sizes, batch_size=5, strategy="exp", mixed=False, seed=11)
    list(islice(sampler, 37))
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON round trip
    expected = list(islice(sampler, 80))

    resumed = MultiTaskSampler(sizes, batch_size=5, strategy="exp", mixed=False, seed=11)
    resumed.load_state_dict(state)
    assert list(islice(resumed, 80)) == expected

    fresh = MultiTaskSampler(sizes, batch_size=5, strategy="exp", mixed=False, seed=11)
    assert list(islice(fresh, 37 + 80))[37:] == expected
    other_seed = MultiTaskSampler(sizes, batch_size=5, strategy="exp", mixed=False, seed=12)
    assert list(islice(other_seed, 117))[37:] != expected


def test_exact_resume_mixed():
    sampler = MultiTaskSampler([13, 4, 9], batch_size=6, strategy="uniform", mixed=True, seed=5)
    list(islice(sampler, 9))
    state = sampler.state_dict()
    expected = list(islice(sampler, 30))
    resumed = MultiTaskSampler([13, 4, 9], batch_size=6, strategy="uniform", mixed=True, seed=5)
    resumed.load_state_dict(state)
    assert list(islice(resumed, 30)) == expected


def test_load_state_dict_rejects_other_configuration():
    state = MultiTaskSampler(SIZES, batch_size=5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        MultiTaskSampler(SIZES, batch_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="sizes"):
        MultiTaskSampler([1, 2, 3], batch_size=5).load_state_dict(state)
