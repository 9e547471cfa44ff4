"""The statistics of experiments: t-intervals over seeds, the paired bootstrap over test examples, the combined
seeds + examples test with its minimum detectable effect, and the paired t-test over seeds.

Paired bootstrap
    Per task, test examples are resampled with replacement (the same resample for both methods); each method's
    task score is its main metric on the resample averaged over seeds (for accuracy / exact match: the mean
    per-example correctness pooled over seeds); the statistic is the difference of the task-average scores.
    Two-sided p = 2 * min(P*(diff <= 0), P*(diff >= 0)), with P* = (count + 1) / (B + 1)
    (:func:`morelora.metrics.bootstrap_tail`, also the one-sided p of ``morelora.metrics.reference_gap``).

Seeds and examples together (:func:`combined_test`)
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

Projecting the MDE to more seeds (:func:`variance_components`, :func:`project_mde`)
    Per task, d_si = μ + e_i + u_s + w_si: e_i the example's own (seed-independent) difference, u_s the seed's
    shift, w_si seed-by-example noise. A two-way ANOVA without replication of the S x n matrix d estimates
    σ²_w = MS_residual and σ²_e = (MS_examples − MS_residual) / S. For the task average Δ of S seeds (over new
    test sets and new seeds)

        Var(Δ) = E + V / S,   E = Σ_t σ²_e,t / (T² n_t),   V = Var_seeds(D_s)

    (E: the test examples' floor, which no number of seeds lowers; V: the between-seed variance of a seed's
    task-average difference). The combined test's SE² above estimates E + (V + W) / S in expectation, with
    W = Σ_t σ²_w,t / (T² n_t) the twice-counted part.

Only numpy is imported with the module (scipy and the task metrics inside the functions): the CLI and
``morelora.metrics`` import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from morelora.experiments.runs import CompareError

__all__ = ["ALPHA", "CONFIDENCE", "POWER", "TaskPredictions", "bootstrap_p_value",
           "combined_test", "format_mean_ci", "mean_ci", "paired_bootstrap", "paired_ttest", "project_mde",
           "seeds_for_mde", "t_interval", "variance_components"]

CONFIDENCE = 0.95
#: Significance level and power of the minimum detectable effect (MDE).
ALPHA, POWER = 0.05, 0.80
#: Metrics that are means of per-example scores (fast vectorised bootstrap).
DECOMPOSABLE = ("accuracy", "exact_match")


# ------------------------------------------------------------------------------------------------ seeds


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


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{"mean", "std", "ci95", "n"}``: mean, sample std and the half-width of the Student-t interval of the mean.

    NaN / None values are dropped; with one value std and ci95 are ``None`` (unknown), not 0. The interval is
    :func:`t_interval`'s, so sweeps, few-shot results and comparisons agree.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    stat = t_interval(vals, confidence)
    return {"mean": stat["mean"], "std": stat["std"], "ci95": stat["half_width"], "n": stat["n"]}


def format_mean_ci(stat: dict[str, Any], digits: int = 4) -> str:
    """``"0.7123 ± 0.0150"`` (``"± n/a"`` with a single seed) of a :func:`mean_ci` result."""
    if stat.get("mean") is None:
        return "n/a"
    ci = stat.get("ci95")
    return f"{stat['mean']:.{digits}f} ± {ci:.{digits}f}" if ci is not None else f"{stat['mean']:.{digits}f} ± n/a"


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


# ------------------------------------------------------------------------------------------------ examples


def bootstrap_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of resampled differences: 2 * min of the (add-one) tail fractions, capped at 1."""
    from morelora.metrics import bootstrap_tail  # the core's (eval.json's vs_reference p); torch loads lazily

    return float(min(1.0, 2 * min(bootstrap_tail(diffs), bootstrap_tail(diffs, upper=True))))


@dataclass
class TaskPredictions:
    """One method's test predictions on one task, one list per seed (seeds in a fixed order)."""

    predictions: list[Sequence[Any]]
    references: Sequence[Any]
    metric: str = "accuracy"
    num_labels: int | None = None

    def correct(self) -> np.ndarray:
        """Seeds x examples per-example scores (1.0 right, 0.0 wrong) of a per-example metric (``DECOMPOSABLE``)."""
        if self.metric not in DECOMPOSABLE:
            raise ValueError(f"metric {self.metric!r} is not a mean of per-example scores")
        refs = np.asarray(self.references, dtype=object)
        rows = []
        for p in self.predictions:
            p = np.asarray(p, dtype=object)
            rows.append(np.array([str(a).strip() == str(b).strip() for a, b in zip(p, refs)], float)
                        if self.metric == "exact_match" else (p == refs).astype(float))
        return np.array(rows)

    def score(self, idx: np.ndarray) -> np.ndarray:
        """Main-metric score, averaged over seeds, of each resample (row) of example indices ``idx``."""
        if self.metric in DECOMPOSABLE:
            correct = self.correct().mean(axis=0)  # per-example correctness pooled over seeds
            return correct[idx].mean(axis=-1)
        from morelora.metrics import METRICS

        fn, spec = METRICS[self.metric], SimpleNamespace(num_labels=self.num_labels)
        refs = np.asarray(self.references)
        preds = [np.asarray(p) for p in self.predictions]
        idx = np.atleast_2d(idx)
        return np.array([np.mean([fn(p[row].tolist(), refs[row].tolist(), spec) for p in preds]) for row in idx])


