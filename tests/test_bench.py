"""Smoke test of the benchmark harness: it runs on tiny models and returns well-formed rows (no timing checks)."""

from __future__ import annotations

import json
import math

import pytest

from morelora.bench import SECTIONS, TARGETS, Case, format_report, main, median_ci, target_row


@pytest.mark.slow
def test_quick_suite_rows_are_well_formed(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    report = capsys.readouterr().out
    rows = json.loads(out.read_text())

    kinds = {r["kind"] for r in rows}
    assert {"meta", "timing", "memory", "target"} <= kinds <= {"meta", "timing", "memory", "target", "skip"}
    assert rows[0]["kind"] == "meta" and rows[0]["suite"] == "quick"
    timing = [r for r in rows if r["kind"] == "timing"]
    assert {r["section"] for r in timing} == set(SECTIONS)
    for r in timing:
        assert r["n"] == 1 and r["median_ms"] > 0 and math.isfinite(r["median_ms"])
        assert r["mode"] in ("train", "infer") and r["clock"] in ("cpu", "wall")
    variants = {r["variant"] for r in timing}
    assert {"base", "peft-lora", "more", "more-mixed", "more-merged", "peft-mixed-8"} <= variants
    for r in (r for r in rows if r["kind"] == "target"):
        assert r["target"] in TARGETS and r["status"] in ("PASS", "MISS")
        assert math.isfinite(r["value"]) and r["limit"] == TARGETS[r["target"]][0]
        assert r["ci_low"] <= r["ci_high"] and isinstance(r["decided"], bool)
    assert {r["target"] for r in rows if r["kind"] == "target"} >= {
        "train_vs_lora", "infer_vs_lora", "mixed_vs_single", "merged_vs_base", "added_vs_peft_mixed", "tasks_flat"}
    assert all(r["peak_mb"] >= 0 for r in rows if r["kind"] == "memory")
    assert "| target |" in report and ("PASS" in report or "MISS" in report)
    assert "| target |" in format_report(rows)


def test_median_ci_is_the_binomial_order_statistic_interval():
    """For n = 30 the distribution-free 95 % interval of the median is [x_(10), x_(21)] (1-based): P(Bin(30, 1/2)
    <= 9) = 0.0214 <= 0.025 < P(<= 10) = 0.0494."""
    from scipy.stats import binom

    assert binom.cdf(9, 30, 0.5) <= 0.025 < binom.cdf(10, 30, 0.5)
    xs = [1.0 + 0.01 * ((7 * i) % 30) for i in range(30)]   # 30 distinct values, shuffled
    s = sorted(xs)
    assert median_ci(xs) == (s[9], s[20])
    assert median_ci(xs[:4]) == (min(xs[:4]), max(xs[:4]))   # too few rounds for a 95 % interval


def test_target_status_and_decided():
    case = Case("m", 1, 1, 1)
    below = [0.90 + 0.001 * i for i in range(30)]             # all under the 1.05 limit
    row = target_row("train_vs_lora", case, 0.915, below, "d", "train")
    assert (row["status"], row["decided"]) == ("PASS", True)
    straddle = [0.95 + 0.01 * i for i in range(30)]          # median 1.095 over 1.05, CI reaches under it
    row = target_row("train_vs_lora", case, 1.095, straddle, "d", "train")
    assert (row["status"], row["decided"]) == ("MISS", False) and row["ci_low"] < 1.05 < row["ci_high"]
    row = target_row("vs_baseline", case, 1.0, [1.0] * 10, "d", "train")   # "faster" is strict
    assert (row["status"], row["decided"]) == ("MISS", True)


def test_added_time_pairs_each_round_with_its_base():
    """Round-to-round drift (common to all variants of a round) cancels: the figure is median(a - base) /
    median(b - base) by hand, and its bootstrap CI holds the true 0.25."""
    import random
    import statistics

    from morelora.bench import added_time

    rng = random.Random(0)
    base = [100 + 10 * rng.random() for _ in range(30)]          # drift of +-5 ms between rounds
    a = [z + 5 + rng.gauss(0, 0.2) for z in base]
    b = [z + 20 + rng.gauss(0, 0.2) for z in base]
    value, per_round, (lo, hi) = added_time({"a": a, "b": b, "z": base}, "a", "b", "z")
    want = statistics.median(x - z for x, z in zip(a, base)) / statistics.median(y - z for y, z in zip(b, base))
    assert math.isclose(value, want, rel_tol=1e-12)
    assert lo <= 0.25 <= hi and hi - lo < 0.03 and len(per_round) == 30
