"""``morelora curves [LABEL=]RUN_DIR ... [--out FILE.png] [--tolerance 0.01]``: validation curves of several runs.

Reads the validation rows that ``train.eval_steps`` writes to each run's ``metrics.jsonl`` (``eval_<task>``,
``eval_average``), prints the average per step side by side, and for each run its *plateau step*: the first
evaluated step after which the validation average never rises more than the tolerance above its value there.
That is the budget question ("have the scores stopped rising?") answered from the curves alone.
The figure has one panel per task plus the average, one line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from morelora.analysis.plots import _figure, _grid, _save, read_metrics

__all__ = ["configure", "main", "plateau_step", "plot_curves", "read_curves"]


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"average" | task: [(step, validation score), ...]}`` from a run's metrics.jsonl, in step order."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        if row.get("split") != "validation":
            continue
        for key, value in row.items():
            if key.startswith("eval_") and isinstance(value, (int, float)):
                curves.setdefault(key.removeprefix("eval_"), []).append((int(row["step"]), float(value)))
    return {k: sorted(v) for k, v in curves.items()}


def plateau_step(points: list[tuple[int, float]], tolerance: float) -> int | None:
    """First step s with every later score <= score(s) + ``tolerance``: the curve stopped rising (None: no points).

    A curve that falls after its peak has stopped rising too: the peak (or an earlier point within the
    tolerance of everything after it) is returned."""
    for i, (step, value) in enumerate(points):
        if max(v for _, v in points[i:]) <= value + tolerance:
            return step
    return None


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path,
                title: str = "validation score vs step") -> Path:
    """One panel per task (and the average, first), one line per run."""
    names = ["average"] + sorted({k for c in curves.values() for k in c} - {"average"})
    rows, cols = _grid(len(names), max_cols=3)
    fig = _figure(4.6 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        for label, c in curves.items():
            if c.get(name):
                xs, ys = zip(*c[name])
                ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("validation score x 100")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


def _parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    return (label, Path(path)) if sep else (Path(text).parent.name + "/" + Path(text).name, Path(text))


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``morelora curves``."""
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                   help="run folders trained with train.eval_steps (validation rows in metrics.jsonl)")
    p.add_argument("--out", help="write the figure here (PNG)")
    p.add_argument("--json", dest="json_out", help="write the curves and plateau steps here (JSON)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="plateau: every later average within this of the best (default 0.01 = 1 point)")


def main(args: argparse.Namespace) -> None:
    """``morelora curves``: the table, the plateau steps, optionally the figure and JSON."""
    from morelora.training.checkpoint import RunError

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for text in args.runs:
        label, path = _parse_run(text)
        if not (path / "metrics.jsonl").is_file():
            raise RunError(f"{path} has no metrics.jsonl: not a run folder")
        c = read_curves(path)
        if not c:
            raise RunError(f"{path}/metrics.jsonl has no validation rows: train with train.eval_steps > 0")
        curves[label] = c
    steps = sorted({s for c in curves.values() for s, _ in c.get("average", [])})
    width = max(12, *(len(label) for label in curves))
    print(f"{'step':>6}  " + "  ".join(f"{label:>{width}}" for label in curves))
    for step in steps:
        cells = [dict(c.get("average", [])).get(step) for c in curves.values()]
        print(f"{step:>6}  " + "  ".join(f"{'-' if v is None else f'{100 * v:.2f}':>{width}}" for v in cells))
    summary: dict[str, Any] = {}
    for label, c in curves.items():
        avg = c.get("average", [])
        best = max(avg, key=lambda p: p[1]) if avg else None
        summary[label] = {"plateau_step": plateau_step(avg, args.tolerance),
                          "best_step": best[0] if best else None, "best_average": best[1] if best else None,
                          "curves": c}
        print(f"{label}: best average {100 * best[1]:.2f} at step {best[0]}; no later gain over "
              f"{100 * args.tolerance:g} point(s) from step {summary[label]['plateau_step']} on"
              if best else f"{label}: no average")
    if args.out:
        print(f"-> {plot_curves(curves, args.out)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"tolerance": args.tolerance, "runs": summary}, indent=1) + "\n")
        print(f"-> {args.json_out}")