def paired_bootstrap(a: dict[str, TaskPredictions], b: dict[str, TaskPredictions], n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over test examples of ``a`` vs ``b`` (same tasks, same examples).

    Returns ``{"diff", "p", "var", "tasks": {task: {"diff", "p", "var"}}}``: observed differences of the
    (task-average) scores, two-sided p-values and the variance of the resampled differences (see the module
    docstring). Tasks or test examples that do not pair raise :class:`CompareError`.
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


# ------------------------------------------------------------------------------------------------ both


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
    se, df, q, mde = _se_df_mde(float(d.var(ddof=1)) / s if s > 1 else 0.0, float(bootstrap_var), s, alpha, power)
    if se > 0:
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    else:
        p = 1.0 if diff == 0 else None
    return {"diff": diff, "se": se, "df": None if math.isinf(df) else df, "ci_low": diff - q * se,
            "ci_high": diff + q * se, "p": p, "mde": mde, "examples_only": s < 2}


def _se_df_mde(seed_term: float, known: float, seeds: float, alpha: float, power: float
               ) -> tuple[float, float, float, float]:
    """``(SE, df, t_{1-α/2,df}, MDE)`` of SE² = ``seed_term`` + ``known``: Welch-Satterthwaite df with the seed
    term's S - 1 (∞ without a seed term; ``known`` counts as known), MDE = (t_{1-α/2} + t_power) SE."""
    from scipy import stats

    var = seed_term + known
    df = var ** 2 / (seed_term ** 2 / (seeds - 1)) if seed_term > 0 and seeds > 1 else math.inf
    se = math.sqrt(var)
    q = float(stats.t.ppf(1 - alpha / 2, df))
    return se, df, q, (q + float(stats.t.ppf(power, df))) * se


# ------------------------------------------------------------------------------------------------ projection


def variance_components(diffs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The noise of a paired comparison of the task average, split for projecting it to other seed counts.

    ``diffs[t]``: an S x n_t array (S >= 2 seeds, paired by row) of the two methods' per-example score
    differences on task t (correctness, for accuracy). Returns ``{"seeds": S, "examples_var": E, "seed_var": V,
    "interaction_var": W, "examples_var_estimate": E before the cut, "tasks": {t: {"n", "sigma2_e", "sigma2_w",
    "sigma2_u"}}}`` (the model and the estimators are in the module docstring). The per-task estimates are
    unbiased and so may come out below 0; only E, their sum, is cut at 0 (cutting each would bias E upward)."""
    arrays = {t: np.asarray(d, dtype=float) for t, d in diffs.items()}
    seeds = {a.shape[0] for a in arrays.values()}
    if len(seeds) != 1 or min(seeds) < 2 or any(a.ndim != 2 or a.shape[1] < 2 for a in arrays.values()):
        raise ValueError("variance_components: every task needs the same S >= 2 seeds and >= 2 examples")
    s, n_tasks = seeds.pop(), len(arrays)
    tasks, e_var, w_var = {}, 0.0, 0.0
    for t, d in arrays.items():
        n = d.shape[1]
        rows, cols, grand = d.mean(1, keepdims=True), d.mean(0, keepdims=True), d.mean()
        ms_seed = n * float(((rows - grand) ** 2).sum()) / (s - 1)
        ms_ex = s * float(((cols - grand) ** 2).sum()) / (n - 1)
        ms_res = float(((d - rows - cols + grand) ** 2).sum()) / ((s - 1) * (n - 1))
        tasks[t] = {"n": n, "sigma2_e": (ms_ex - ms_res) / s, "sigma2_w": ms_res, "sigma2_u": (ms_seed - ms_res) / n}
        e_var += tasks[t]["sigma2_e"] / (n_tasks ** 2 * n)
        w_var += ms_res / (n_tasks ** 2 * n)
    seed_avg = np.mean([d.mean(1) for d in arrays.values()], axis=0)   # D_s, the task-average difference
    return {"seeds": s, "examples_var": max(0.0, e_var), "seed_var": float(seed_avg.var(ddof=1)),
            "interaction_var": w_var, "examples_var_estimate": e_var, "tasks": tasks}


def project_mde(components: dict[str, Any], seeds: float, alpha: float = ALPHA, power: float = POWER,
                as_reported: bool = False) -> dict[str, Any]:
    """``{"se", "df", "mde"}`` of the task average with ``seeds`` seeds per method (``math.inf``: the floor),
    from :func:`variance_components`: SE² = E + V / S; ``as_reported``: what :func:`combined_test` would report
    (its bootstrap term at infinitely many resamples, E not cut at 0),
    E + (V + W) / S. ``df`` (Welch-Satterthwaite, the seed term with S - 1) None stands for ∞."""
    finite = not math.isinf(seeds)
    seed_term = components["seed_var"] / seeds if finite else 0.0
    known = components["examples_var"] + (components["interaction_var"] / seeds if as_reported and finite else 0.0)
    se, df, _, mde = _se_df_mde(seed_term, known, seeds, alpha, power)   # the examples' part counts as known
    return {"se": se, "df": None if math.isinf(df) else df, "mde": mde}


def seeds_for_mde(components: dict[str, Any], target: float, max_seeds: int = 1000, **kw: Any) -> int | None:
    """The fewest seeds per method (>= 2) whose projected MDE is at most ``target``; None when even
    ``max_seeds`` (or the floor E) does not reach it. ``kw``: :func:`project_mde`'s."""
    if project_mde(components, math.inf, **kw)["mde"] > target:
        return None
    return next((s for s in range(2, max_seeds + 1) if project_mde(components, s, **kw)["mde"] <= target), None)
