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
and the hours each still needs, and the total (:mod:`morelora.experiments.plan`).

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
                       detectable effect (MDE) of the test over seeds and examples together, the
                       paired bootstrap p-value and the paired t-test over seeds (average only).
    ``results.md``     the same as tables.      ``results.png``   average and per-task bar charts.
    ``<label>/seed<s>/test_predictions.json``   per-example test predictions of each run (computed from the
                       final checkpoint when the trainer did not write them): the bootstrap's input.

Several configs instead of methods
    ``morelora compare A.yaml B.yaml ... --seeds 3 [--baseline A]`` compares whole configs (e.g. the rows of
    ``configs/ablations/``): each config is one row labelled by its file name, trained with its own
    ``method:`` block and data / train settings. The configs must name the same tasks; key=value overrides
    apply to all of them.

Runs are executed by :func:`morelora.experiments.runs.execute` and summarised by
:mod:`morelora.experiments.report`; the statistics (the combined test and the MDE included) are described in
:mod:`morelora.experiments.statistics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from morelora.config import apply_overrides, load_config, read_yaml_mapping
from morelora.experiments.plan import PLAN_STEPS, plan
from morelora.experiments.report import summarize, write_report
from morelora.experiments.runs import CompareError, PlannedRun, execute

__all__ = [
    "CompareError",
    "compare",
    "configure_parser",
    "load_method_config",
    "parse_methods",
    "plan_config_runs",
    "plan_runs",
    "run_command",
]


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
              verbose: bool = True) -> list[PlannedRun]:
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
            runs.append(PlannedRun(label, seed, cfg))
    return runs


def plan_config_runs(configs: Sequence[str | Path], seeds: int, output_dir: str | Path,
                     overrides: Sequence[str] = ()) -> list[PlannedRun]:
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
            runs.append(PlannedRun(label, seed, cfg))
    return runs


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
        print(write_report(summary, out, title))
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
