"""Training, evaluation and run folders (see ``trainer.py`` for the data order and checkpoints)."""

from morelora.training.checkpoint import RunError, latest_checkpoint
from morelora.training.evaluate import evaluate
from morelora.training.trainer import Run, build_run, evaluate_run, load_run, train

__all__ = [
    "Run", "RunError", "build_run", "evaluate", "evaluate_run", "latest_checkpoint", "load_run", "train",
]
