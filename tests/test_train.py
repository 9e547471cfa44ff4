"""End-to-end training on tiny random models: run folder, eval.json, checkpoints, kill -9 resume."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import morelora
from morelora.config import RunConfig
from morelora.training import evaluate, latest_checkpoint, load_run, train
from morelora.training.checkpoint import checkpoint_step, list_checkpoints


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, tiny_bert) -> Path:
    from conftest import tiny_run_config

    out = tmp_path_factory.mktemp("runs") / "enc"
    cfg = tiny_run_config(tiny_bert, out, eval_steps=3)
    cfg["method"]["lora_dropout"] = 0.1
    return train(RunConfig.from_dict(cfg))


def test_run_folder_and_eval_json(encoder_run: Path) -> None:
    result = json.loads((encoder_run / "eval.json").read_text())
    assert result["split"] == "test" and set(result["tasks"]) == {"rte", "sst2", "arc_easy"}
    for r in result["tasks"].values():
        assert r["main_metric"] == "accuracy" and r["score"] == r["metrics"]["accuracy"]
        assert 0.0 <= r["score"] <= 1.0 and 0.0 < r["reference_score"] <= 1.0
        assert r["num_examples"] == 16
        gap = r["vs_reference"]
        assert gap["diff"] == pytest.approx(r["score"] - r["reference_score"]) and 0 < gap["p"] <= 1
        assert gap["low"] <= gap["high"]
    assert result["tasks"]["arc_easy"]["reference_score"] < 0.3  # chance over 3-5 choices
    assert result["average"] == pytest.approx(sum(r["score"] for r in result["tasks"].values()) / 3)
    params = result["parameters"]
    assert 0 < params["trainable"] < params["total"] and params["per_task"] > 0
    assert result["train"]["steps"] == 6 and result["train"]["examples"] == 24
    assert result["train"]["train_time_s"] > 0

    saved = yaml.safe_load((encoder_run / "config.yaml").read_text())
    assert saved["train"]["output_dir"] == str(encoder_run) and saved["method"]["r"] == 4

    # the code the run trained with: this checkout's commit, as git reports it
    src = Path(morelora.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    rows = [json.loads(line) for line in (encoder_run / "provenance.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in rows] == [("start", 0)]
    assert rows[0]["torch"] == torch.__version__ and result["code"]["morelora"] == morelora.__version__
    assert rows[0]["host"] == socket.gethostname()
    boot = Path("/proc/sys/kernel/random/boot_id")
    assert rows[0]["boot"] == (boot.read_text().strip() if boot.is_file() else None)
    if head.returncode == 0:
        assert rows[0]["commit"] == result["code"]["commit"] == head.stdout.strip()

    rows = _rows(encoder_run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"loss", "task_loss", "contrastive", "lr", "examples_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["examples_per_s"] > 0
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.1 * r["contrastive"], rel=1e-4)
    assert train_rows[-1]["lr"] == 0.0
    evals = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in evals] == [3, 6] and "eval_rte" in evals[0]

    assert [s for s, _ in list_checkpoints(encoder_run)] == [3, 6]
    assert [checkpoint_step(n) for n in ("checkpoint-6", "checkpoint-10", "checkpoint-6.tmp", "checkpoint-")] == \
        [6, 10, None, None]
    ckpt = latest_checkpoint(encoder_run)
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
            "trainer_state.json"} <= names
    assert not any(n.startswith("model") for n in names)  # no copy of the frozen base model
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6


def test_evaluate_from_run_folder_matches(encoder_run: Path) -> None:
    run = load_run(encoder_run)
    again = evaluate(run, "test", batch_size=5)  # other batch boundaries, same predictions
    saved = json.loads((encoder_run / "eval.json").read_text())
    assert {t: r["score"] for t, r in again["tasks"].items()} == pytest.approx(
        {t: r["score"] for t, r in saved["tasks"].items()})
    # the last validation row of the curve was made with the final weights (and fresh routing), after an
    # earlier evaluation at step 3
    last = [r for r in _rows(encoder_run) if r.get("split") == "validation"][-1]
    val = evaluate(run, "validation", batch_size=5)
    assert last["step"] == 6
    assert {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_") and k != "eval_average"} \
        == pytest.approx({t: r["score"] for t, r in val["tasks"].items()})


def test_incomplete_checkpoints_are_ignored(encoder_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(encoder_run, run_dir)
    shutil.copytree(run_dir / "checkpoint-6", run_dir / "checkpoint-9.tmp")
    (run_dir / "checkpoint-12").mkdir()  # no trainer_state.json, no adapter
    shutil.copytree(run_dir / "checkpoint-6" / "adapter", run_dir / "checkpoint-15" / "adapter")
    assert latest_checkpoint(run_dir).name == "checkpoint-6"


# ------------------------------------------------------------------------------------------ routing.jsonl


def _routing(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "routing.jsonl").read_text().splitlines()]


def _routing_config(tiny_bert: str, out: Path, run_config) -> dict:
    """6 steps logged every step, checkpoints at 2, 4, 6, dropout on (a consumer of the RNG stream); near-zero
    router logits, so that the routing moves within the 6 steps."""
    cfg = run_config(tiny_bert, out, logging_steps=1, save_steps=2, lr=2e-2)
    cfg["tasks"] = ["rte", "sst2"]
    cfg["data"] = {"max_train_per_task": 16, "max_eval_per_task": 4}
    cfg["method"].update(lora_dropout=0.1, use_task_embeddings=False, task_embedding_std=1e-3)
    return cfg


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, tiny_bert) -> Path:
    from conftest import tiny_run_config

    return train(RunConfig.from_dict(_routing_config(tiny_bert, tmp_path_factory.mktemp("routed") / "r",
                                                     tiny_run_config)))


def test_routing_log_has_a_row_per_logging_step_ending_at_the_final_ranks(routed_run: Path) -> None:
    from morelora.analysis import load_trained_model

    rows = _routing(routed_run)
    assert [r["step"] for r in rows] == [r["step"] for r in _rows(routed_run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    model = load_trained_model(routed_run).model   # from checkpoint-6, not from the log
    assert all(set(r) == {"step", "task_ranks"} and list(r["task_ranks"]) == ["rte", "sst2"] for r in rows)
    assert all(list(r["task_ranks"]["rte"]) == list(model.adapted_names) for r in rows)
    assert rows[-1]["task_ranks"] == model.task_ranks()
    assert rows[0]["task_ranks"] != rows[-1]["task_ranks"]   # the routing moved: the last row is not the first


def test_routing_log_does_not_change_training(routed_run: Path, tmp_path: Path, tiny_bert: str, run_config,
                                              monkeypatch) -> None:
    from morelora.tuners.more import MoREModel

    monkeypatch.setattr(MoREModel, "routing_state", lambda self: None)
    silent = train(RunConfig.from_dict(_routing_config(tiny_bert, tmp_path / "silent", run_config)))
    assert not (silent / "routing.jsonl").exists()
    for step in (2, 4, 6):
        a, b = _adapter(routed_run / f"checkpoint-{step}"), _adapter(silent / f"checkpoint-{step}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    losses = [[r["loss"] for r in _rows(d) if "loss" in r] for d in (routed_run, silent)]
    assert losses[0] == losses[1]


def test_resume_truncates_the_routing_log(routed_run: Path, tmp_path: Path, tiny_bert: str, run_config) -> None:
    """A run killed after step 5 (checkpoints 2 and 4 kept, a row cut short) resumes from step 4: routing.jsonl
    holds each step once, as the uninterrupted run wrote it; killed before its first checkpoint, it starts over."""
    import shutil

    cfg = _routing_config(tiny_bert, tmp_path / "unused", run_config)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    for name, kept in (("killed", [2, 4]), ("early", [])):
        killed = shutil.copytree(routed_run, tmp_path / name)
        for step in {2, 4, 6} - set(kept):
            shutil.rmtree(killed / f"checkpoint-{step}")
        (killed / "eval.json").unlink()
        with open(killed / "routing.jsonl", "a") as f:
            f.write('{"step": 7, "task_ranks": {"rte"')     # the kill cut this row
        run = train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(killed)}}), resume=True)
        assert [r["step"] for r in _routing(run)] == [1, 2, 3, 4, 5, 6], name
        assert _routing(run) == _routing(routed_run), name


def test_resume_at_an_evaluation_step_runs_its_missing_evaluation(encoder_run: Path, tmp_path: Path,
                                                                   tiny_bert: str) -> None:
    """Stopped after the checkpoint of an evaluation step and before its evaluation (a run parked at its last
    step): the resumed run evaluates that step, to the score the unstopped run logged, and no step twice."""
    import shutil

    from conftest import tiny_run_config

    rows = _rows(encoder_run)
    validation = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in validation] == [3, 6]
    for name, step, drop in (("at3", 3, True), ("at6", 6, True), ("logged", 6, False)):
        killed = shutil.copytree(encoder_run, tmp_path / name)
        kept = [r for r in rows if r["step"] < step or (r["step"] == step and not (drop and "eval_average" in r))]
        (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        if step == 3:
            shutil.rmtree(killed / "checkpoint-6")
        (killed / "eval.json").unlink()
        cfg = tiny_run_config(tiny_bert, killed, eval_steps=3)
        cfg["method"]["lora_dropout"] = 0.1
        train(RunConfig.from_dict(cfg), resume=True)
        got = [r for r in _rows(killed) if r.get("split") == "validation"]
        assert [r["step"] for r in got] == [3, 6], name
        for a, b in zip(got, validation):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), name
        assert (killed / "eval.json").is_file()


def test_methods_without_routing_write_no_routing_log(tmp_path: Path, tiny_bert: str, run_config) -> None:
    cfg = run_config(tiny_bert, tmp_path / "lora", max_steps=2, logging_steps=1, save_steps=0)
    cfg["tasks"], cfg["data"]["max_eval_per_task"] = ["sst2"], 4
    cfg["method"] = {"name": "lora", "r": 4}
    run_dir = train(RunConfig.from_dict(cfg))
    assert [r["step"] for r in _rows(run_dir) if "loss" in r] == [1, 2]
    assert not (run_dir / "routing.jsonl").exists()


def test_save_total_limit_prunes(tmp_path: Path, tiny_bert: str, run_config) -> None:
    cfg = run_config(tiny_bert, tmp_path / "r", max_steps=4, save_steps=1, save_total_limit=2)
    cfg["tasks"] = ["sst2"]
    run_dir = train(RunConfig.from_dict(cfg))
    assert [s for s, _ in list_checkpoints(run_dir)] == [3, 4]
    assert not list(run_dir.glob("*.tmp"))


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m morelora ARGS`` in the background, output to ``log`` (a pipe could fill and block it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "morelora", *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path: Path, tiny_bert: str, run_config) -> None:
    cfg = run_config(tiny_bert, tmp_path / "unused", max_steps=150, save_steps=10, logging_steps=5)
    cfg["method"]["lora_dropout"] = 0.1  # randomness that the resumed RNG state must reproduce
    cfg["data"]["max_train_per_task"] = 20  # several epochs per task: the sampler state matters
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))

    killed = tmp_path / "killed"
    proc = _launch(["train", str(tmp_path / "c.yaml"), "--output-dir", str(killed)], tmp_path / "1.log")
    deadline = time.time() + 120
    while not list_checkpoints(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = list_checkpoints(killed)
    assert first and first[-1][0] < 150, "the run was not killed before its end"
    assert not (killed / "eval.json").exists()

    resumed = _launch(["train", str(tmp_path / "c.yaml"), "--output-dir", str(killed), "--resume"],
                      tmp_path / "2.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "2.log").read_text()[-3000:]
    assert f"resumed from {killed / 'checkpoint-'}" in (tmp_path / "2.log").read_text()
    rows = [json.loads(line) for line in (killed / "provenance.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["start", "resume"] and rows[1]["step"] == first[-1][0]

    straight = tmp_path / "straight"
    ref = _launch(["train", str(tmp_path / "c.yaml"), "--output-dir", str(straight)], tmp_path / "3.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "3.log").read_text()[-3000:]

    a, b = _adapter(killed / "checkpoint-150"), _adapter(straight / "checkpoint-150")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = _rows(killed), _rows(straight)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(5, 151, 5))
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)
    assert [r["step"] for r in _routing(killed)] == list(range(5, 151, 5))   # each logging step once
    assert _routing(killed) == _routing(straight)
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (killed, straight))
    assert {t: r["score"] for t, r in ea["tasks"].items()} == {t: r["score"] for t, r in eb["tasks"].items()}


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, tiny_bert: str, run_config, capsys) -> None:
    """A damaged newest checkpoint: --resume warns and continues from the newest one that loads, to the result
    of an uninterrupted run; --checkpoint names one (a damaged one is a one-line error)."""
    import shutil

    from morelora.cli import main

    cfg = run_config(tiny_bert, tmp_path / "straight", max_steps=6, save_steps=2)
    cfg["method"]["lora_dropout"] = 0.1  # randomness that the resumed RNG state must reproduce
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    straight = train(RunConfig.from_dict(cfg))
    broken = shutil.copytree(straight, tmp_path / "broken")
    shutil.rmtree(broken / "checkpoint-6")
    (broken / "eval.json").unlink()
    (broken / "checkpoint-4" / "adapter" / "adapter_model.safetensors").write_bytes(b"cut short by a full disk")
    capsys.readouterr()

    argv = ["train", str(tmp_path / "c.yaml"), "--output-dir", str(broken)]
    assert main([*argv, "--checkpoint", str(broken / "checkpoint-4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bars
    assert err.startswith(f"morelora: error: cannot resume from {broken / 'checkpoint-4'} (")
    assert err.endswith("); choose another --checkpoint")

    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"warning: cannot load {broken / 'checkpoint-4'} (" in out
    assert f"resumed from {broken / 'checkpoint-2'} (step 2)" in out
    a, b = _adapter(broken / "checkpoint-6"), _adapter(straight / "checkpoint-6")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)

    chosen = shutil.copytree(straight, tmp_path / "chosen")
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(chosen), "--checkpoint",
                 str(chosen / "checkpoint-2")]) == 0
    assert f"resumed from {chosen / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    a = _adapter(chosen / "checkpoint-6")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("model_fixture", ["tiny_t5", "tiny_llama"])
def test_text_to_text_models(request, tmp_path: Path, model_fixture: str, run_config) -> None:
    path = request.getfixturevalue(model_fixture)
    cfg = run_config(path, tmp_path / "r", max_steps=4, save_steps=0)
    cfg["tasks"] = ["sst2", "arc_easy"]
    cfg["data"]["max_eval_per_task"] = 6
    cfg["method"]["target_modules"] = ["q", "v"] if model_fixture == "tiny_t5" else ["q_proj", "v_proj"]
    run_dir = train(RunConfig.from_dict(cfg))
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result["tasks"]) == {"sst2", "arc_easy"}
    assert all(r["num_examples"] == 6 and 0.0 <= r["score"] <= 1.0 for r in result["tasks"].values())
    assert all(math.isfinite(r["loss"]) for r in _rows(run_dir))
    kind = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["kind"]
    assert kind == "auto"
    run = load_run(run_dir)
    assert run.kind == ("seq2seq" if model_fixture == "tiny_t5" else "causal")


def test_siamese_encoding_trains_evaluates_and_reloads(tmp_path: Path, tiny_bert: str, run_config) -> None:
    cfg = run_config(tiny_bert, tmp_path / "siam", max_steps=4, save_steps=2)
    cfg["model"].update(pooling="mean", encoding="siamese")
    cfg["data"]["mixed_batches"] = True  # single texts, pairs and choices in one batch
    run_dir = train(RunConfig.from_dict(cfg))
    saved = json.loads((run_dir / "eval.json").read_text())
    run = load_run(run_dir)
    heads = run.model.base_model.heads
    hidden = run.model.base_model.config.hidden_size
    assert [h.in_features for h in heads] == [4 * hidden + 1] * 3
    again = evaluate(run, "test", batch_size=5)
    assert {t: r["score"] for t, r in again["tasks"].items()} == pytest.approx(
        {t: r["score"] for t, r in saved["tasks"].items()})
    # the trained heads moved away from their initialisation (the cosine start of the choice head included)
    arc = heads[run.specs.index(next(s for s in run.specs if s.name == "arc_easy"))]
    assert arc.weight[0, :-1].abs().sum() > 0


def _separable_sentiment(path: Path) -> Path:
    """240 train / 80 test one-sentence reviews whose label is given by one word (terrible / wonderful)."""
    import random

    rng = random.Random(0)
    filler = "the a film story plot actor scene music ending dialogue pace cast camera light".split()
    rows = []
    for i in range(320):
        words = rng.sample(filler, 5)
        words.insert(rng.randrange(6), ("terrible", "wonderful")[i % 2])
        rows.append({"text": " ".join(words), "label": i % 2, "split": "train" if i < 240 else "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("encoding", "pooling"), [("cross", "cls"), ("cross", "mean"), ("siamese", "cls"),
                                                   ("siamese", "mean")])
def test_defaults_learn_a_separable_task_in_every_setup(tmp_path: Path, encoding: str, pooling: str) -> None:
    """The default optimiser settings (only steps and batch size set) fit a trivially separable task on MiniLM.

    With the task heads at the adapter's rate (the old default) cls pooling stays at the majority class."""
    cfg = {"model": {"name_or_path": "minilm", "max_length": 12, "pooling": pooling, "encoding": encoding},
           "task_files": {"toy": {"path": str(_separable_sentiment(tmp_path / "toy.jsonl")),
                                  "kind": "classification"}},
           "train": {"output_dir": str(tmp_path / "run"), "batch_size": 16, "max_steps": 40, "logging_steps": 40}}
    result = json.loads((train(RunConfig.from_dict(cfg)) / "eval.json").read_text())["tasks"]["toy"]
    assert result["num_examples"] == 80 and result["reference_score"] == 0.5
    assert result["score"] >= 0.95, result["score"]
