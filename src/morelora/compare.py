"""``morelora compare``: train and evaluate several methods x seeds, then compare them statistically.

Usage::

    morelora compare CONFIG.yaml --methods more,lora,moelora --seeds 3 [--output-dir DIR]
        [--method-config METHODS.yaml] [--baseline lora] [--bootstrap 1000] [--plan] [key=value ...]

Every (method, seed) pair is an ordinary run (``morelora train``) of CONFIG with ``method.name=<method>``,
``train.seed=<base + i>`` (``base`` = the config's ``train.seed``) and ``train.output_dir=DIR/<label>/seed<s>``,
trained one after another. Re-running the same command is cheap: a run with ``eval.json`` is not redone
(its config must match), an unfinished one resumes from its newest checkpoint.

``--plan`` trains nothing: it times a few training steps of each method with its real config on this
machine and prints the grid of runs with their status (done / partial at checkpoint step k / not started)
and the hours each still needs, and the total (see :func:`plan`).

Method options
    The config's ``method:`` block is shared: each method keeps the options its config class accepts
    (``r``, ``lora_alpha``, ``target_modules``, ...) and drops the others (printed). Per-method options come
    from ``--method-config FILE`` (YAML ``{label: {option: value}}``) and ``methods.<label>.<option>=value``
    overrides, applied in that order. A label that is not a method name defines a variant with its own
    ``name``: ``more_r4: {name: more, r: 4}`` lets ``--methods more,more_r4`` compare two MoRE settings.
    Dotted keys outside the method block set that label's run config: ``lora_lr1e-3: {name: lora,
    train.lr: 1.0e-3}`` (a learning-rate sweep as rows, or each method at its own tuned rate).

Outputs in DIR
    ``results.json``   per method: per-task and average scores (mean, 95% t-interval over seeds, per seed),
                       parameters (from ``eval.json``), train time, test-set sizes; per method against the
                       baseline (average and per task): Δ with its 95% CI, the p-value and the minimum
                       detectable effect (MDE) of the test over seeds and examples together (below), the paired
                       bootstrap p-value and the paired t-test over seeds (average only).
    ``results.md``     the same as tables.      ``results.png``   average and per-task bar charts.
    ``<label>/seed<s>/test_predictions.json``   per-example test predictions of each run (computed from the
                       final checkpoint when the trainer did not write them): the bootstrap's input.

Several configs instead of methods
    ``morelora compare A.yaml B.yaml ... --seeds 3 [--baseline A]`` compares whole configs (e.g. the rows of
    ``configs/ablations/``): each config is one row labelled by its file name, trained with its own
    ``method:`` block and data / train settings. The configs must name the same tasks; key=value overrides
    apply to all of them.

Paired bootstrap: per task, test examples are resampled with replacement (the same resample for both
methods); each method's task score is its main metric on the resample averaged over seeds (for accuracy /
exact match: the mean per-example correctness pooled over seeds); the statistic is the difference of the
task-average scores. Two-sided p = 2 * min(P*(diff <= 0), P*(diff >= 0)), with P* = (count + 1) / (B + 1).

Seeds and examples together (the Δ, CI, p and MDE columns)
    The bootstrap sees only the test examples' noise, the t-test over seeds only the training noise. The
    combined test uses both. Per seed s, D_s is the paired difference of the task-average scores on the
    fixed test set (per task: D_s,t); Δ = mean_s D_s. Its variance is estimated as

        SE² = Var_seeds(D_s) / S  +  Var_boot(Δ)

    the between-seed sample variance (ddof=1) of the per-seed differences over S, plus the paired bootstrap
    variance over test examples of the seed-pooled difference (the variance of the bootstrap's resampled
    differences). When predictions differ between seeds, each seed's finite test set already puts the
    examples' noise into the first term, so the seed-by-example part is counted twice: SE is slightly too
    large (the test is conservative). With one seed the first term is unknown: SE, p and MDE use the
    examples only and are marked so.
    The test of Δ against 0 uses t = Δ / SE with Welch-Satterthwaite degrees of freedom
    df = SE⁴ / ((Var_seeds(D_s) / S)² / (S - 1)) (the bootstrap term counts as known: infinitely many
    degrees of freedom; df = ∞, the normal, with one seed): two-sided p, 95% CI Δ ± t_{0.975,df} SE, and the
    minimum detectable effect MDE = (t_{1-α/2,df} + t_{power,df}) SE, the smallest true difference the
    comparison detects with 80% power at two-sided α = 0.05 (2.80 SE for df = ∞; 5.36 SE for df = 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from morelora.config import (
    BOOKKEEPING_TRAIN_KEYS,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_diff,
    load_config,
    read_yaml_mapping,
)

__all__ = [
    "CompareError",
    "CompareRun",
    "TaskPredictions",
    "combined_test",
    "compare",
    "configure_parser",
    "paired_bootstrap",
    "paired_ttest",
    "plan",
    "plan_config_runs",
    "plan_runs",
    "run_command",
    "run_status",
    "summarize",
    "t_interval",
]

CONFIDENCE = 0.95
#: Significance level and power of the minimum detectable effect (MDE).
ALPHA, POWER = 0.05, 0.80
PREDICTIONS_NAME = "test_predictions.json"
#: Metrics that are means of per-example scores (fast vectorised bootstrap).
DECOMPOSABLE = ("accuracy", "exact_match")


class CompareError(ConfigError):
    """Bad input to ``morelora compare`` (shown by the CLI as one ``morelora: error:`` line)."""


@dataclass
class CompareRun:
    """One (method label, seed) run of a comparison."""

    label: str
    seed: int
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


# ------------------------------------------------------------------------------------------------ planning


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"more,lora"`` (or a list) -> unique labels, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    labels = [m.strip() for m in items if m and m.strip()]
    if not labels:
        raise CompareError("no methods given: pass e.g. --methods more,lora")
    dup = sorted({m for m in labels if labels.count(m) > 1})
    if dup:
        raise CompareError(f"--methods lists {', '.join(dup)} more than once")
    return labels


def load_method_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """``{label: {option: value}}`` from a YAML file and ``methods.<label>.<option>=value`` overrides."""
    raw = (read_yaml_mapping(path, "method config", "a mapping {method: {option: value}}", CompareError)
           if path is not None else {})
    raw = apply_overrides({"methods": raw}, list(overrides))["methods"]
    out = {}
    for label, opts in raw.items():
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise CompareError(f"method config for {label!r}: expected a mapping of options, got {opts!r}")
        out[str(label)] = dict(opts)
    return out


def _split_run_keys(label: str, extra: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A label's method options, and its dotted run-config overrides (``train.lr: 1e-3`` -> ``train.lr=0.001``)."""
    options = {k: v for k, v in extra.items() if "." not in str(k)}
    keys = {k: v for k, v in extra.items() if "." in str(k)}
    bad = sorted(k for k in keys if str(k).split(".", 1)[0] in ("method", "tasks"))
    if bad:
        raise CompareError(f"method config for {label!r}: {', '.join(bad)}: set method options without the "
                           "'method.' prefix; the task list is shared by every row")
    return options, [f"{k}={json.dumps(v)}" for k, v in keys.items()]


