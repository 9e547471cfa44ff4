"""train.report_to (issue 37, item 4): the metrics rows reach TensorBoard, W&B (offline) and MLflow (its local
SQLite store) through accelerate's trackers, with the values metrics.jsonl holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from morelora.cli import main
from morelora.config import ConfigError, RunConfig
from morelora.training import train


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tiny_bert: str, out: Path, run_config, report_to: list[str] | None) -> Path:
    cfg = run_config(tiny_bert, out, max_steps=4, logging_steps=2, save_steps=0, eval_steps=4, report_to=report_to)
    cfg["tasks"], cfg["data"] = ["sst2", "rte"], {"max_train_per_task": 8, "max_eval_per_task": 4}
    return train(RunConfig.from_dict(cfg))


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of metrics.jsonl (validation rows included)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in _rows(run_dir):
        for k, v in row.items():
            if k not in ("step", "split"):
                out.setdefault(k, []).append((row["step"], v))
    return out


def test_tensorboard_gets_every_metric_of_metrics_jsonl(tmp_path: Path, tiny_bert: str, run_config) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tiny_bert, tmp_path / "tb", run_config, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    expected = _expected(run_dir)
    assert {"loss", "task_loss", "contrastive", "lr", "eval_average", "eval_sst2"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-*.wandb`` file: wandb's LevelDB-style log (a 7-byte file
    header, 32 KiB blocks of chunks with a 7-byte header: crc, length, type; types 1 / 4 end a record)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, current = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        current += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(current)
            records.append(record)
            current = b""
    return records


def test_wandb_offline_run_holds_every_metric_and_the_config(tmp_path: Path, tiny_bert: str, run_config,
                                                             monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _run(tiny_bert, tmp_path / "wb", run_config, ["wandb"])
    (log,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = _wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("morelora", "wb")
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["train.lr"] == 1e-3 and config["method.name"] == "more" and config["train.max_steps"] == 4
    got: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in item.items():
                if not k.startswith("_"):
                    got.setdefault(k, []).append((r.history.step.num, v))
    expected = _expected(run_dir)
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_mlflow_local_store_holds_every_metric(tmp_path: Path, tiny_bert: str, run_config, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _run(tiny_bert, tmp_path / "ml", run_config, ["mlflow"])
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "morelora"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ml" and run.data.params["train.max_steps"] == "4"
    for tag, points in _expected(run_dir).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_report_to_errors_are_one_line(tmp_path: Path, tiny_bert: str, run_config, capsys, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'neptune'; choose from tensorboard, "
                                          "wandb, mlflow"):
        RunConfig.from_dict({"train": {"report_to": ["neptune"]}})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = run_config(tiny_bert, tmp_path / "r", report_to=["wandb"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "morelora: error: train.report_to: wandb is not installed (pip install wandb), or remove it from "
        "train.report_to")
    assert not (tmp_path / "r" / "config.yaml").exists()
