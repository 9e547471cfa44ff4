"""``morelora sweep CONFIG --param P --values V [--seeds N] [--output-dir DIR] [key=value ...]``.

Trains CONFIG once per (value, seed) and tabulates the test score and the parameter cost against the value.

``--param``
    * any dotted config key (``method.r``, ``train.lr``, ``data.sampling``, ...): ``--values 4,8,16,32``.
      Values are read as YAML (``4`` is an int); separate them with ``;`` instead of ``,`` when a value itself
      contains commas (``--param method.target_modules --values "[query,value];[query,key,value,dense]"``).
    * ``tasks``: task subsets separated by ``;``, tasks within a subset by ``,``:
      ``--values "sst2,rte;sst2,rte,boolq,piqa"``. Entries of ``task_files`` outside a subset are dropped.
    * ``num_tasks``: ``--values 2,4,8`` trains on the first n tasks of the suite: the config's ``tasks``,
      followed by the offline suite's other tasks when n is larger. More tasks than ranks (``method.r=4`` with
      8 tasks) is allowed: tasks then share experts.

Runs
    ``DIR/<param>=<value>/seed<s>`` with ``train.seed = s`` (``s`` = the config's ``train.seed`` + 0..N-1) and
    ``train.output_dir`` set accordingly (``--param train.seed --values 0,1,2`` runs those seeds of one config).
    Every config (method options included) is checked before anything trains. Re-running is cheap: a run
    with ``eval.json`` is skipped (its saved config must match the planned one, except for logging / saving
    keys); an unfinished one resumes from its newest checkpoint.

Outputs in DIR
    ``sweep.json``  per value: average test score per seed, mean ± 95% t-interval, per-task means, adapter
                    parameters per task and trainable parameters (``eval.json``'s ``parameters``), and for MoRE
                    the mean rank the tasks use (final checkpoint's ``task_ranks``).
    ``sweep.md``    the table.     ``sweep.png``   score (± CI) and parameters per task vs the value (twin axes).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from morelora.config import ConfigError
from morelora.experiments.runs import PlannedRun, execute
from morelora.experiments.statistics import format_mean_ci, mean_ci

__all__ = ["SweepRun", "configure", "main", "parse_values", "plan_sweep", "summarize", "sweep"]


@dataclass
class SweepRun(PlannedRun):
    """One (value, seed) run of a sweep; ``label`` is the value's folder name, e.g. ``"method.r=8"``."""

    value: Any = None


def _error(message: str) -> Exception:
    return ConfigError(message)


def parse_values(param: str, text: str) -> list[Any]:
    """The swept values: task lists for ``tasks``, ints for ``num_tasks``, YAML scalars / lists otherwise."""
    if param == "tasks":
        values = [[t.strip() for t in part.split(",") if t.strip()] for part in text.split(";") if part.strip()]
        if any(not v for v in values):
            raise _error(f"--values {text!r}: an empty task subset")
    else:
        parts = [p.strip() for p in text.split(";" if ";" in text else ",") if p.strip()]
        values = []
        for p in parts:
            try:
                values.append(yaml.safe_load(p))
            except yaml.YAMLError:
                values.append(p)
        if param == "num_tasks" and any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise _error(f"--param num_tasks takes positive integers, got --values {text!r}")
    if not values:
        raise _error("--values is empty")
    keys = [json.dumps(v) for v in values]
    if len(set(keys)) != len(keys):
        raise _error(f"--values {text!r} lists a value twice")
    return values


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _slug(param: str, value: Any) -> str:
    text = "+".join(str(v) for v in value) if isinstance(value, list) else str(value)
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "value"
    return f"{param}={slug[:80]}"


def _suite(cfg: Any) -> list[str]:
    from morelora.data import OFFLINE_SUITE

    return list(cfg.tasks) + [t for t in OFFLINE_SUITE if t not in cfg.tasks]


