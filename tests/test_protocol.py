"""bench/protocol.py: the protocol's order, its learning-rate winners from validation alone, and run claims."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("MORELORA_PROTOCOL_DIR", str(tmp_path / "p"))
    spec = importlib.util.spec_from_file_location("protocol_script", ROOT / "bench" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finish(run_dir: Path, validation: float, steps: int = 10, test: float = 0.5) -> None:
    """A finished run as the trainer leaves it: eval.json (test), metrics.jsonl (validation curve), predictions."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps({"average": test, "train": {"steps": steps}}))
    rows = [{"step": steps // 2, "split": "validation", "eval_average": validation + 0.3},  # not the last step
            {"step": steps, "loss": 1.0},
            {"step": steps, "split": "validation", "eval_average": validation}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "test_predictions.json").write_text("{}")


def test_order_winner_by_final_validation_and_seeds(protocol):
    p = protocol
    rows = p.ordered_runs()
    sweep_more = [r.label for r, w in rows[:3]]
    assert sweep_more == ["more_lr3e-4", "more_lr1e-3", "more_lr3e-3"] and rows[3][0].label == "lora_lr3e-4"
    assert [w for r, w in rows if w][:2] == ["more", "lora"]          # seeds wait for the sweeps
    first = rows[0][0]
    assert first.cfg.train.lr == pytest.approx(3e-4) and first.cfg.method["name"] == "more"
    assert first.cfg.train.eval_steps > 0, "sweep runs log a validation curve"
    # test scores favour 3e-3, validation favours 1e-3: the winner follows the final validation average
    for lr, val, test in [("3e-4", 0.50, 0.60), ("1e-3", 0.58, 0.55), ("3e-3", 0.55, 0.90)]:
        _finish(p.OUT / f"more_lr{lr}" / "seed0", val, test=test)
    s = p.sweep("more")
    assert s["winner"] == "1e-3" and s["runs"]["3e-4"] == pytest.approx(0.50)
    rows = p.ordered_runs()
    seeds = [(r.label, r.seed) for r, w in rows if w is None and r.label.startswith("more_lr1e-3")]
    assert seeds == [("more_lr1e-3", 0), ("more_lr1e-3", 1), ("more_lr1e-3", 2), ("more_lr1e-3", 3),
                     ("more_lr1e-3", 4)]
    assert "more" not in [w for _, w in rows if w]


def test_claims_exclude_live_workers_and_take_over_dead_ones(protocol):
    p = protocol
    run = p.ordered_runs()[0][0]
    assert p.claim(run) and not p.claim(run), "a claim is held until released"
    lock = p._lock(run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": p.socket.gethostname(), "boot": p._boot_id()}))
        assert not p.claim(run), "a live worker's claim is respected"
    finally:
        other.kill()
        other.wait()
    assert p.claim(run), "a dead worker's claim is taken over"
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    p.release(run)
    assert not lock.exists()
