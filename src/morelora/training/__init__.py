"""Run assembly (``build.py``), the training loop (``trainer.py``), evaluation and run folders."""

from morelora.training.build import Run, build_run, load_run
from morelora.training.checkpoint import RunError, latest_checkpoint
from morelora.training.evaluate import evaluate
from morelora.training.trainer import evaluate_run, train

__all__ = [
    "Run", "RunError", "build_run", "evaluate", "evaluate_run", "latest_checkpoint", "load_run", "train",
]
