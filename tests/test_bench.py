"""Smoke test of the benchmark harness: it runs on tiny models and returns well-formed rows (no timing checks)."""

from __future__ import annotations

import json
import math

from morelora.bench import SECTIONS, TARGETS, format_report, main


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
    assert {r["target"] for r in rows if r["kind"] == "target"} >= {
        "train_vs_lora", "infer_vs_lora", "mixed_vs_single", "merged_vs_base", "added_vs_peft_mixed", "tasks_flat"}
    assert all(r["peak_mb"] >= 0 for r in rows if r["kind"] == "memory")
    assert "| target |" in report and ("PASS" in report or "MISS" in report)
    assert "| target |" in format_report(rows)
