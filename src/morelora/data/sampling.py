"""Multi-task batch sampling with exactly resumable state.

Task probabilities from the task sizes ``n_t`` (``N = sum n_t``):

* ``"exp"`` (default): ``p_t ∝ exp(n_t / N)``
* ``"proportional"``: ``p_t ∝ n_t``
* ``"uniform"``: ``p_t = 1 / T``
* ``"temperature"``: ``p_t ∝ n_t ** (1 / temperature)``

By default each batch comes from one task (draw the task, then take the next ``batch_size`` examples of
that task's current epoch); with ``mixed=True`` every example draws its own task. Each task walks through
a fresh seeded permutation of its examples per epoch, so no example repeats within an epoch of its task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

STRATEGIES = ("exp", "proportional", "uniform", "temperature")


def task_probabilities(sizes: Sequence[int], strategy: str = "exp", temperature: float = 1.0) -> np.ndarray:
    """Sampling probability of each task under ``strategy`` (see the module docstring)."""
    n = np.asarray(sizes, dtype=np.float64)
    if strategy == "exp":
        weights = np.exp(n / n.sum())
    elif strategy == "proportional":
        weights = n
    elif strategy == "uniform":
        weights = np.ones_like(n)
    elif strategy == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = n ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; choose from {STRATEGIES}")
    return weights / weights.sum()


class MultiTaskSampler:
    """Infinite iterator of batches, each a list of ``(task_index, example_index)`` pairs."""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        strategy: str = "exp",
        temperature: float = 1.0,
        mixed: bool = False,
        seed: int = 0,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"every task needs at least one example, got sizes {self.sizes}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.strategy = strategy
        self.temperature = temperature
        self.mixed = mixed
        self.seed = seed
        self._probs = task_probabilities(self.sizes, strategy, temperature)
        self._rng = np.random.default_rng(seed)  # draws the tasks
        self._epoch = [0] * len(self.sizes)  # current epoch of each task
        self._pos = [0] * len(self.sizes)  # next position in that epoch's permutation
        self._perm: dict[int, np.ndarray] = {}  # cache of the current permutation of each task

    def task_probabilities(self) -> list[float]:
        return self._probs.tolist()

    def _order(self, task: int) -> np.ndarray:
        """The permutation of ``task``'s examples for its current epoch (a function of seed, task, epoch)."""
        perm = self._perm.get(task)
        if perm is None:
            perm = np.random.default_rng([self.seed, task, self._epoch[task]]).permutation(self.sizes[task])
            self._perm[task] = perm
        return perm

    def _take(self, task: int, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order(task)
            chunk = order[self._pos[task] : self._pos[task] + k - len(out)]
            out.extend(chunk.tolist())
            self._pos[task] += len(chunk)
            if self._pos[task] == self.sizes[task]:
                self._epoch[task] += 1
                self._pos[task] = 0
                self._perm.pop(task, None)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self

    def __next__(self) -> list[tuple[int, int]]:
        if not self.mixed:
            task = int(self._rng.choice(len(self.sizes), p=self._probs))
            return [(task, i) for i in self._take(task, self.batch_size)]
        tasks = self._rng.choice(len(self.sizes), size=self.batch_size, p=self._probs).tolist()
        return [(t, self._take(t, 1)[0]) for t in tasks]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same sequence of batches (JSON-serialisable)."""
        return {
            "sizes": list(self.sizes), "batch_size": self.batch_size, "strategy": self.strategy,
            "temperature": self.temperature, "mixed": self.mixed, "seed": self.seed,
            "rng": self._rng.bit_generator.state, "epoch": list(self._epoch), "pos": list(self._pos),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("sizes", "batch_size", "strategy", "temperature", "mixed", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, not {getattr(self, key)!r}")
        self._rng.bit_generator.state = state["rng"]
        self._epoch = list(state["epoch"])
        self._pos = list(state["pos"])
        self._perm = {}