def _with_tasks(raw: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    raw = dict(raw)
    raw["tasks"] = list(tasks)
    if raw.get("task_files"):
        raw["task_files"] = {k: v for k, v in raw["task_files"].items() if k in tasks}
    return raw


def plan_sweep(config: str | Path, param: str, values: Sequence[Any], seeds: int, output_dir: str | Path,
               overrides: Sequence[str] = ()) -> list[SweepRun]:
    """Configs of every (value, seed) run, all validated before anything trains."""
    from morelora.config import RunConfig, apply_overrides, load_config, set_dotted
    from morelora.methods import get_method

    if not isinstance(seeds, int) or seeds < 1:
        raise _error(f"--seeds must be at least 1, got {seeds}")
    if param == "train.seed" and seeds != 1:
        raise _error("--param train.seed sweeps the seeds itself: leave --seeds at 1")
    base = load_config(config, list(overrides))  # checks the file and the overrides
    raw = base.to_dict()
    if param not in ("tasks", "num_tasks"):
        top = param.split(".")[0]
        if top not in {"model", "data", "method", "train", "task_files"}:
            raise _error(f"--param {param!r}: use tasks, num_tasks or a dotted config key such as method.r")
    out = Path(output_dir)
    runs = []
    for value in values:
        if param == "tasks":
            vraw = _with_tasks(raw, value)
        elif param == "num_tasks":
            suite = _suite(base)
            if value > len(suite):
                raise _error(f"num_tasks={value}: the suite has only {len(suite)} tasks ({', '.join(suite)})")
            vraw = _with_tasks(raw, suite[:value])
        else:
            vraw = apply_overrides(raw, [])  # a deep copy
            try:
                set_dotted(vraw, param, value)
            except ValueError as e:
                raise _error(f"--param {param!r}: {e} is not a mapping in the config") from None
        label = _slug(param, value)
        for i in range(seeds):
            seed = int(value) if param == "train.seed" else base.train.seed + i
            run_dir = out / label / f"seed{seed}"
            cfg = RunConfig.from_dict(apply_overrides(vraw, [f"train.seed={seed}", f"train.output_dir={run_dir}"]))
            if i == 0:
                config_class = get_method(cfg.method_name).model_class.config_class
                config_class.from_dict({**cfg.method_options, "tasks": cfg.tasks})
            runs.append(SweepRun(label, seed, cfg, value=value))
    return runs


def _mean_rank(run_dir: Path) -> float | None:
    from morelora.training.checkpoint import ADAPTER_DIR, latest_checkpoint

    last = latest_checkpoint(run_dir)
    if last is None:
        return None
    ranks = json.loads((last / ADAPTER_DIR / "adapter_config.json").read_text()).get("task_ranks")
    values = [k for per_layer in (ranks or {}).values() for k in per_layer.values()]
    return sum(values) / len(values) if values else None


def summarize(param: str, runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """One row per value: scores per seed, mean ± CI, per-task means, parameters, mean rank."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        result = json.loads((run.run_dir / "eval.json").read_text())
        row = rows.setdefault(run.label, {"value": run.value, "label": run.label, "tasks": list(run.cfg.tasks),
                                          "seeds": [], "scores": [], "per_task_scores": {}, "runs": [],
                                          "mean_ranks": []})
        row["seeds"].append(run.seed)
        row["scores"].append(result["average"])
        row["runs"].append(str(run.run_dir))
        for task, r in result["tasks"].items():
            row["per_task_scores"].setdefault(task, []).append(r["score"])
        params = result.get("parameters", {})
        row["params_per_task"] = params.get("per_task")
        row["trainable_parameters"] = params.get("trainable")
        row["mean_ranks"].append(_mean_rank(run.run_dir))
    out = []
    for row in rows.values():
        ranks = [r for r in row.pop("mean_ranks") if r is not None]
        row["score"] = mean_ci(row["scores"])
        row["per_task"] = {t: mean_ci(v)["mean"] for t, v in row.pop("per_task_scores").items()}
        row["mean_rank"] = sum(ranks) / len(ranks) if ranks else None
        row["r"] = runs[[r.label for r in runs].index(row["label"])].cfg.method.get("r")
        out.append(row)
    return out


def _display(param: str, value: Any) -> str:
    if param == "tasks":
        return f"{len(value)}: {','.join(value)}"
    return _value_text(value)


def markdown(param: str, rows: Sequence[dict[str, Any]], title: str) -> str:
    """The ``sweep.md`` table."""
    has_rank = any(r["mean_rank"] is not None for r in rows)
    head = ["value", "tasks", "seeds", "test score (mean ± 95% CI)", "params per task", "trainable params"]
    head += ["mean rank k (r)"] if has_rank else []
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_display(param, r["value"]), str(len(r["tasks"])), str(len(r["seeds"])), format_mean_ci(r["score"]),
                 f"{r['params_per_task']:,.0f}" if r["params_per_task"] is not None else "n/a",
                 f"{r['trainable_parameters']:,}" if r["trainable_parameters"] is not None else "n/a"]
        if has_rank:
            cells.append(f"{r['mean_rank']:.2f} ({r['r']})" if r["mean_rank"] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Score: average over tasks of each task's main test metric; CI: Student t over seeds "
              "(n/a with one seed). Params per task: adapter parameters / number of tasks."]
    return "\n".join(lines) + "\n"


def plot(param: str, rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Score (± CI, seeds as dots) on the left axis and parameters per task on the right, vs the value."""
    from matplotlib.figure import Figure

    values = [r["value"] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    fig = Figure(figsize=(max(6.5, 1.1 * len(rows) + 3), 4.3), layout="constrained")
    ax = fig.subplots()
    means = [r["score"]["mean"] for r in rows]
    errs = [r["score"]["ci95"] or 0.0 for r in rows]
    h1 = ax.errorbar(xs, means, yerr=errs, marker="o", color="tab:blue", capsize=4, label="test score (mean ± 95% CI)")
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["scores"]), r["scores"], color="tab:blue", alpha=0.35, s=14)
    ax.set_ylabel("average test score", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    ax2 = ax.twinx()
    params = [r["params_per_task"] for r in rows]
    (h2,) = ax2.plot(xs, params, marker="s", linestyle="--", color="tab:orange", label="adapter params per task")
    ax2.set_ylabel("adapter parameters per task", color="tab:orange")
    ax2.tick_params(axis="y", labelcolor="tab:orange")
    ax2.set_ylim(bottom=0, top=max([p for p in params if p is not None], default=1) * 1.15)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [_display(param, v) if param != "tasks" else f"{len(v)} tasks" for v in values])
    if not numeric and param == "tasks":
        ax.set_xticklabels([f"{len(v)}: " + ",".join(v)[:40] for v in values], rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(param)
    ax.grid(alpha=0.3)
    ax.margins(x=0.1)
    fig.legend(handles=[h1, h2], loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def sweep(config: str | Path, param: str, values: str | Sequence[Any], seeds: int = 1,
          output_dir: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Plan, train (resumably) and summarise a sweep; returns the ``sweep.json`` content."""
    if isinstance(values, str):
        values = parse_values(param, values)
    out = Path(output_dir or f"runs/sweep-{Path(config).stem}-{re.sub(r'[^A-Za-z0-9._-]+', '_', param)}")
    runs = plan_sweep(config, param, values, seeds, out, overrides)
    status = execute(runs, "sweep", predictions=False, error=ConfigError, done="skipping")
    rows = summarize(param, runs)
    title = f"{Path(config).stem}: sweep over {param} ({seeds} seed{'s' if seeds > 1 else ''})"
    result = {"config": str(config), "param": param, "values": list(values), "seeds": seeds,
              "overrides": list(overrides), "status": status, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(param, rows, title)
    (out / "sweep.md").write_text(md)
    plot(param, rows, out / "sweep.png", title)
    print(md)
    print(f"-> {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    result["output_dir"] = str(out)
    return result


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``morelora sweep``."""
    p.add_argument("config", help="run config (YAML), e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--param", required=True,
                   help="what to sweep: a dotted config key (method.r), tasks, or num_tasks")
    p.add_argument("--values", required=True,
                   help="comma-separated values (4,8,16,32); for tasks: subsets separated by ';' "
                        "(\"sst2,rte;sst2,rte,boolq,piqa\")")
    p.add_argument("--seeds", type=int, default=1, help="seeds per value: train.seed, train.seed+1, ... (default 1)")
    p.add_argument("--output-dir", help="sweep folder (default: runs/sweep-<config>-<param>)")


def main(args: argparse.Namespace) -> None:
    """``morelora sweep``."""
    sweep(args.config, args.param, args.values, seeds=args.seeds, output_dir=args.output_dir,
          overrides=list(args.overrides))
