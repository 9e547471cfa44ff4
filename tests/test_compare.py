"""`morelora compare`: statistics against independent computations, planning, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from morelora.cli import main
from morelora.config import ConfigError
from morelora.experiments.compare import CompareError, plan_runs
from morelora.experiments.statistics import (
    TaskPredictions,
    bootstrap_p_value,
    combined_test,
    paired_bootstrap,
    paired_ttest,
    t_interval,
)

# ------------------------------------------------------------------------------------------- statistics


def test_t_interval_matches_hand_computation():
    x = [0.50, 0.60, 0.70, 0.55]
    mean = sum(x) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)
    t_975_df3 = 3.182446305284263  # Student t table, two-sided 95%, 3 degrees of freedom
    ci = t_interval(x)
    assert ci["mean"] == pytest.approx(mean)
    assert ci["half_width"] == pytest.approx(t_975_df3 * sd / 2)
    assert ci["low"] == pytest.approx(mean - t_975_df3 * sd / 2)
    one = t_interval([0.7])
    assert one["mean"] == 0.7 and one["half_width"] is None


def test_bootstrap_p_value_hand_case():
    # tails with add-one smoothing: P(d <= 0) = 2/5, P(d >= 0) = 4/5 -> p = 2 * 0.4
    assert bootstrap_p_value(np.array([1.0, 1.0, 1.0, -1.0])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.zeros(10)) == 1.0


def _preds(correct_rates, n=200, seeds=2, seed=0):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 2, n)
    out = []
    for rate in correct_rates:
        rows = []
        for _ in range(seeds):
            right = rng.random(n) < rate
            rows.append(np.where(right, refs, 1 - refs).tolist())
        out.append(TaskPredictions(rows, refs.tolist(), "accuracy"))
    return out


def test_paired_bootstrap_clear_difference_and_identical():
    good, bad = _preds([0.9, 0.5])
    res = paired_bootstrap({"t": good}, {"t": bad}, n_resamples=500)
    expected = np.mean([np.mean(np.array(p) == np.array(good.references)) for p in good.predictions]) - np.mean(
        [np.mean(np.array(p) == np.array(bad.references)) for p in bad.predictions])
    assert res["diff"] == pytest.approx(expected)
    assert res["p"] <= 2 / 501 + 1e-12 and res["tasks"]["t"]["p"] == res["p"]
    same = paired_bootstrap({"t": good, "u": bad}, {"t": good, "u": bad}, n_resamples=200)
    assert same["diff"] == 0 and same["p"] == 1.0


def test_paired_bootstrap_close_methods_not_significant_and_f1_path():
    a, b = _preds([0.7, 0.7], n=100, seed=3)
    assert paired_bootstrap({"t": a}, {"t": b}, n_resamples=300)["p"] > 0.05
    a.metric = b.metric = "f1"
    a.num_labels = b.num_labels = 2
    same = paired_bootstrap({"t": a}, {"t": a}, n_resamples=50)
    assert same["p"] == 1.0
    from sklearn.metrics import f1_score

    res = paired_bootstrap({"t": a}, {"t": b}, n_resamples=20)
    f1 = [np.mean([f1_score(x.references, p) for p in x.predictions]) for x in (a, b)]
    assert res["diff"] == pytest.approx(f1[0] - f1[1])


def test_paired_ttest_matches_hand_computation():
    from scipy import stats

    a, b = [0.71, 0.74, 0.69, 0.73], [0.70, 0.70, 0.68, 0.69]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    res = paired_ttest(a, b)
    assert res["t"] == pytest.approx(t)
    assert res["p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert paired_ttest([0.5], [0.4])["p"] is None
    assert paired_ttest([0.5, 0.6], [0.5, 0.6])["p"] == 1.0


def test_bootstrap_variance_matches_the_exact_bootstrap_variance():
    # seed-pooled per-example differences d_i; the bootstrap variance of their mean is var0(d) / n (ddof 0)
    refs = [0, 1, 1, 0, 1, 0]
    a = TaskPredictions([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1]], refs)
    b = TaskPredictions([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0]], refs)
    d = (np.array([[1, 1, 1, 1, 0, 1], [1, 1, 0, 1, 1, 0]]).mean(0)
         - np.array([[0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1]]).mean(0))
    res = paired_bootstrap({"t": a}, {"t": b}, n_resamples=20_000)
    assert res["diff"] == pytest.approx(d.mean())
    assert res["tasks"]["t"]["var"] == pytest.approx(np.var(d) / 6, rel=0.05)
    two = paired_bootstrap({"t": a, "u": b}, {"t": b, "u": b}, n_resamples=20_000)  # average of two tasks
    assert two["var"] == pytest.approx(np.var(d) / 6 / 4, rel=0.05)


def test_combined_test_matches_hand_computation():
    from scipy import stats

    # D_s = 2, 5, -1 points: sample variance 9e-4, / 3 seeds = 3e-4; + bootstrap 1e-4 -> SE = 0.02, z = 1
    # Welch-Satterthwaite: df = (4e-4)^2 / ((3e-4)^2 / 2) = 32/9
    res = combined_test([0.02, 0.05, -0.01], 1e-4)
    df = 32 / 9
    assert res["diff"] == pytest.approx(0.02) and res["se"] == pytest.approx(0.02) and res["df"] == pytest.approx(df)
    assert res["p"] == pytest.approx(2 * stats.t.sf(1.0, df))
    half = stats.t.ppf(0.975, df) * 0.02
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert res["mde"] == pytest.approx((stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * 0.02)
    assert not res["examples_only"]
    # one seed: the examples' noise only, normal quantiles: MDE = (1.960 + 0.842) SE
    one = combined_test([0.03], 4e-4)
    assert one["examples_only"] and one["df"] is None and one["se"] == pytest.approx(0.02)
    assert one["p"] == pytest.approx(2 * stats.norm.sf(1.5))
    assert one["mde"] == pytest.approx((1.959964 + 0.841621) * 0.02)
    assert combined_test([0.0, 0.0], 0.0)["p"] == 1.0


def _simulated_comparison(rng, effect, seeds, n, tasks, seed_sd, example_sd, low, high):
    """Binary predictions of methods a and b: example i of a task is right with probability
    pi_i (+ g_i + effect for a) + a seed shift per method, seed and task; pi ~ U(low, high),
    g ~ U(-w, w) with w = sqrt(3) example_sd (a's own easy / hard examples, the same for every seed)."""
    a, b, seed_diffs = {}, {}, np.zeros(seeds)
    w = math.sqrt(3) * example_sd
    for t in range(tasks):
        pi, g, refs = rng.uniform(low, high, n), rng.uniform(-w, w, n), rng.integers(0, 2, n)
        rows = {}
        for m, shift in (("a", g + effect), ("b", 0.0)):
            p = np.clip(pi + shift + rng.normal(0, seed_sd, (seeds, 1)), 0, 1)
            rows[m] = np.where(rng.random((seeds, n)) < p, refs, 1 - refs)
        seed_diffs += (np.mean(rows["a"] == refs, 1) - np.mean(rows["b"] == refs, 1)) / tasks
        a[str(t)], b[str(t)] = (TaskPredictions(list(rows[m]), refs.tolist()) for m in ("a", "b"))
    return a, b, seed_diffs


@pytest.mark.parametrize("seed_sd", [0.06, 0.02])  # per-task seed noise like the offline suite's / 3x smaller
def test_mde_has_80_percent_power_in_simulation(seed_sd):
    from scipy import stats

    s, n, k, example_sd, low, high = 3, 100, 4, 0.06, 0.3, 0.6
    # expected variance components of the generating model (no clipping: |shifts| stay inside [0, 1])
    m, var_pi, var_g, var_h = (low + high) / 2, (high - low) ** 2 / 12, example_sd ** 2, seed_sd ** 2
    bernoulli = 2 * (m - m * m - var_pi - var_h) - var_g  # E[p_a(1 - p_a) + p_b(1 - p_b)] at no effect
    seed_term = (2 * var_h + bernoulli / n) / (k * s)  # E[Var_seeds(D_s)] / S
    boot_term = (n - 1) / n ** 2 * (var_g + bernoulli / s) / k  # E[bootstrap variance], infinitely many resamples
    true_var = (2 * var_h / s + var_g / n + bernoulli / (n * s)) / k  # Var(Δ) over test sets and seeds
    se = math.sqrt(seed_term + boot_term)
    df = se ** 4 / (seed_term ** 2 / (s - 1))
    mde = (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * se

    rng, sims = np.random.default_rng(0), 400
    rates, se2 = {}, []
    for effect in (mde, 0.0):
        significant = 0
        for i in range(sims):
            a, b, seed_diffs = _simulated_comparison(rng, effect, s, n, k, seed_sd, example_sd, low, high)
            res = combined_test(seed_diffs, paired_bootstrap(a, b, n_resamples=300, seed=i)["var"])
            significant += res["p"] < 0.05
            se2.append(res["se"] ** 2)
        rates[effect] = significant / sims
    print(f"seed sd {seed_sd}: MDE {100 * mde:.2f} points (df {df:.1f}); SE / true sd = "
          f"{se / math.sqrt(true_var):.2f}; significant at the MDE {rates[mde]:.3f}, with no effect {rates[0.0]:.3f}")
    assert np.mean(se2) == pytest.approx(se ** 2, rel=0.1)  # the estimator is unbiased for the model's SE²
    assert 0.72 <= rates[mde] <= 0.88
    assert rates[0.0] <= 0.09


def test_variance_components_project_the_true_variance_to_other_seed_counts():
    """From 3 seeds of simulated binary predictions, E + V / S' predicts Var(Δ) of 3 and of 12 seeds (the
    generating model's, derived as in the test above) and the combined test's SE² (as_reported)."""
    from morelora.experiments.statistics import project_mde, seeds_for_mde, variance_components

    s, n, k, seed_sd, example_sd, low, high = 3, 100, 4, 0.06, 0.06, 0.3, 0.6
    m, var_pi, var_g, var_h = (low + high) / 2, (high - low) ** 2 / 12, example_sd ** 2, seed_sd ** 2
    bernoulli = 2 * (m - m * m - var_pi - var_h) - var_g

    def true_var(seeds):
        return (2 * var_h / seeds + var_g / n + bernoulli / (n * seeds)) / k

    reported = (2 * var_h + bernoulli / n) / (k * s) + (n - 1) / n ** 2 * (var_g + bernoulli / s) / k
    rng, est = np.random.default_rng(1), {3: [], 12: [], "reported": []}
    for _ in range(400):
        a, b, seed_diffs = _simulated_comparison(rng, 0.0, s, n, k, seed_sd, example_sd, low, high)
        refs = {t: np.asarray(a[t].references) for t in a}
        diffs = {t: (np.asarray(a[t].predictions) == refs[t]).astype(float)
                 - (np.asarray(b[t].predictions) == refs[t]) for t in a}
        comp = variance_components(diffs)
        assert comp["seeds"] == 3 and comp["seed_var"] == pytest.approx(np.var(seed_diffs, ddof=1))
        for seeds in (3, 12):
            est[seeds].append(project_mde(comp, seeds)["se"] ** 2)
        est["reported"].append(project_mde(comp, s, as_reported=True)["se"] ** 2)
    assert np.mean(est[3]) == pytest.approx(true_var(3), rel=0.1)
    assert np.mean(est[12]) == pytest.approx(true_var(12), rel=0.1)
    assert np.mean(est["reported"]) == pytest.approx(reported, rel=0.1)
    # each component on its own (normal effects, the examples' large): E = σ²_e / (T n), V = σ²_u + σ²_w / n
    e_sd, u_sd, w_sd, n, k = 0.3, 0.1, 0.7, 500, 2
    comps = [variance_components({t: rng.normal(0, e_sd, (1, n)) + rng.normal(0, u_sd, (4, 1))
                                  + rng.normal(0, w_sd, (4, n)) for t in "ab"}) for _ in range(200)]
    assert np.mean([c["examples_var"] for c in comps]) == pytest.approx(e_sd ** 2 / (k * n), rel=0.05)
    assert np.mean([c["interaction_var"] for c in comps]) == pytest.approx(w_sd ** 2 / (k * n), rel=0.05)
    assert np.mean([c["seed_var"] for c in comps]) == pytest.approx((u_sd ** 2 + w_sd ** 2 / n) / k, rel=0.15)
    assert np.mean([c["tasks"]["a"]["sigma2_u"] for c in comps]) == pytest.approx(u_sd ** 2, rel=0.15)
    # the seeds a target MDE needs: the first count at or under it; none under the examples' floor
    comp = {"examples_var": 1e-5, "seed_var": 4e-4, "interaction_var": 0.0}
    need = seeds_for_mde(comp, 0.02)
    assert project_mde(comp, need)["mde"] <= 0.02 < project_mde(comp, need - 1)["mde"]
    floor = project_mde(comp, math.inf)["mde"]
    assert floor == pytest.approx(2.8016 * math.sqrt(1e-5), rel=1e-4) and seeds_for_mde(comp, 0.9 * floor) is None
    with pytest.raises(ValueError, match="S >= 2 seeds"):
        variance_components({"a": np.zeros((1, 5))})


def test_variance_components_cut_a_negative_examples_estimate_and_keep_it():
    """Differences whose example means are all equal but whose seeds disagree per example: by hand, MS_ex = 0,
    MS_res = 1 (residuals ±0.5 over (S-1)(n-1) = 1), σ²_e = (0 - 1) / 2, E = -0.5 / (1² · 2) = -0.25 -> cut to 0,
    the estimate kept beside it; W = 1 / 2."""
    from morelora.experiments.statistics import project_mde, variance_components

    comp = variance_components({"a": np.array([[1.0, 0.0], [0.0, 1.0]])})
    assert comp["examples_var_estimate"] == pytest.approx(-0.25) and comp["examples_var"] == 0.0
    assert comp["interaction_var"] == pytest.approx(0.5) and comp["seed_var"] == pytest.approx(0.0)
    assert project_mde(comp, math.inf)["mde"] == 0.0   # why `power` warns when the estimate is cut


# --------------------------------------------------------------------------------------------- planning


@pytest.fixture
def tiny_config(tmp_path, tiny_bert, run_config):
    cfg = run_config(tiny_bert, tmp_path / "unused", max_steps=3, save_steps=0, logging_steps=1, batch_size=4)
    cfg["tasks"] = ["sst2", "rte"]
    cfg["data"] = {"max_train_per_task": 16, "max_eval_per_task": 24}
    cfg["method"]["contrastive_weight"] = 0.1
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_runs_method_options(tmp_path, tiny_config):
    methods = tmp_path / "methods.yaml"
    methods.write_text("more_r2: {name: more, r: 2}\n")
    from morelora.experiments.compare import load_method_config

    per = load_method_config(methods, ["methods.more.lora_alpha=4"])
    runs = plan_runs(tiny_config, "more,more_r2", 2, tmp_path / "c", ["train.seed=5"], per, verbose=False)
    assert [(r.label, r.seed) for r in runs] == [("more", 5), ("more", 6), ("more_r2", 5), ("more_r2", 6)]
    assert runs[0].cfg.method == {"name": "more", "r": 4, "lora_alpha": 4, "lora_dropout": 0.0,
                                  "contrastive_weight": 0.1}
    assert runs[3].cfg.method["r"] == 2 and runs[3].cfg.method["name"] == "more"
    assert runs[3].run_dir == tmp_path / "c" / "more_r2" / "seed6"
    with pytest.raises(CompareError, match="more than once"):
        plan_runs(tiny_config, "more,more", 1, tmp_path / "c", verbose=False)


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", " , "], "no methods given"),
    (["--methods", "more", "--seeds", "0"], "--seeds must be at least 1"),
    (["--methods", "more", "methods.more.no_such_option=1"], "no_such_option"),
    (["--methods", "more", "--baseline", "lora"], "--baseline lora is not among the compared methods"),
])
def test_bad_input_is_one_line_error(tmp_path, tiny_config, capsys, args, message):
    assert main(["compare", str(tiny_config), "--output-dir", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("morelora: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_summary_with_one_seed_reports_na(tmp_path):
    from morelora.config import RunConfig
    from morelora.experiments.report import markdown, plot, summarize
    from morelora.experiments.runs import PREDICTIONS_NAME, PlannedRun

    refs = [0, 1, 1, 0]
    runs = []
    for label, preds, params in (("more", [0, 1, 1, 1], 10.0), ("lora", [0, 0, 0, 0], 20.0)):
        run_dir = tmp_path / label / "seed0"
        run_dir.mkdir(parents=True)
        score = float(np.mean(np.equal(preds, refs)))
        task = {"score": score, "main_metric": "accuracy", "reference_score": 0.5, "num_examples": 4}
        (run_dir / "eval.json").write_text(json.dumps({
            "tasks": {"a": task, "b": task}, "average": score, "parameters": {"per_task": params, "trainable": 5},
            "train": {"train_time_s": 1.5}}))
        task_preds = {"main_metric": "accuracy", "num_labels": 2, "predictions": preds, "references": refs}
        (run_dir / PREDICTIONS_NAME).write_text(json.dumps({"tasks": {"a": task_preds, "b": task_preds}}))
        cfg = RunConfig.from_dict({"model": {"name_or_path": "x"}, "tasks": ["a", "b"], "method": {"name": label},
                                   "train": {"output_dir": str(run_dir)}})
        runs.append(PlannedRun(label, 0, cfg))
    summary = summarize(runs, baseline="lora", n_resamples=100)
    assert summary["methods"]["more"]["average"]["mean"] == 0.75
    assert summary["tests"]["more"]["diff_average"] == pytest.approx(0.25)
    assert summary["tests"]["more"]["bootstrap_diff"] == pytest.approx(0.25)
    assert summary["tests"]["more"]["ttest_p"] is None
    # one seed: the combined test has the examples' noise only; per example d = (0, 1, 1, -1) in both tasks,
    # exact bootstrap variance var0(d) / 4 per task, / 2 for the average of two (independently resampled) tasks
    test = summary["tests"]["more"]
    c = test["combined"]
    assert c["examples_only"] and c["df"] is None and c["diff"] == pytest.approx(0.25)
    assert c["se"] ** 2 == pytest.approx(test["bootstrap_var"])
    assert test["bootstrap_var"] == pytest.approx(np.var([0, 1, 1, -1]) / 4 / 2, rel=0.3)
    assert c["mde"] == pytest.approx(2.8016 * c["se"], rel=1e-4)
    assert test["combined_tasks"]["a"]["se"] ** 2 == pytest.approx(test["bootstrap_tasks"]["a"]["var"])
    md = markdown(summary)
    assert "| more | 75.00 ± n/a | 75.00 ± n/a | **75.00 ± n/a** | 10 | 5 | 1.5 |" in md
    assert "| *reference* | 50.00 | 50.00 | 50.00 |" in md and "| more | +25.00 |" in md
    assert "| method | a (accuracy, n=4) | b (accuracy, n=4) | average |" in md
    lo, hi = (f"{100 * c[k]:+.2f}" for k in ("ci_low", "ci_high"))
    assert f"| more | +25.00 | [{lo}, {hi}] | {c['p']:.3f} | {100 * c['mde']:.2f}* |" in md
    assert "MDE vs lora" in md and "*: one seed: examples' noise only" in md
    a = test["combined_tasks"]["a"]
    assert (f"| more | +25.00 ({a['p']:.3f}, {test['bootstrap_tasks']['a']['p']:.3f}, {100 * a['mde']:.2f}*) |"
            in md)
    assert plot(summary, tmp_path / "r.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path, tiny_config, monkeypatch, capsys):
    import scipy.stats

    from morelora import training
    from morelora.experiments import report
    from morelora.methods import METHODS

    methods = tmp_path / "methods.yaml"
    methods.write_text("more_r2: {name: more, r: 2}\n")
    labels = ["more", "lora"] if "lora" in METHODS else ["more", "more_r2"]
    out = tmp_path / "cmp"
    argv = ["compare", str(tiny_config), "--methods", ",".join(labels), "--seeds", "2", "--output-dir", str(out),
            "--method-config", str(methods), "--baseline", labels[1], "--bootstrap", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "run 1/4: more seed 0: training" in printed and "run 4/4" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["sst2", "rte"] and results["seeds"] == [0, 1]
    assert list(results["methods"]) == labels
    for lab in labels:
        r = results["methods"][lab]
        assert len(r["average"]["scores"]) == 2 and r["average"]["half_width"] is not None
        assert r["average"]["mean"] == pytest.approx(np.mean([r["tasks"][t]["mean"] for t in results["tasks"]]))
        assert r["parameters"]["per_task"] > 0 and r["train_time_s"]["mean"] > 0
    test = results["tests"][labels[0]]
    assert test["baseline"] == labels[1]
    assert 0 < test["bootstrap_p"] <= 1 and test["ttest_n"] == 2
    # the bootstrap's observed difference is recomputed from the per-example predictions: it matches eval.json
    assert test["bootstrap_diff"] == pytest.approx(test["diff_average"], abs=1e-9)
    # the combined test: per-seed differences of eval.json's averages + the bootstrap variance
    seed_diffs = np.subtract(*(results["methods"][lab]["average"]["scores"] for lab in labels))
    c = test["combined"]
    assert c["diff"] == pytest.approx(test["diff_average"]) and not c["examples_only"]
    assert c["se"] ** 2 == pytest.approx(np.var(seed_diffs, ddof=1) / 2 + test["bootstrap_var"])
    assert set(test["combined_tasks"]) == {"sst2", "rte"}
    md = (out / "results.md").read_text()
    for name in [*labels, "sst2 (accuracy, n=24)", "rte", "average", "paired bootstrap p", "paired t-test p",
                 f"MDE vs {labels[1]}", "p (seeds + examples)"]:
        assert name in md
    assert (out / "results.png").stat().st_size > 10_000
    # the difference plot's rows: the average's difference of the seed means, CI = diff -+ t(df) * se
    rows = {(r["method"], r["row"]): r for r in report.difference_rows(results)}
    assert set(rows) == {(labels[0], k) for k in ("average", "sst2", "rte")}
    avg = rows[(labels[0], "average")]
    means = [results["methods"][lab]["average"]["mean"] for lab in labels]
    assert avg["diff"] == pytest.approx(100 * (means[0] - means[1]))
    half = scipy.stats.t.ppf(0.975, c["df"]) * c["se"] if c["df"] else scipy.stats.norm.ppf(0.975) * c["se"]
    assert (avg["ci_low"], avg["ci_high"]) == pytest.approx((avg["diff"] - 100 * half, avg["diff"] + 100 * half))
    assert (out / "differences.png").stat().st_size > 10_000

    # a second invocation reuses finished runs; a run without eval.json resumes from its last checkpoint
    evals = sorted(out.glob("*/seed*/eval.json"))
    assert len(evals) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in evals}
    unfinished = out / labels[1] / "seed1"
    (unfinished / "eval.json").unlink()
    (unfinished / "test_predictions.json").unlink()
    calls = []
    real_train = training.train

    def spy(cfg, resume=False):
        calls.append((cfg.train.output_dir, resume))
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(training, "train", spy)
    assert main(argv) == 0
    assert calls == [(str(unfinished), True)]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in evals if p.parent != unfinished)
    assert "done, reusing" in capsys.readouterr().out

    # a finished run is not silently reused with another config
    assert main([*argv, "train.max_steps=5"]) == 2
    assert "different config (train.max_steps)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- configs as rows


def _variant(tiny_config, name, **blocks):
    cfg = yaml.safe_load(tiny_config.read_text())
    for block, values in blocks.items():
        cfg[block] = {**cfg.get(block, {}), **values} if isinstance(values, dict) else values
    path = tiny_config.parent / "rows" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_config_runs_keeps_each_config(tmp_path, tiny_config):
    from morelora.config import load_config
    from morelora.experiments.compare import plan_config_runs

    full = _variant(tiny_config, "full")
    hard = _variant(tiny_config, "no_ste", method={"routing": "hard"}, data={"sampling": "uniform"})
    runs = plan_config_runs([full, hard], 2, tmp_path / "c", ["train.seed=3"])
    assert [(r.label, r.seed) for r in runs] == [("full", 3), ("full", 4), ("no_ste", 3), ("no_ste", 4)]
    assert runs[3].run_dir == tmp_path / "c" / "no_ste" / "seed4"
    assert runs[3].cfg.method == load_config(hard).method and runs[3].cfg.method["routing"] == "hard"
    assert runs[3].cfg.data.sampling == "uniform" and runs[0].cfg.data.sampling == load_config(full).data.sampling
    with pytest.raises(CompareError, match="must name the same tasks"):
        plan_config_runs([full, _variant(tiny_config, "one", tasks=["sst2"])], 1, tmp_path / "c")
    other = tmp_path / "x" / "full.yaml"
    other.parent.mkdir()
    other.write_text(full.read_text())
    with pytest.raises(CompareError, match="share the file name"):
        plan_config_runs([full, other], 1, tmp_path / "c")


@pytest.mark.parametrize("extra, message", [
    (["--methods", "more"], "drop --methods"),
    (["methods.more.r=2"], "need --methods on one config"),
])
def test_config_rows_bad_input(tmp_path, tiny_config, capsys, extra, message):
    rows = [str(_variant(tiny_config, n)) for n in ("a", "b")]
    assert main(["compare", *rows, "--output-dir", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("morelora: error: ") and message in err
    assert main(["compare", str(tiny_config), "--output-dir", str(tmp_path / "c")]) == 2
    assert "no methods given" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_compare_config_rows_end_to_end_and_moved_folder(tmp_path, tiny_config, capsys):
    full = _variant(tiny_config, "full")
    hard = _variant(tiny_config, "no_ste", method={"routing": "hard"})
    out = tmp_path / "abl"
    argv = ["compare", str(full), str(hard), "--seeds", "1", "--baseline", "full", "--bootstrap", "50"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["full", "no_ste"] and results["baseline"] == "full"
    assert results["methods"]["no_ste"]["method_options"]["routing"] == "hard"
    saved = yaml.safe_load((out / "no_ste" / "seed0" / "config.yaml").read_text())
    assert saved["method"]["routing"] == "hard"
    assert "no_ste" in results["tests"]
    # a comparison folder that was moved is reused: output_dir does not change a run's result
    moved = tmp_path / "moved"
    out.rename(moved)
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(moved)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, reusing") == 2 and "training" not in printed.replace("train_time", "")


def test_method_config_run_keys_per_label(tmp_path, tiny_config):
    """Dotted keys in a label's entry set that label's run config (a learning-rate sweep as rows)."""
    from morelora.experiments.compare import load_method_config

    methods = tmp_path / "methods.yaml"
    methods.write_text("more_fast: {name: more, r: 2, train.lr: 5.0e-3, train.warmup_steps: 1}\n")
    runs = plan_runs(tiny_config, "more,more_fast", 1, tmp_path / "c", [], load_method_config(methods),
                     verbose=False)
    base, fast = runs
    assert fast.cfg.train.lr == 5e-3 and fast.cfg.train.warmup_steps == 1 and fast.cfg.method["r"] == 2
    assert base.cfg.train.lr != 5e-3 and "train.lr" not in fast.cfg.method
    assert fast.run_dir == tmp_path / "c" / "more_fast" / "seed0" == Path(fast.cfg.train.output_dir)
    methods.write_text("more_fast: {name: more, method.r: 2}\n")
    with pytest.raises(CompareError, match="method.r: set method options without the 'method.' prefix"):
        plan_runs(tiny_config, "more_fast", 1, tmp_path / "c", [], load_method_config(methods), verbose=False)
    methods.write_text("more_fast: {name: more, train.no_such_key: 2}\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        plan_runs(tiny_config, "more_fast", 1, tmp_path / "c", [], load_method_config(methods), verbose=False)


# ------------------------------------------------------------------------------------------------ --plan


def test_plan_status_and_hours_table(tmp_path, tiny_config, monkeypatch, capsys):
    from morelora.experiments.runs import PREDICTIONS_NAME
    from morelora.training import trainer
    from morelora.training.checkpoint import ADAPTER_DIR, STATE_NAME

    out = tmp_path / "cmp"
    runs = {(r.label, r.seed): r for r in plan_runs(tiny_config, "more,lora", 2, out, verbose=False)}
    for key in [("more", 0), ("lora", 0), ("more", 1)]:  # two finished (one without predictions), one partial
        runs[key].run_dir.mkdir(parents=True)
        runs[key].cfg.dump(runs[key].run_dir / "config.yaml")
    for key in [("more", 0), ("lora", 0)]:
        (runs[key].run_dir / "eval.json").write_text("{}")
    (runs["more", 0].run_dir / PREDICTIONS_NAME).write_text("{}")
    ckpt = runs["more", 1].run_dir / "checkpoint-2"
    (ckpt / ADAPTER_DIR).mkdir(parents=True)
    (ckpt / STATE_NAME).write_text('{"step": 2}')
    (runs["more", 1].run_dir / "checkpoint-3.tmp").mkdir()  # an incomplete checkpoint does not count
    timed = []

    def fake_time_steps(cfg, steps, warmup):
        timed.append((cfg.train.output_dir, steps, warmup))
        return {"step_s": 600.0, "test_s": 360.0, "validation_s": 0.0}

    monkeypatch.setattr(trainer, "time_steps", fake_time_steps)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["compare", str(tiny_config), "--methods", "more,lora", "--seeds", "2", "--output-dir", str(out),
                 "--plan"]) == 0
    printed = capsys.readouterr().out
    # one timing per method, of its first unfinished run; hours = steps left x 600 s + the 360 s test pass
    assert timed == [(str(runs["more", 1].run_dir), 3, 1), (str(runs["lora", 0].run_dir), 3, 1)]
    lines = printed.splitlines()
    assert "| method | s / step | test pass (s) | seed 0 | seed 1 | hours left |" in lines
    assert "| more | 600.00 | 360.0 | done | partial 2/3, 0.27 h | 0.27 |" in lines  # (600 + 360) / 3600
    assert "| lora | 600.00 | 360.0 | done (predictions left), 0.10 h | not started 0/3, 0.60 h | 0.70 |" in lines
    assert "| total | | | | | 0.97 |" in lines
    assert "finished: 2 of 4 runs (more seed 0, lora seed 0); partial: 1; not started: 1." in lines
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing trained or written


def test_plan_times_real_steps(tmp_path, tiny_config, capsys):
    import re

    from morelora.config import load_config
    from morelora.training.trainer import time_steps

    out = tmp_path / "cmp"
    timing = time_steps(load_config(tiny_config, [f"train.output_dir={out}"]), steps=1, warmup=1)
    assert timing["step_s"] > 0 and timing["test_s"] > 0 and timing["validation_s"] > 0
    assert main(["compare", str(tiny_config), "--methods", "lora", "--output-dir", str(out), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\| lora \| \d+\.\d\d \| \d+\.\d \| not started 0/3, \d+\.\d\d h \| \d+\.\d\d \|$", printed,
                     re.M), printed
    assert "finished: 0 of 1 runs; partial: 0; not started: 1." in printed
    assert not out.exists()


def test_plan_in_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--plan" in capsys.readouterr().out


def test_difference_plot_writes_small_p_as_the_tables_do(tmp_path, monkeypatch):
    """The p beside each point reads like the report's tables: "< 0.001", not "0.000"; "n/a" without a test."""
    import matplotlib.figure

    from morelora.experiments import report

    rows = [{"method": "more", "row": "average", "p": 2e-5, "diff": 2.7, "ci_low": 1.4, "ci_high": 4.0, "mde": 1.9},
            {"method": "more", "row": "sst2", "p": 0.0456, "diff": -1.0, "ci_low": -3.0, "ci_high": 1.0, "mde": 5.0},
            {"method": "more", "row": "rte", "p": None, "diff": 0.5, "ci_low": -1.0, "ci_high": 2.0, "mde": 3.0}]
    monkeypatch.setattr(report, "difference_rows", lambda summary: rows)
    texts: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    summary = {"tasks": ["sst2", "rte"], "confidence": 0.95, "tests": {"more": {"baseline": "lora"}}}
    assert report.plot_differences(summary, tmp_path / "d.png") == tmp_path / "d.png"
    assert texts == ["+2.70 (p < 0.001)", "-1.00 (p 0.046)", "+0.50 (p n/a)"]


@pytest.mark.parametrize("labels", [["lora", "more"], ["lora_lr1e-3", "more_lr1e-3", "moelora_lr1e-3",
                                                        "multilora_lr3e-4"]])
def test_plot_average_labels_do_not_overlap(tmp_path, monkeypatch, labels):
    """The average panel's method names stay apart, short or long (broken after an underscore), as the protocol's
    rows are."""
    import matplotlib.figure

    from morelora.experiments import report

    boxes: list[list] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        renderer = fig.canvas.get_renderer()
        boxes.append([t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    stat = {"mean": 0.6, "half_width": 0.01}
    tasks = ["sst2", "piqa", "openbookqa", "arc_easy", "arc_challenge"]
    summary = {"tasks": tasks, "confidence": 0.95, "seeds": [0, 1], "main_metrics": dict.fromkeys(tasks, "accuracy"),
               "reference_scores": dict.fromkeys(tasks, 0.25),   # its legend entry narrows the axes
               "methods": {lab: {"average": stat, "tasks": dict.fromkeys(tasks, stat)} for lab in labels}}
    report.plot(summary, tmp_path / "r.png")
    (extents,) = boxes
    assert [e.width > 0 for e in extents] == [True] * len(labels)
    gaps = [b.x0 - a.x1 for a, b in zip(extents, extents[1:])]
    assert min(gaps) > 5   # pixels at the figure dpi: a visible space between two names


@pytest.mark.parametrize("name, width, lines", [("moelora_lr1e-3", 11, ["moelora_", "lr1e-3"]),
                                                 ("lora_lr1e-3", 11, ["lora_lr1e-3"]),
                                                 ("lora_r16_lr3e-4", 9, ["lora_r16_", "lr3e-4"]),
                                                 ("_x__y", 2, ["_", "x_", "_y"]),
                                                 ("multilora", 3, ["multilora"])])
def test_wrap_name_breaks_after_underscores_and_keeps_the_name(name, width, lines):
    from morelora.experiments.report import _wrap_name

    assert _wrap_name(name, width).split("\n") == lines
