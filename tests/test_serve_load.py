"""bench/serve_load.py, cut short: every variant measured in every round, every request answered, and the
printed ratios are the within-round ratios of the raw measurements."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_script_rounds_and_ratios(tmp_path: Path, capsys) -> None:
    serve_load = _load_script()
    out = tmp_path / "load.json"
    serve_load.main(["--requests", "8", "--rounds", "2", "--concurrency", "1", "2", "--time-limit", "60",
                     "--max-length", "32", "--json", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    names = ["more-mixed", "more-1task", "peft-mixed", "base"]
    assert len(saved["rounds"]) == 2 and len(saved["open_loop"]) == 2
    for round_ in saved["rounds"]:
        assert list(round_) == names
        for rows in round_.values():
            assert sorted(rows) == ["1", "2"] and all(r["n"] == 4 and r["rps"] > 0 for r in rows.values())
    assert all(r["n"] == 4 for r in saved["open_loop"])
    # round 2 starts with the second variant (rotated order)
    order = [m.group(1) for m in re.finditer(r"round 2/2 (\S+) +c=1 ", printed)]
    assert order == names[1:] + names[:1]
    for other in names[1:]:
        per_round = [max(r["more-mixed"][c]["rps"] for c in ("1", "2")) / max(r[other][c]["rps"] for c in ("1", "2"))
                     for r in saved["rounds"]]
        line = re.search(rf"more-mixed / {other}: +median ([\d.]+)x, rounds ([\d.]+)-([\d.]+)x", printed)
        assert line, printed
        assert float(line.group(1)) == round(statistics.median(per_round), 2)
        assert (float(line.group(2)), float(line.group(3))) == (round(min(per_round), 2), round(max(per_round), 2))
    base = [1000 / max(r["base"][c]["rps"] for c in ("1", "2")) for r in saved["rounds"]]
    peft = [1000 / max(r["peft-mixed"][c]["rps"] for c in ("1", "2")) - b for r, b in zip(saved["rounds"], base)]
    assert f"peft-mixed {statistics.median(peft):+.2f} ms (rounds {min(peft):+.2f} to {max(peft):+.2f})" in printed
    for name in names:
        assert re.search(rf"^\| {name} \| [\d.]+ req/s, \d+ / \d+ ms \| [\d.]+ req/s", printed, re.M), name
    assert "p99 / p50 median" in printed and "(target <= 3)" in printed
