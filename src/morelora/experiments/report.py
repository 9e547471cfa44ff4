"""A comparison's summary and report: ``results.json`` (:func:`summarize`), ``results.md`` (:func:`markdown`),
``results.png`` (:func:`plot`) and, against a baseline, ``differences.png`` (:func:`plot_differences`), from
the finished runs' ``eval.json`` and ``test_predictions.json``.

The statistics are :mod:`morelora.experiments.statistics`'s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morelora.experiments.runs import PREDICTIONS_NAME, CompareError, PlannedRun
from morelora.experiments.statistics import (
    CONFIDENCE,
    TaskPredictions,
    combined_test,
    paired_bootstrap,
    paired_ttest,
    t_interval,
)

__all__ = ["difference_rows", "load_predictions", "markdown", "plot", "plot_differences", "summarize"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from None


def load_predictions(run_dir: Path) -> dict[str, Any]:
    return _read_json(run_dir / PREDICTIONS_NAME)["tasks"]


def summarize(runs: Sequence[PlannedRun], baseline: str | None = "lora", n_resamples: int = 1000,
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


def _wrap_name(name: str, width: int) -> str:
    """``name`` broken after underscores into lines of at most ``width`` characters where it can be (the lines
    joined give ``name`` back)."""
    lines = [""]
    for piece in re.split(r"(?<=_)", name):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


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
    if len(labels) > 8:
        ax1.set_xticks(x, labels, rotation=20, ha="right")
    else:   # a name gets ~6 characters per inch of figure width, else the names run into each other
        ax1.set_xticks(x, [_wrap_name(lab, int(6 * fig_w / len(labels))) for lab in labels])
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


def difference_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method's difference to the baseline (x 100) on the average and per task, from the combined test:
    ``{"method", "row", "diff", "ci_low", "ci_high", "mde", "p"}`` (rows without a combined test are left out)."""
    out = []
    for lab, test in summary.get("tests", {}).items():
        rows = {"average": test.get("combined"), **(test.get("combined_tasks") or {})}
        for row, c in rows.items():
            if c:
                out.append({"method": lab, "row": row, "p": c["p"],
                            **{k: 100 * c[k] for k in ("diff", "ci_low", "ci_high", "mde")}})
    return out


def plot_differences(summary: dict[str, Any], path: str | Path, title: str = "Differences") -> Path | None:
    """``differences.png``: each method minus the baseline per task and on the average, with its CI (combined test
    over seeds and test examples) and, in grey, +-MDE: a true difference inside the grey band could have gone
    unseen (80 % power). None when there is nothing to compare."""
    rows = difference_rows(summary)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["method"], r["row"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    names = ["average", *[t for t in summary["tasks"] if any(row == t for _, row in by)]]
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    step = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 1.5 + len(names) * max(0.5, 0.2 * len(methods))))
    for i, lab in enumerate(methods):
        for j, name in enumerate(names):
            r = by.get((lab, name))
            if r is None:
                continue
            y = j - 0.4 + step * (i + 0.5)   # the legend's order, top to bottom (the y axis is inverted)
            ax.fill_betweenx([y - step / 2.5, y + step / 2.5], -r["mde"], r["mde"], color="0.85", lw=0,
                             label="+-MDE (80 % power)" if i == j == 0 else None)
            ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]], fmt="o",
                        color=cmap(i % cmap.N), capsize=3, label=lab if j == 0 else None)
            ax.annotate(f"{r['diff']:+.2f} (p {_p(r['p'])})", (r["ci_high"], y), xytext=(4, -3),
                        textcoords="offset points", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    base = next(iter(summary["tests"].values()))["baseline"]
    conf = round(100 * summary["confidence"])
    ax.set_xlabel(f"minus {base} (score x 100; {conf} % CI over seeds and test examples)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_report(summary: dict[str, Any], out: str | Path, title: str) -> str:
    """``results.json``, ``results.md``, ``results.png`` (and ``differences.png`` against a baseline) of
    ``summary`` in ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    md = markdown(summary, title)
    (out / "results.md").write_text(md, encoding="utf-8")
    plot(summary, out / "results.png", title)
    plot_differences(summary, out / "differences.png", title)
    return md
