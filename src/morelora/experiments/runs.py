"""The one executor of planned runs (``morelora compare``, ``morelora sweep``, ``bench/protocol.py``).

A planned run is an ordinary ``morelora train`` run: a label, a seed and a complete :class:`RunConfig` whose
``train.output_dir`` is the run folder. Executing a list of them is resumable: a run with ``eval.json`` is
reused (after checking that it was trained with the same config, bookkeeping keys aside), a run with a
``config.yaml`` but no ``eval.json`` resumes from its newest checkpoint, any other run trains from scratch.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morelora.config import BOOKKEEPING_TRAIN_KEYS, ConfigError, RunConfig, config_diff, load_run_config

__all__ = ["PREDICTIONS_NAME", "CompareError", "PlannedRun", "check_finished_run", "execute", "is_complete",
           "run_status", "write_predictions"]

PREDICTIONS_NAME = "test_predictions.json"


class CompareError(ConfigError):
    """Bad input to ``morelora compare`` (shown by the CLI as one ``morelora: error:`` line)."""


@dataclass
class PlannedRun:
    """One (label, seed) run of an experiment; ``cfg.train.output_dir`` is its folder."""

    label: str
    seed: int
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def check_finished_run(run_dir: Path, cfg: RunConfig, error: type[Exception] = CompareError) -> None:
    """A finished run is reused only if it was trained with the same config."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise error(f"{run_dir} has eval.json but no config.yaml: remove it or use another --output-dir")
    # a finished run may be reused, or moved, when only bookkeeping keys (output_dir, logging, ...) differ
    diff = config_diff(load_run_config(run_dir), cfg, ignore={f"train.{k}" for k in BOOKKEEPING_TRAIN_KEYS})
    if diff:
        raise error(f"finished run {run_dir} was trained with a different config ({', '.join(diff)}); "
                    "remove it or choose another --output-dir")


def run_status(run: PlannedRun) -> dict[str, Any]:
    """Where a run stands: ``{"status": "done" | "partial" | "not started", "step", "max_steps",
    "predictions"}`` (``step``: the newest complete checkpoint's; ``predictions``: test predictions written)."""
    from morelora.training.checkpoint import list_checkpoints

    max_steps = run.cfg.train.max_steps
    predictions = (run.run_dir / PREDICTIONS_NAME).is_file()
    if (run.run_dir / "eval.json").is_file():
        check_finished_run(run.run_dir, run.cfg)
        return {"status": "done", "step": max_steps, "max_steps": max_steps, "predictions": predictions}
    ckpts = list_checkpoints(run.run_dir)
    step = min(ckpts[-1][0], max_steps) if ckpts else 0
    return {"status": "partial" if step else "not started", "step": step, "max_steps": max_steps,
            "predictions": predictions}


def is_complete(status: dict[str, Any]) -> bool:
    """Trained, evaluated and its test predictions written (a :func:`run_status` result)."""
    return status["status"] == "done" and status["predictions"]


def execute(runs: Sequence[PlannedRun], name: str = "compare", *, predictions: bool = True,
            error: type[Exception] = CompareError, done: str = "reusing") -> list[str]:
    """Train (or resume) every unfinished run, one after another; with ``predictions``, then write its test
    predictions. Returns per run ``"trained"``, ``"resumed"`` or ``"skipped"`` (finished before).

    ``name`` starts every progress line, ``done`` says what happens to a finished run, ``error`` is raised for
    a finished run trained with another config.
    """
    from accelerate import PartialState

    from morelora import training

    main = PartialState().is_main_process
    status = []
    for k, run in enumerate(runs, 1):
        where = f"{name}: run {k}/{len(runs)}: {run.label} seed {run.seed}"
        if (run.run_dir / "eval.json").is_file():
            check_finished_run(run.run_dir, run.cfg, error)
            if main:
                print(f"{where}: done, {done} {run.run_dir}", flush=True)
            status.append("skipped")
        else:
            resume = (run.run_dir / "config.yaml").is_file()
            if main:
                print(f"{where}: {'resuming' if resume else 'training'} -> {run.run_dir}", flush=True)
            training.train(run.cfg, resume=resume)
            _free_memory()
            status.append("resumed" if resume else "trained")
        if predictions and not (run.run_dir / PREDICTIONS_NAME).is_file():
            write_predictions(run.run_dir)
            _free_memory()
    return status


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_predictions(run_dir: str | Path, batch_size: int | None = None) -> Path:
    """Per-example test predictions of a run's final checkpoint -> ``RUN_DIR/test_predictions.json``.

    Format: ``{"split": "test", "checkpoint": name, "tasks": {task: {"main_metric", "num_labels",
    "predictions": [...], "references": [...]}}}`` (class / choice indices, floats or strings).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from morelora.metrics import references
    from morelora.training import latest_checkpoint, load_run
    from morelora.training.evaluate import _predict, make_collator

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    accelerator = Accelerator(mixed_precision=run.cfg.train.mixed_precision)
    run.model.to(accelerator.device).eval()
    collator = make_collator(run, train=False)
    bs = batch_size or run.cfg.train.eval_batch_size
    tasks: dict[str, Any] = {}
    for t, spec in enumerate(run.specs):
        examples = run.data[t]["test"]
        if not examples:
            continue
        with accelerator.split_between_processes(list(range(len(examples)))) as mine:
            preds = _predict(run, run.model, collator, t, [examples[i] for i in mine], bs, accelerator)
        preds = gather_object(preds) if accelerator.num_processes > 1 else preds
        tasks[spec.name] = {"main_metric": spec.main_metric, "num_labels": spec.num_labels,
                            "predictions": _plain(preds), "references": _plain(references(spec, examples))}
    path = run_dir / PREDICTIONS_NAME
    if accelerator.is_main_process:
        last = latest_checkpoint(run_dir)
        payload = {"split": "test", "checkpoint": last.name if last else None, "tasks": tasks}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload) + "\n")
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return path


def _plain(values: Sequence[Any]) -> list[Any]:
    return [v.item() if hasattr(v, "item") else v for v in values]
