"""``morelora compare --plan``: every run's status and the hours it still needs on this machine. Trains nothing.

Per method it times a few training steps with the method's real config (the first unfinished run's), and a test
pass; per run it reads the status from the run folder (:func:`morelora.experiments.runs.run_status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from morelora.config import RunConfig
from morelora.experiments.runs import PlannedRun, is_complete, run_status

__all__ = ["PLAN_STEPS", "PLAN_WARMUP", "plan"]

#: ``--plan`` times this many training steps of each method after the warm-up ones.
PLAN_STEPS, PLAN_WARMUP = 3, 1


def _remaining_s(run: PlannedRun, status: dict[str, Any], timing: dict[str, float]) -> float:
    """Seconds the run still needs: remaining steps, validation passes during training, the final test pass."""
    tc = run.cfg.train
    if status["status"] == "done":
        return 0.0 if is_complete(status) else timing["test_s"]
    steps = range(status["step"] + 1, tc.max_steps)
    evals = sum(1 for k in steps if k % tc.eval_steps == 0) if tc.eval_steps else 0
    return (tc.max_steps - status["step"]) * timing["step_s"] + evals * timing["validation_s"] + timing["test_s"]


def plan(runs: Sequence[PlannedRun], timer: Any = None) -> str:
    """The ``--plan`` report: per method the measured seconds per step and per test pass, per run its status
    and the hours it still needs on this machine (runs one after another), and the total. Trains nothing.

    ``timer(cfg) -> {"step_s", "test_s", "validation_s"}`` (default: :func:`morelora.training.trainer.time_steps`
    with ``PLAN_STEPS`` steps after ``PLAN_WARMUP``) runs once per method that has unfinished runs.
    """
    if timer is None:
        from morelora.training.trainer import time_steps

        def timer(cfg: RunConfig) -> dict[str, float]:
            return time_steps(cfg, steps=PLAN_STEPS, warmup=PLAN_WARMUP)

    labels = list(dict.fromkeys(r.label for r in runs))
    by_label = {lab: [r for r in runs if r.label == lab] for lab in labels}
    status = {(r.label, r.seed): run_status(r) for r in runs}
    seed_lists = {tuple(r.seed for r in rs) for rs in by_label.values()}
    width = max(len(rs) for rs in by_label.values())
    heads = ([f"seed {s}" for s in next(iter(seed_lists))] if len(seed_lists) == 1
             else [f"run {i + 1}" for i in range(width)])
    lines = ["| method | s / step | test pass (s) | " + " | ".join(heads) + " | hours left |",
             "|---" * (width + 4) + "|"]
    total, counts = 0.0, {"done": 0, "partial": 0, "not started": 0}
    for lab, rs in by_label.items():
        todo = [r for r in rs if not is_complete(status[r.label, r.seed])]
        timing = None
        if todo:
            print(f"compare --plan: timing {lab} ({PLAN_STEPS} steps after {PLAN_WARMUP} warm-up) ...", flush=True)
            timing = timer(todo[0].cfg)
        cells, hours = [], 0.0
        for r in rs:
            st = status[r.label, r.seed]
            counts[st["status"]] += 1
            h = _remaining_s(r, st, timing) / 3600 if timing else 0.0
            hours += h
            text = {"done": "done" if st["predictions"] else "done (predictions left)",
                    "partial": f"partial {st['step']}/{st['max_steps']}",
                    "not started": f"not started 0/{st['max_steps']}"}[st["status"]]
            cells.append(text if st["status"] == "done" and h == 0 else f"{text}, {h:.2f} h")
        cells += [""] * (width - len(rs))
        total += hours
        step_s, test_s = ("-", "-") if timing is None else (f"{timing['step_s']:.2f}", f"{timing['test_s']:.1f}")
        lines.append(f"| {lab} | {step_s} | {test_s} | " + " | ".join(cells) + f" | {hours:.2f} |")
    lines.append("| total |" + " |" * (width + 2) + f" {total:.2f} |")
    done = [f"{r.label} seed {r.seed}" for r in runs if status[r.label, r.seed]["status"] == "done"]
    lines += ["", f"finished: {counts['done']} of {len(runs)} runs" + (f" ({', '.join(done)})" if done else "")
              + f"; partial: {counts['partial']}; not started: {counts['not started']}.",
              f"Expected: {total:.2f} hours on this machine, one run after another. Hours: remaining steps x "
              f"the time per step ({PLAN_STEPS} steps after {PLAN_WARMUP} warm-up) + validation passes during "
              "training + the final test pass (one timed batch of eval_batch_size test examples per task, "
              "scaled to the task's test / validation set size)."]
    return "\n".join(lines) + "\n"