def _method_block(label: str, base: dict[str, Any], extra: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``method:`` block of ``label``'s runs and the shared options it drops."""
    from morelora.methods import METHODS, get_method

    name = extra.get("name", label)
    if not isinstance(name, str) or name not in METHODS:
        known = f"available methods: {', '.join(sorted(METHODS))}"
        if name == label:
            raise CompareError(f"unknown method {label!r}; {known} (a variant label needs `name: <method>` "
                               "in --method-config)")
        raise CompareError(f"method {label!r}: unknown method name {name!r}; {known}")
    config_class = get_method(name).model_class.config_class
    fields = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else None
    shared = {k: v for k, v in base.items() if k != "name"}
    dropped = sorted(k for k in shared if fields is not None and k not in fields)
    block = {"name": name, **{k: v for k, v in shared.items() if k not in dropped}}
    block.update({k: v for k, v in extra.items() if k != "name"})
    return block, dropped


def plan_runs(config: str | Path | None, methods: Sequence[str], seeds: int, output_dir: str | Path,
              overrides: Sequence[str] = (), method_config: dict[str, dict[str, Any]] | None = None,
              verbose: bool = True) -> list[CompareRun]:
    """Configs of every (label, seed) run, validated (method options included) before anything trains."""
    from morelora.methods import get_method

    labels = parse_methods(methods)
    if not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    method_config = method_config or {}
    out = Path(output_dir)
    base_cfg = load_config(config, list(overrides))
    first_seed = base_cfg.train.seed
    runs = []
    for label in labels:
        if not label.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise CompareError(f"method label {label!r}: use letters, digits, '_', '-' and '.' only")
        options, run_keys = _split_run_keys(label, method_config.get(label, {}))
        block, dropped = _method_block(label, base_cfg.method, options)
        if dropped and verbose:
            print(f"compare: {label}: not passing option(s) {', '.join(dropped)} of the config's method block "
                  f"({block['name']} does not take them)")
        config_class = get_method(block["name"]).model_class.config_class
        config_class.from_dict({**{k: v for k, v in block.items() if k != "name"}, "tasks": base_cfg.tasks})
        for i in range(seeds):
            seed = first_seed + i
            run_dir = out / label / f"seed{seed}"
            cfg = load_config(config, [*overrides, *run_keys, f"train.seed={seed}", f"train.output_dir={run_dir}"])
            cfg.method = dict(block)
            runs.append(CompareRun(label, seed, cfg))
    return runs


def plan_config_runs(configs: Sequence[str | Path], seeds: int, output_dir: str | Path,
                     overrides: Sequence[str] = ()) -> list[CompareRun]:
    """Runs of a config comparison: one row per config (label = file name), ``seeds`` seeds each."""
    from morelora.methods import get_method

    if not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    labels = [Path(c).stem for c in configs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise CompareError(f"configs share the file name(s) {', '.join(dup)}: rows are labelled by file name")
    out = Path(output_dir)
    runs, tasks = [], None
    for path, label in zip(configs, labels):
        base_cfg = load_config(path, list(overrides))
        if tasks is not None and base_cfg.tasks != tasks:
            raise CompareError(f"{path} trains tasks {base_cfg.tasks}, {configs[0]} trains {tasks}: "
                               "configs compared side by side must name the same tasks")
        tasks = base_cfg.tasks
        config_class = get_method(base_cfg.method_name).model_class.config_class
        config_class.from_dict({**base_cfg.method_options, "tasks": base_cfg.tasks})
        for i in range(seeds):
            seed = base_cfg.train.seed + i
            run_dir = out / label / f"seed{seed}"
            cfg = load_config(path, [*overrides, f"train.seed={seed}", f"train.output_dir={run_dir}"])
            runs.append(CompareRun(label, seed, cfg))
    return runs


# ---------------------------------------------------------------------------------------------- execution


def check_finished_run(run_dir: Path, cfg: RunConfig, error: type[Exception] | None = None) -> None:
    """A finished run (compare, sweep) is reused only if it was trained with the same config."""
    error = error or CompareError
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise error(f"{run_dir} has eval.json but no config.yaml: remove it or use another --output-dir")
    # a finished run may be reused, or moved, when only bookkeeping keys (output_dir, logging, ...) differ
    diff = config_diff(load_config(saved_path), cfg, ignore={f"train.{k}" for k in BOOKKEEPING_TRAIN_KEYS})
    if diff:
        raise error(f"finished run {run_dir} was trained with a different config ({', '.join(diff)}); "
                    "remove it or choose another --output-dir")


def execute(runs: Sequence[CompareRun]) -> None:
    """Train (or resume) every unfinished run, one after another, then write its test predictions."""
    from accelerate import PartialState

    from morelora import training

    main = PartialState().is_main_process
    for k, run in enumerate(runs, 1):
        where = f"compare: run {k}/{len(runs)}: {run.label} seed {run.seed}"
        if (run.run_dir / "eval.json").is_file():
            check_finished_run(run.run_dir, run.cfg)
            if main:
                print(f"{where}: done, reusing {run.run_dir}", flush=True)
        else:
            resume = (run.run_dir / "config.yaml").is_file()
            if main:
                print(f"{where}: {'resuming' if resume else 'training'} -> {run.run_dir}", flush=True)
            training.train(run.cfg, resume=resume)
            _free_memory()
        if not (run.run_dir / PREDICTIONS_NAME).is_file():
            write_predictions(run.run_dir)
            _free_memory()


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


# ------------------------------------------------------------------------------------------------ plan

#: ``--plan`` times this many training steps of each method after the warm-up ones.
PLAN_STEPS, PLAN_WARMUP = 3, 1


def run_status(run: CompareRun) -> dict[str, Any]:
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


def _complete(status: dict[str, Any]) -> bool:
    return status["status"] == "done" and status["predictions"]


def _remaining_s(run: CompareRun, status: dict[str, Any], timing: dict[str, float]) -> float:
    """Seconds the run still needs: remaining steps, validation passes during training, the final test pass."""
    tc = run.cfg.train
    if status["status"] == "done":
        return 0.0 if _complete(status) else timing["test_s"]
    steps = range(status["step"] + 1, tc.max_steps)
    evals = sum(1 for k in steps if k % tc.eval_steps == 0) if tc.eval_steps else 0
    return (tc.max_steps - status["step"]) * timing["step_s"] + evals * timing["validation_s"] + timing["test_s"]


def plan(runs: Sequence[CompareRun], timer: Any = None) -> str:
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
        todo = [r for r in rs if not _complete(status[r.label, r.seed])]
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


# ------------------------------------------------------------------------------------------------ statistics


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean with a two-sided t-distribution confidence interval (``half_width`` None with one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "half_width": None, "low": None, "high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "n": n, "half_width": half, "low": mean - half, "high": mean + half}


@dataclass
class TaskPredictions:
    """One method's test predictions on one task, one list per seed (seeds in a fixed order)."""

    predictions: list[Sequence[Any]]
    references: Sequence[Any]
    metric: str = "accuracy"
    num_labels: int | None = None

    def score(self, idx: np.ndarray) -> np.ndarray:
        """Main-metric score, averaged over seeds, of each resample (row) of example indices ``idx``."""
        if self.metric in DECOMPOSABLE:
            refs = np.asarray(self.references, dtype=object)
            rows = []
            for p in self.predictions:
                p = np.asarray(p, dtype=object)
                rows.append(np.array([str(a).strip() == str(b).strip() for a, b in zip(p, refs)], float)
                            if self.metric == "exact_match" else (p == refs).astype(float))
            correct = np.mean(rows, axis=0)  # per-example correctness pooled over seeds
            return correct[idx].mean(axis=-1)
        from morelora.metrics import METRICS

        fn, spec = METRICS[self.metric], SimpleNamespace(num_labels=self.num_labels)
        refs = np.asarray(self.references)
        preds = [np.asarray(p) for p in self.predictions]
        idx = np.atleast_2d(idx)
        return np.array([np.mean([fn(p[row].tolist(), refs[row].tolist(), spec) for p in preds]) for row in idx])


def bootstrap_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of resampled differences: 2 * min of the (add-one) tail fractions, capped at 1."""
    b = len(diffs)
    low = (np.sum(diffs <= 0) + 1) / (b + 1)
    high = (np.sum(diffs >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(low, high)))


def paired_bootstrap(a: dict[str, TaskPredictions], b: dict[str, TaskPredictions], n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over test examples of ``a`` vs ``b`` (same tasks, same examples).

    Returns ``{"diff", "p", "var", "tasks": {task: {"diff", "p", "var"}}}``: observed differences of the
    (task-average) scores, two-sided p-values and the variance of the resampled differences (see the module
    docstring).
    """
    rng = np.random.default_rng(seed)
    tasks = list(a)
    if set(tasks) != set(b):
        raise CompareError(f"cannot pair methods with different tasks: {sorted(a)} vs {sorted(b)}")
    per_task, diffs_sum, observed_sum = {}, np.zeros(n_resamples), 0.0
    for task in tasks:
        ta, tb = a[task], b[task]
        n = len(ta.references)
        if len(tb.references) != n or list(ta.references) != list(tb.references):
            raise CompareError(f"task {task}: the two methods were evaluated on different test examples")
        full = np.arange(n)[None]
        observed = float(ta.score(full)[0] - tb.score(full)[0])
        diffs = np.empty(n_resamples)
        chunk = max(1, 2_000_000 // max(n, 1))
        for start in range(0, n_resamples, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
            diffs[start:start + len(idx)] = ta.score(idx) - tb.score(idx)
        per_task[task] = {"diff": observed, "p": bootstrap_p_value(diffs), "var": _var(diffs)}
        diffs_sum += diffs
        observed_sum += observed
    k = max(len(tasks), 1)
    return {"diff": observed_sum / k, "p": bootstrap_p_value(diffs_sum / k), "var": _var(diffs_sum / k),
            "tasks": per_task}


def _var(x: np.ndarray) -> float:
    return float(np.var(x, ddof=1)) if len(x) > 1 else 0.0


def combined_test(seed_diffs: Sequence[float], bootstrap_var: float, alpha: float = ALPHA,
                  power: float = POWER) -> dict[str, Any]:
    """Test of the mean paired difference against 0 with the seeds' and the test examples' noise.

    ``seed_diffs``: D_s, the paired difference of one seed's scores, per seed; ``bootstrap_var``: the paired
    bootstrap variance of the seed-pooled difference. Returns ``{"diff", "se", "df", "ci_low", "ci_high",
    "p", "mde", "examples_only"}`` (the model is in the module docstring; ``df`` None stands for ∞; ``p``
    None when SE = 0 but the difference is not 0).
    """
    from scipy import stats

    d = np.asarray(seed_diffs, dtype=float)
    s, diff = len(d), float(d.mean())
    seed_var = float(d.var(ddof=1)) / s if s > 1 else 0.0
    var = seed_var + float(bootstrap_var)
    se = math.sqrt(var)
    df = var ** 2 / (seed_var ** 2 / (s - 1)) if seed_var > 0 else math.inf  # Welch-Satterthwaite
    q = float(stats.t.ppf(1 - alpha / 2, df))
    if se > 0:
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    else:
        p = 1.0 if diff == 0 else None
    return {"diff": diff, "se": se, "df": None if math.isinf(df) else df, "ci_low": diff - q * se,
            "ci_high": diff + q * se, "p": p, "mde": (q + float(stats.t.ppf(power, df))) * se,
            "examples_only": s < 2}


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired t-test (``scipy.stats.ttest_rel``) of per-seed scores.

    None values with fewer than 2 pairs; identical scores give p = 1, a constant non-zero difference p = None.
    """
    if len(a) < 2 or len(a) != len(b):
        return {"t": None, "p": None, "n": len(a)}
    from scipy import stats

    diff = np.asarray(a, float) - np.asarray(b, float)
    if np.allclose(diff, diff[0]):  # zero variance: t undefined (scipy would return nan with a warning)
        return {"t": None, "p": 1.0 if np.allclose(diff, 0) else None, "n": len(a)}
    res = stats.ttest_rel(a, b)
    return {"t": float(res.statistic), "p": float(res.pvalue), "n": len(a)}


# ------------------------------------------------------------------------------------------------ summaries


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from None


def load_predictions(run_dir: Path) -> dict[str, Any]:
    return _read_json(run_dir / PREDICTIONS_NAME)["tasks"]


def summarize(runs: Sequence[CompareRun], baseline: str | None = "lora", n_resamples: int = 1000,
              confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Statistics of finished runs (``eval.json`` and ``test_predictions.json`` in each run folder)."""
    labels = list(dict.fromkeys(r.label for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    by_label = {lab: [r for r in runs if r.label == lab] for lab in labels}
    evals = {lab: [_read_json(r.run_dir / "eval.json") for r in rs] for lab, rs in by_label.items()}
    tasks = list(evals[labels[0]][0]["tasks"])
    first = evals[labels[0]][0]["tasks"]
    results: dict[str, Any] = {}
    for lab in labels:
        ev = evals[lab]
        missing = [t for t in tasks if any(t not in e["tasks"] for e in ev)]
        if missing:
            raise CompareError(f"{lab}: no test score for task(s) {', '.join(missing)}")
        per_task = {}
        for t in tasks:
            scores = [e["tasks"][t]["score"] for e in ev]
            per_task[t] = {**t_interval(scores, confidence), "scores": scores}
        avgs = [e["average"] for e in ev]
        params = ev[0].get("parameters", {})
        times = [e.get("train", {}).get("train_time_s") for e in ev]
        times = [x for x in times if x is not None]
        results[lab] = {
            "method": by_label[lab][0].cfg.method_name,
            "method_options": by_label[lab][0].cfg.method_options,
            "run_dirs": [str(r.run_dir) for r in by_label[lab]],
            "tasks": per_task,
            "average": {**t_interval(avgs, confidence), "scores": avgs},
            "parameters": {"per_task": params.get("per_task"), "trainable": params.get("trainable"),
                           "total": params.get("total")},
            "train_time_s": {"mean": float(np.mean(times)) if times else None, "per_seed": times},
        }
    tests: dict[str, Any] = {}
    base = baseline if baseline in labels else None
    if base is not None:
        preds = {lab: [load_predictions(r.run_dir) for r in by_label[lab]] for lab in labels}

        def task_preds(lab: str) -> dict[str, TaskPredictions]:
            out = {}
            for t in tasks:
                rows = [p[t] for p in preds[lab]]
                refs = rows[0]["references"]
                if any(r["references"] != refs for r in rows):
                    raise CompareError(f"{lab}: task {t} was evaluated on different test examples across seeds")
                out[t] = TaskPredictions([r["predictions"] for r in rows], refs, rows[0]["main_metric"],
                                         rows[0].get("num_labels"))
            return out

        def seed_diffs(lab: str, task: str | None = None) -> list[float]:
            """Per seed: ``lab``'s score minus the baseline's (task average, or one task)."""
            a, b = (results[x]["average"] if task is None else results[x]["tasks"][task] for x in (lab, base))
            return [float(x - y) for x, y in zip(a["scores"], b["scores"])]

        base_preds = task_preds(base)
        for lab in labels:
            if lab == base:
                continue
            boot = paired_bootstrap(task_preds(lab), base_preds, n_resamples=n_resamples)
            tt = paired_ttest(results[lab]["average"]["scores"], results[base]["average"]["scores"])
            tests[lab] = {"baseline": base, "diff_average": results[lab]["average"]["mean"]
                          - results[base]["average"]["mean"], "bootstrap_p": boot["p"],
                          "bootstrap_diff": boot["diff"], "bootstrap_var": boot["var"],
                          "bootstrap_resamples": n_resamples, "bootstrap_tasks": boot["tasks"],
                          "ttest_t": tt["t"], "ttest_p": tt["p"], "ttest_n": tt["n"],
                          "combined": combined_test(seed_diffs(lab), boot["var"]),
                          "combined_tasks": {t: combined_test(seed_diffs(lab, t), boot["tasks"][t]["var"])
                                             for t in tasks}}
    return {
        "seeds": seeds,
        "tasks": tasks,
        "main_metrics": {t: first[t].get("main_metric") for t in tasks},
        "reference_scores": {t: first[t].get("reference_score") for t in tasks},
        "num_examples": {t: first[t].get("num_examples") for t in tasks},
        "confidence": confidence,
        "baseline": base,
        "methods": results,
        "tests": tests,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _cell(stat: dict[str, Any]) -> str:
    half = "n/a" if stat["half_width"] is None else f"{100 * stat['half_width']:.2f}"
    return f"{_pct(stat['mean'])} ± {half}"


def _count(x: float | None) -> str:
    if x is None:
        return "n/a"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None else ("< 0.001" if x < 1e-3 else f"{x:.3f}")


def markdown(summary: dict[str, Any], title: str = "Comparison") -> str:
    """``results.md``: a score table (mean ± CI half-width) and the paired tests against the baseline."""
    tasks, res = summary["tasks"], summary["methods"]
    conf = round(100 * summary["confidence"])
    seeds = summary["seeds"]
    lines = [f"# {title}", "",
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Test scores: main metric x 100, mean over "
             f"seeds ± half-width of the {conf}% t-interval" + (" (n/a: one seed)." if len(seeds) < 2 else "."),
             ""]
    sizes = summary.get("num_examples", {})
    head = [f"{t} ({summary['main_metrics'][t]}" + (f", n={sizes[t]})" if sizes.get(t) else ")") for t in tasks]
    lines.append("| method | " + " | ".join(head) + " | average | params / task | trainable | train time (s) |")
    lines.append("|---" * (len(tasks) + 5) + "|")
    for lab, r in res.items():
        cells = [_cell(r["tasks"][t]) for t in tasks] + [f"**{_cell(r['average'])}**"]
        p, tt = r["parameters"], r["train_time_s"]["mean"]
        cells += [_count(p["per_task"]), _count(p["trainable"]), "n/a" if tt is None else f"{tt:.1f}"]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    ref_scores = [summary["reference_scores"][t] for t in tasks]
    ref_avg = None if None in ref_scores else sum(ref_scores) / len(ref_scores)
    lines.append("| *reference* | " + " | ".join(map(_pct, [*ref_scores, ref_avg])) + " |" + " |" * 3)
    lines += ["", "*reference*: majority class / chance. Params / task: adapter parameters / number of tasks. "
              "n: test examples per task (the same for every seed)."]
    if summary["tests"]:
        lines += _markdown_tests(summary)
    elif summary["baseline"] is None:
        lines += ["", "No paired tests: lora is not part of this comparison (choose a baseline with --baseline)."]
    return "\n".join(lines) + "\n"


def _mde(c: dict[str, Any] | None) -> str:
    return "n/a" if c is None else f"{100 * c['mde']:.2f}" + ("*" if c["examples_only"] else "")


def _markdown_tests(summary: dict[str, Any]) -> list[str]:
    """The "Against <baseline>" section: Δ, 95% CI, combined p, MDE and the bootstrap / t-test p-values."""
    tasks, base, tests = summary["tasks"], summary["baseline"], summary["tests"]
    b = next(iter(tests.values()))["bootstrap_resamples"]
    lines = ["", f"## Against {base}", "",
             f"| method | Δ average | 95% CI | p (seeds + examples) | MDE vs {base} | paired bootstrap p | "
             "paired t-test p (seeds) |", "|---" * 7 + "|"]
    for lab, t in tests.items():
        c = t.get("combined")  # absent in summaries written before the combined test existed
        ci = "n/a" if c is None else f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"
        lines.append(f"| {lab} | {100 * t['diff_average']:+.2f} | {ci} | {_p(c and c['p'])} | {_mde(c)} | "
                     f"{_p(t['bootstrap_p'])} | {_p(t['ttest_p'])} |")
    sizes = summary.get("num_examples", {})
    lines += ["", f"Per task: Δ (p of the combined test, paired bootstrap p, MDE vs {base}).", "",
              "| method | " + " | ".join(f"Δ {k}" + (f" (n={sizes[k]})" if sizes.get(k) else "") for k in tasks)
              + " |", "|---" * (len(tasks) + 1) + "|"]
    for lab, t in tests.items():
        cells = []
        for k in tasks:
            c, bt = t.get("combined_tasks", {}).get(k), t["bootstrap_tasks"][k]
            cells.append(f"{100 * bt['diff']:+.2f} ({_p(c and c['p'])}, {_p(bt['p'])}, {_mde(c)})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    one_seed = any(c["examples_only"] for t in tests.values() for c in [t.get("combined")] if c)
    lines += ["", "Scores and differences x 100. 95% CI, p (seeds + examples) and MDE: the difference tested "
              "against 0 with SE² = Var_seeds(per-seed differences) / seeds + the paired bootstrap variance, "
              "t with Welch-Satterthwaite degrees of freedom; MDE = the smallest true difference detected with "
              "80% power at two-sided α = 0.05 (see docs/RESULTS.md, method notes)."
              + (" *: one seed: examples' noise only (no seed variance): the CI is too narrow, p and MDE too "
                 "small." if one_seed else ""),
              f"Paired bootstrap: {b} resamples of the test examples of each task (the same for both "
              "methods), predictions pooled over seeds, statistic = difference of the task-average score; "
              "two-sided p. Paired t-test: `scipy.stats.ttest_rel` of the per-seed average scores "
              "(n/a with one seed)."]
    return lines


def plot(summary: dict[str, Any], path: str | Path, title: str = "Comparison") -> Path:
    """``results.png``: average score per method and per-task grouped bars, with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, res = summary["tasks"], summary["methods"]
    labels = list(res)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = [cmap(i % cmap.N) for i in range(len(labels))]
    conf = round(100 * summary["confidence"])

    def err(stat: dict[str, Any]) -> float:
        return 0.0 if stat["half_width"] is None else 100 * stat["half_width"]

    fig_w = min(20.0, max(7.0, 0.22 * len(labels) * len(tasks) + 3))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(fig_w, 8.5), gridspec_kw={"height_ratios": [1, 1.4]})
    means = [100 * res[lab]["average"]["mean"] for lab in labels]
    errs = [err(res[lab]["average"]) for lab in labels]
    x = np.arange(len(labels))
    with_ci = len(summary["seeds"]) > 1
    bars = ax1.bar(x, means, 0.6, yerr=errs if with_ci else None, capsize=4, color=colors, edgecolor="black",
                   linewidth=0.5)
    ax1.bar_label(bars, fmt="%.1f", padding=2, fontsize=8, label_type="center")
    ax1.set_xticks(x, labels, rotation=20 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center")
    ax1.set_ylabel("score (main metric x 100)")
    ax1.set_title("Average over tasks")

    n = len(labels)
    width = 0.8 / n
    xt = np.arange(len(tasks))
    for i, lab in enumerate(labels):
        vals = [100 * res[lab]["tasks"][t]["mean"] for t in tasks]
        e = [err(res[lab]["tasks"][t]) for t in tasks]
        ax2.bar(xt - 0.4 + width * (i + 0.5), vals, width, yerr=e if with_ci else None, capsize=2,
                color=colors[i], label=lab, edgecolor="black", linewidth=0.5)
    for j, t in enumerate(tasks):
        ref = summary["reference_scores"].get(t)
        if ref is not None:
            ax2.hlines(100 * ref, j - 0.45, j + 0.45, colors="dimgray", linestyles="--", linewidth=1,
                       label="reference (majority / chance)" if j == 0 else None)
    ax2.set_xticks(xt, [f"{t}\n({summary['main_metrics'][t]})" for t in tasks], fontsize=9)
    ax2.set_ylabel("score (main metric x 100)")
    ax2.set_title("Per task")
    ax2.legend(fontsize=8, ncol=max(1, math.ceil((n + 1) / 8)), loc="upper left", bbox_to_anchor=(1.01, 1))

    lows = [100 * (res[lab]["average"]["mean"]) - errs[i] for i, lab in enumerate(labels)]
    lows += [100 * res[lab]["tasks"][t]["mean"] - err(res[lab]["tasks"][t]) for lab in labels for t in tasks]
    lows += [100 * v for v in summary["reference_scores"].values() if v is not None]
    highs = [100 * res[lab]["average"]["mean"] for lab in labels]
    highs += [100 * res[lab]["tasks"][t]["mean"] for lab in labels for t in tasks]
    floor = 0.0 if min(highs) >= 0 else 10 * math.floor(min(highs) / 10) - 10  # correlations may be negative
    bottom = max(floor, 5 * math.floor((min(lows) - 5) / 5))
    top = 102.0 if max(highs) <= 100 else None  # scores cannot exceed 100: clip wide CIs of few seeds there
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=bottom, top=top)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    seeds = summary["seeds"]
    ci = f"error bars: {conf}% CI over {len(seeds)} seeds" if len(seeds) > 1 else "1 seed: no error bars"
    fig.suptitle(f"{title} ({ci}" + (f"; y axis starts at {bottom:.0f})" if bottom != 0 else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------ top level


def compare(config: str | Path | Sequence[str | Path] | None, methods: str | Sequence[str] | None, seeds: int,
            output_dir: str | Path, overrides: Sequence[str] = (), method_config: str | Path | None = None,
            baseline: str | None = None, n_resamples: int = 1000, plan_only: bool = False) -> Path:
    """Plan, train (resumably) and summarise a comparison; returns ``output_dir`` (with results.*).

    ``config``: one config (rows = ``methods``) or a list of configs (rows = the configs, ``methods`` None).
    ``baseline``: the label the paired tests compare against; None: ``lora`` when it is compared.
    ``plan_only``: print :func:`plan` (status and expected hours of every run) instead of training.
    """
    from accelerate import PartialState

    if n_resamples < 1:
        raise CompareError(f"--bootstrap must be at least 1, got {n_resamples}")
    main = PartialState().is_main_process
    if isinstance(config, (list, tuple)) and len(config) > 1:
        if methods:
            raise CompareError("--methods compares methods on one config; with several configs each config is "
                               "a row: drop --methods (or compare one config)")
        if method_config or any(o.strip().startswith("methods.") for o in overrides):
            raise CompareError("--method-config / methods.* overrides need --methods on one config")
        runs = plan_config_runs(config, seeds, output_dir, overrides)
        config, name = ", ".join(str(c) for c in config), "configs"
    else:
        if isinstance(config, (list, tuple)):
            config = config[0] if config else None
        name = Path(config).stem if config else "defaults"
        if not methods:
            raise CompareError("no methods given: pass e.g. --methods more,lora (or several configs to compare "
                               "configs)")
        method_overrides = [o for o in overrides if o.strip().startswith("methods.")]
        run_overrides = [o for o in overrides if not o.strip().startswith("methods.")]
        per_method = load_method_config(method_config, method_overrides)
        runs = plan_runs(config, methods, seeds, output_dir, run_overrides, per_method, verbose=main)
    labels = list(dict.fromkeys(r.label for r in runs))
    if baseline is not None and baseline not in labels:
        raise CompareError(f"--baseline {baseline} is not among the compared methods ({', '.join(labels)})")
    baseline = baseline or ("lora" if "lora" in labels else None)
    if plan_only:
        if main:
            print(f"compare --plan: {len(labels)} row(s) x {seeds} seed(s) in {output_dir}", flush=True)
            print(plan(runs), end="")
        return Path(output_dir)
    execute(runs)
    out = Path(output_dir)
    if main:
        summary = summarize(runs, baseline=baseline, n_resamples=n_resamples)
        title = f"{name}: {', '.join(summary['methods'])}"
        summary = {"config": str(config) if config else None, "overrides": list(overrides),
                   "method_config": str(method_config) if method_config else None, **summary}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        md = markdown(summary, title)
        (out / "results.md").write_text(md, encoding="utf-8")
        plot(summary, out / "results.png", title)
        print(md)
        print(f"-> {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return out


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``morelora compare``."""
    # one positional list (dest "overrides", so the CLI appends key=value given after options): configs + overrides
    p.add_argument("overrides", nargs="+", metavar="CONFIG|key=value",
                   help="run config (YAML) shared by every run, e.g. configs/demo.yaml, or several configs to "
                        "compare as rows (e.g. configs/ablations/*.yaml); key=value: overrides for every run "
                        "(train.max_steps=200); methods.<label>.<option>=value sets one method's option")
    p.add_argument("--methods",
                   help="comma-separated method names (or labels from --method-config), e.g. more,lora; "
                        "required with one config")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds: train.seed, train.seed+1, ... (default: 1)")
    p.add_argument("--output-dir", help="comparison folder (default: runs/compare-<config name>)")
    p.add_argument("--method-config", metavar="FILE",
                   help="YAML {label: {option: value}}: per-method options; a label that is not a method "
                        "name needs `name: <method>`")
    p.add_argument("--baseline", help="method label the paired tests compare against (default: lora, when it "
                                      "is compared; no tests otherwise)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="paired bootstrap resamples (default: 1000)")
    p.add_argument("--plan", action="store_true",
                   help=f"train nothing: time {PLAN_STEPS} training steps of each method on this machine and "
                        "print every run's status (done / partial / not started) and the hours left")


def run_command(args: argparse.Namespace) -> None:
    """Entry point of ``morelora compare``."""
    configs = [x for x in args.overrides if "=" not in x]
    overrides = [x for x in args.overrides if "=" in x]
    if not configs:
        raise CompareError("no config given: morelora compare CONFIG.yaml --methods more,lora")
    stem = Path(configs[0]).stem if len(configs) == 1 else Path(configs[0]).parent.name or "configs"
    out = args.output_dir or f"runs/compare-{stem}"
    compare(configs, args.methods, args.seeds, out, overrides=overrides,
            method_config=args.method_config, baseline=args.baseline, n_resamples=args.bootstrap,
            plan_only=args.plan)
