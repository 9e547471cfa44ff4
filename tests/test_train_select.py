"""Trainer features (issue 37, item 4): validation scores printed when evaluated, the best checkpoint on validation
selected (train.select_best), early stopping (train.early_stopping_patience)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from morelora.cli import main
from morelora.config import ConfigError, RunConfig
from morelora.training import evaluate, load_run
from morelora.training import trainer as trainer_module
from morelora.training.checkpoint import list_checkpoints


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scripted_validation(monkeypatch, averages: list[float]) -> None:
    """Validation averages as given (the per-task scores stay real): the selection is checked against known
    numbers, whatever a tiny random model's scores do."""
    from morelora.training.evaluate import evaluate as real

    scripted = iter(averages)

    def fake(run, split, *args, **kwargs):
        result = real(run, split, *args, **kwargs)
        if split == "validation":
            result["average"] = next(scripted)
        return result

    monkeypatch.setattr(trainer_module, "evaluate", fake)


def _config(tiny_bert: str, out: Path, run_config, tmp_path: Path, **train_options) -> Path:
    cfg = run_config(tiny_bert, out, eval_steps=2, logging_steps=2, save_steps=0, **train_options)
    cfg["data"] = {"max_train_per_task": 16, "max_eval_per_task": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_select_best_tests_and_loads_the_best_validation_checkpoint(tmp_path: Path, tiny_bert: str, run_config,
                                                                    capsys, monkeypatch) -> None:
    _scripted_validation(monkeypatch, [0.5, 0.7, 0.6, 0.65])
    run_dir = tmp_path / "run"
    config = _config(tiny_bert, run_dir, run_config, tmp_path, max_steps=8, select_best=True, save_total_limit=1)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    validation = [r for r in _rows(run_dir) if r.get("split") == "validation"]
    assert [(r["step"], r["eval_average"]) for r in validation] == [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.65)]
    for r in validation:   # each evaluation printed with its scores
        scores = ", ".join(f"{t} {r[f'eval_{t}']:.4f}" for t in ("rte", "sst2", "arc_easy"))
        assert f"validation at step {r['step']}: average {r['eval_average']:.4f} ({scores})" in out
    assert "validation at step 4: average 0.7000 (" in out and ")  (best so far)\n" in out
    assert "validation at step 6: average 0.6000 (" in out and ")  (best 0.7000 at step 4)\n" in out
    assert "selected checkpoint-4: the best validation average, 0.7000" in out

    # evaluation steps were checkpoints; save_total_limit 1 kept the best one besides the last
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 8]
    assert json.loads((run_dir / "best_checkpoint.json").read_text()) == {
        "metric": "validation eval_average", "step": 4, "score": 0.7}
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["selected"]["step"] == 4 and result["train"]["steps"] == 8
    assert json.loads((run_dir / "test_predictions.json").read_text())["checkpoint"] == "checkpoint-4"

    run = load_run(run_dir)   # the run's result by default: the selected checkpoint
    saved = load_file(str(run_dir / "checkpoint-4" / "adapter" / "adapter_model.safetensors"))
    state = run.model.adapter_state_dict()
    assert all(torch.equal(state[k].cpu(), saved[k]) for k in saved)
    last = load_file(str(run_dir / "checkpoint-8" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    again = evaluate(run, "test", batch_size=5)
    assert {t: r["score"] for t, r in again["tasks"].items()} == pytest.approx(
        {t: r["score"] for t, r in result["tasks"].items()})


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_rise(tmp_path: Path, tiny_bert: str,
                                                                              run_config, capsys,
                                                                              monkeypatch) -> None:
    _scripted_validation(monkeypatch, [0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
    run_dir = tmp_path / "run"
    config = _config(tiny_bert, run_dir, run_config, tmp_path, max_steps=20, early_stopping_patience=2)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "early stopping at step 8: the validation average has not risen for 2 evaluations (best 0.7000 at " \
           "step 4)" in out
    assert [r["step"] for r in _rows(run_dir) if r.get("split") == "validation"] == [2, 4, 6, 8]
    assert [s for s, _ in list_checkpoints(run_dir)] == [8]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["train"]["steps"] == 8 and "selected" not in result
    assert not (run_dir / "best_checkpoint.json").exists()


def test_selection_needs_validation_scores() -> None:
    for key in ("select_best", "early_stopping_patience"):
        with pytest.raises(ConfigError, match="set train.eval_steps"):
            RunConfig.from_dict({"train": {key: 3 if key == "early_stopping_patience" else True}})


def test_a_resumed_run_selects_on_the_whole_validation_curve(tmp_path: Path, tiny_bert: str, run_config,
                                                             monkeypatch) -> None:
    """Stopped after step 6 and resumed: the best (step 4, 0.7) comes from the validation rows logged before the
    stop, not only from the evaluations after the resume (which alone would pick step 8, 0.65)."""
    import shutil

    _scripted_validation(monkeypatch, [0.5, 0.7, 0.6, 0.65])
    config = _config(tiny_bert, tmp_path / "straight", run_config, tmp_path, max_steps=8, select_best=True)
    cfg = yaml.safe_load(config.read_text())
    straight = trainer_module.train(RunConfig.from_dict(cfg))
    stopped = shutil.copytree(straight, tmp_path / "stopped")
    shutil.rmtree(stopped / "checkpoint-8")
    for name in ("eval.json", "best_checkpoint.json", "test_predictions.json"):
        (stopped / name).unlink()
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(straight) if r["step"] <= 6))
    _scripted_validation(monkeypatch, [0.65])
    trainer_module.train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(stopped)}}),
                         resume=True)
    assert json.loads((stopped / "best_checkpoint.json").read_text())["step"] == 4
    assert json.loads((stopped / "eval.json").read_text())["selected"] == {
        "metric": "validation eval_average", "step": 4, "score": 0.7}
