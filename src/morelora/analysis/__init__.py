"""Looking at trained runs: router plots (:mod:`.plots`), few-shot transfer (:mod:`.fewshot`), validation curves
(:mod:`.curves`).

The submodules import matplotlib / torch / transformers only inside their functions, so that building the
``morelora`` argument parser stays cheap. This module holds the small helpers they share (the mean and
t-interval over seeds are :mod:`morelora.experiments.statistics`'s, re-exported here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from morelora.experiments.statistics import format_mean_ci, mean_ci

if TYPE_CHECKING:
    from morelora.training.build import Run

__all__ = ["format_mean_ci", "load_trained_model", "mean_ci", "short_layer_name"]


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
