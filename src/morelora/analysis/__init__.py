"""Looking at trained runs: router plots (:mod:`.plots`), few-shot transfer (:mod:`.fewshot`), sweeps (:mod:`.sweep`).

The submodules import matplotlib / torch / transformers only inside their functions, so that building the
``morelora`` argument parser stays cheap. This module holds the small helpers they share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from morelora.training.build import Run

__all__ = ["format_mean_ci", "load_trained_model", "mean_ci", "short_layer_name"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """``{"mean", "std", "ci95", "n"}``: mean, sample std and the half-width of the Student-t interval of the mean.

    NaN / None values are dropped; with one value std and ci95 are ``None`` (unknown), not 0. The interval is
    :func:`morelora.compare.t_interval`'s, so sweeps, few-shot results and comparisons agree.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    try:
        from morelora.compare import t_interval
    except ImportError:  # pragma: no cover - compare.py not installed
        t_interval = _t_interval
    stat = t_interval(vals, confidence)
    return {"mean": stat["mean"], "std": stat["std"], "ci95": stat["half_width"], "n": stat["n"]}


def _t_interval(vals: Sequence[float], confidence: float) -> dict[str, Any]:
    n, mean = len(vals), sum(vals) / len(vals)
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "half_width": None}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {"mean": mean, "std": std, "n": n,
            "half_width": float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)}


def format_mean_ci(stat: dict[str, Any], digits: int = 4) -> str:
    """``"0.7123 ± 0.0150"`` (``"± n/a"`` with a single seed)."""
    if stat.get("mean") is None:
        return "n/a"
    ci = stat.get("ci95")
    return f"{stat['mean']:.{digits}f} ± {ci:.{digits}f}" if ci is not None else f"{stat['mean']:.{digits}f} ± n/a"


_LAYER_PATTERNS = [
    (r"attention\.self\.|self_attn\.|SelfAttention\.|DenseReluDense\.|mlp\.", ""),
    (r"EncDecAttention\.|encoder_attn\.", "cross."),
    (r"attention\.output\.dense", "attn.out"),
    (r"intermediate\.dense", "ffn.in"),
    (r"(?<=\.)output\.dense", "ffn.out"),
]


def short_layer_name(name: str) -> str:
    """A compact label for an adapted module: ``backbone.encoder.layer.3.attention.self.query`` -> ``L3.query``."""
    decoder = name.startswith("decoder.") or ".decoder." in name
    out = re.sub(r"^(?:backbone\.|base_model\.|model\.)+", "", name)
    out = re.sub(r"^(?:(?:encoder|decoder)\.)?(?:layers?|block|h)\.(\d+)\.", r"L\1.", out, count=1)
    out = re.sub(r"(?<=^L)(\d+)\.layer\.\d+\.", r"\1.", out)  # T5's sub-layer index
    for pattern, repl in _LAYER_PATTERNS:
        out = re.sub(pattern, repl, out)
    return ("dec." if decoder else "") + out if out else name


def load_trained_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """A run's tokenizer and adapted model with the checkpoint's weights, in eval mode, without loading its data.

    :func:`morelora.training.build.load_run` with ``with_data=False``: ``run.data`` holds empty splits (one per
    task); ``checkpoint`` defaults to the newest complete one.
    """
    from morelora.training.build import load_run

    run = load_run(run_dir, checkpoint, with_data=False)
    run.model.eval()
    return run
