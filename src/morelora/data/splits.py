"""Seeded splitting and subsampling of example lists (shared by the offline suite and the task registry).

Every function is deterministic given its seed and keeps examples in their original order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SPLITS", "SPLIT_SEED", "Example", "Splits", "hold_out", "split_by_fractions", "subsample"]

Example = dict[str, Any]
Splits = dict[str, list[Example]]

SPLITS = ("train", "validation", "test")
#: Seed of every fixed split we derive ourselves (hold-outs, file splits without a "split" column).
SPLIT_SEED = 1234


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
