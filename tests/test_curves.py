"""``morelora curves``: validation curves side by side and the plateau step, from metrics.jsonl alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from morelora.analysis.curves import plateau_step, read_curves
from morelora.cli import main


def _run(folder: Path, averages: list[float], step: int = 100) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, avg in enumerate(averages, 1):
        rows.append({"step": i * step, "loss": 1.0 / i, "lr": 1e-3})
        rows.append({"step": i * step, "split": "validation", "eval_average": avg, "eval_a": avg + 0.1,
                     "eval_b": avg - 0.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plateau_step_by_hand():
    pts = [(100, 0.50), (200, 0.60), (300, 0.655), (400, 0.66), (500, 0.652)]
    assert plateau_step(pts, 0.01) == 300      # after 0.655 nothing exceeds 0.665; after 0.60, 0.66 does
    assert plateau_step(pts, 0.001) == 400     # 0.66 > 0.655 + 0.001: the curve still rose after step 300
    assert plateau_step([(1, 0.3)], 0.0) == 1 and plateau_step([], 0.01) is None


def test_plateau_step_needs_every_later_point():
    pts = [(1, 0.60), (2, 0.50), (3, 0.66)]    # a dip, then a rise above the first point + tolerance
    assert plateau_step(pts, 0.05) == 3
    assert plateau_step([(1, 0.70), (2, 0.60), (3, 0.55)], 0.01) == 1   # falling after its peak: stopped at 1


def test_curves_cli_table_plateau_and_figure(tmp_path, capsys):
    a = _run(tmp_path / "lora", [0.40, 0.50, 0.55, 0.56])
    b = _run(tmp_path / "more", [0.45, 0.52, 0.53, 0.60])
    out, js = tmp_path / "c.png", tmp_path / "c.json"
    assert main(["curves", f"lora={a}", f"more={b}", "--out", str(out), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "   400         56.00         60.00" in text
    assert "lora: best average 56.00 at step 400; no later gain over 1 point(s) from step 300 on" in text
    assert "more: best average 60.00 at step 400; no later gain over 1 point(s) from step 400 on" in text
    assert out.stat().st_size > 1000
    saved = json.loads(js.read_text())["runs"]
    assert saved["lora"]["plateau_step"] == 300 and saved["more"]["curves"]["a"][0] == [100, pytest.approx(0.55)]
    assert read_curves(a)["b"][-1] == (400, pytest.approx(0.46))


def test_curves_cli_errors(tmp_path, capsys):
    assert main(["curves", str(tmp_path / "nowhere")]) == 2
    assert "has no metrics.jsonl: not a run folder" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert main(["curves", str(tmp_path / "r")]) == 2
    assert "no validation rows: train with train.eval_steps > 0" in capsys.readouterr().err
