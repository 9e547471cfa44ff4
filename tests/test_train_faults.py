"""What a training run does when things go wrong (issue 38, items 1-5): a non-finite loss, a second writer of the
run folder, SIGTERM / SIGINT, a resume between logging steps, a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from morelora.cli import main
from morelora.config import RunConfig
from morelora.errors import CheckpointError
from morelora.training import load_run, train
from morelora.training import trainer as trainer_module
from morelora.training.checkpoint import LOCK_NAME, RunLock, list_checkpoints


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6, msg=k)


def _small(tiny_bert: str, out: Path, run_config, **train_options) -> dict:
    """One task, a few examples: each step takes milliseconds."""
    cfg = run_config(tiny_bert, out, **train_options)
    cfg["tasks"], cfg["data"] = ["sst2", "rte"], {"max_train_per_task": 16, "max_eval_per_task": 4}
    cfg["method"]["lora_dropout"] = 0.1   # randomness a resume must reproduce
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ non-finite loss


def test_a_non_finite_loss_stops_the_run_and_nothing_diverged_is_loaded(tmp_path: Path, tiny_bert: str, run_config,
                                                                        capsys) -> None:
    """lr 1e6 diverges within a few steps: the run stops at the first non-finite loss with one line naming the
    step and what to try, writes no eval.json, keeps every (finite) checkpoint before it; a non-finite adapter is
    refused by load_run, `morelora eval` and `morelora serve`."""
    run_dir = tmp_path / "run"
    cfg = run_config(tiny_bert, run_dir, lr=1e6, head_lr=1e6, max_steps=40, save_steps=1, logging_steps=1)
    assert main(["train", str(_write(cfg, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("morelora: error: the loss is not finite (nan / inf) at step ")
    step = int(err.split(" at step ")[1].split(":")[0])
    assert 1 < step < 40
    assert f"(the last good checkpoint, checkpoint-{step - 1}, is kept)" in err
    assert "train again with a lower train.lr (now 1000000.0, train.head_lr 1000000.0)" in err
    assert "train.max_grad_norm (now 1.0)" in err
    assert not (run_dir / "eval.json").exists() and not (run_dir / LOCK_NAME).exists()
    assert [s for s, _ in list_checkpoints(run_dir)] == list(range(1, step))
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, step))
    for _, path in list_checkpoints(run_dir):
        assert all(torch.isfinite(v).all() for v in _adapter(path).values()), path
    assert load_run(run_dir).cfg.train.lr == 1e6   # the last good checkpoint loads

    # an adapter with nan in it (a run of an older version, or a damaged file) is refused everywhere
    last = list_checkpoints(run_dir)[-1][1]
    weights = _adapter(last)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(last / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds non-finite values \(nan / inf\) in 1 of \d+ adapter tensors"):
        load_run(run_dir)
    capsys.readouterr()
    for argv in (["eval", str(run_dir)], ["serve", str(run_dir), "--port", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"morelora: error: {last} holds non-finite values (nan / inf) in 1 of "), argv
        assert err.endswith("the run diverged; use an earlier checkpoint (--checkpoint) or train again with a "
                            "lower train.lr / train.head_lr"), argv


# ------------------------------------------------------------------------------------------ run folder lock


_HOLD = """
import sys, time
from pathlib import Path
from morelora.training.checkpoint import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, tiny_bert: str, run_config, capsys) -> None:
    run_dir = tmp_path / "run"
    cfg = _small(tiny_bert, run_dir, run_config, max_steps=2, save_steps=0)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            assert main(["train", str(_write(cfg, tmp_path / "c.yaml")), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"morelora: error: run folder {run_dir} is in use by pid {holder.pid} on host "
                                  f"{socket.gethostname()} (since ")
            assert err.endswith(f"(lock file {run_dir / LOCK_NAME}); wait for that run to end, or choose another "
                                "--output-dir")
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]   # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path, tiny_bert: str, run_config,
                                                                     capsys) -> None:
    run_dir = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    dead.send_signal(signal.SIGKILL)   # killed holding it: the file stays, the flock goes with the process
    dead.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == dead.pid
    cfg = _small(tiny_bert, run_dir, run_config, max_steps=2, save_steps=0)
    assert main(["train", str(_write(cfg, tmp_path / "c.yaml"))]) == 0
    out = capsys.readouterr().out
    assert (f"warning: {run_dir} was locked by pid {dead.pid} on host {socket.gethostname()} (since "
            in out) and "which is no longer running (killed?): taking the lock over" in out
    assert (run_dir / "eval.json").is_file() and not (run_dir / LOCK_NAME).exists()
    # the lock is released at the end: the next writer takes it without a word
    lock = RunLock.acquire(run_dir)
    assert lock.took_over is None
    lock.release()


# ------------------------------------------------------------------------------------------ signals, resume


def test_sigterm_checkpoints_the_current_step_and_resume_equals_the_uninterrupted_run(tmp_path: Path,
                                                                                      tiny_bert: str, run_config,
                                                                                      capsys) -> None:
    """Two `morelora train` into one folder: the second is refused naming the first; SIGTERM (preemption) with the
    default save_steps 0: a checkpoint at the current step, exit 143 with a message; --resume then gives the
    adapter, metrics rows and eval.json counts of an uninterrupted run."""
    cfg = _small(tiny_bert, tmp_path / "unused", run_config, max_steps=150, save_steps=0, logging_steps=7)
    config = _write(cfg, tmp_path / "c.yaml")
    stopped = tmp_path / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "morelora", "train", str(config), "--output-dir",
                                  str(stopped)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (stopped / LOCK_NAME).is_file() or not (stopped / LOCK_NAME).read_text():
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.02)
    assert main(["train", str(config), "--output-dir", str(stopped)]) == 2
    assert f"is in use by pid {first.pid} on host" in capsys.readouterr().err
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143
    log = (tmp_path / "first.log").read_text()
    assert "morelora: SIGTERM received: stopping after this step with a checkpoint" in log
    (step, path), = list_checkpoints(stopped)
    assert 0 < step < 150, log[-2000:]
    assert f"morelora: stopped by SIGTERM at step {step}: {path} saved; continue the run with the same command " \
           "and --resume" in log
    assert not (stopped / "eval.json").exists() and not (stopped / LOCK_NAME).exists()

    assert main(["train", str(config), "--output-dir", str(stopped), "--resume"]) == 0
    assert f"resumed from {path} (step {step})" in capsys.readouterr().out
    straight = train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / "s")}}))
    _same_adapter(stopped / "checkpoint-150", straight / "checkpoint-150")
    assert _without_timing(_rows(stopped)) == _without_timing(_rows(straight))
    a, b = (json.loads((d / "eval.json").read_text()) for d in (stopped, straight))
    assert a["train"]["examples"] == b["train"]["examples"] == 150 * 4
    assert a["tasks"] == b["tasks"]


def test_sigint_between_logging_steps_resumes_to_the_same_rows_and_examples(tmp_path: Path, tiny_bert: str,
                                                                            run_config, capsys, monkeypatch) -> None:
    """Ctrl-C after step 3 (logging every 2 steps, checkpoints every 4): checkpoint-3 holds the half-full logging
    window, exit 130; --resume writes the rows and train.examples of the run that was never stopped."""
    cfg = _small(tiny_bert, tmp_path / "unused", run_config, max_steps=8, save_steps=4, logging_steps=2)
    config = _write(cfg, tmp_path / "c.yaml")
    straight = train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / "s")}}))
    real_step = trainer_module._train_step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[6] == 2:   # the third step (0-based index 2): Ctrl-C arrives while it runs
            os.kill(os.getpid(), signal.SIGINT)
        return out

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(trainer_module, "_train_step", step)
    capsys.readouterr()
    assert main(["train", str(config), "--output-dir", str(stopped)]) == 130
    err = capsys.readouterr().err
    assert "morelora: SIGINT received: stopping after this step with a checkpoint (send it again to stop at once)" \
        in err
    assert err.strip().splitlines()[-1] == (f"morelora: stopped by SIGINT at step 3: {stopped / 'checkpoint-3'} saved; "
                                            "continue the run with the same command and --resume")
    assert [s for s, _ in list_checkpoints(stopped)] == [3]
    window = json.loads((stopped / "checkpoint-3" / "trainer_state.json").read_text())["window"]
    assert window["count"] == 1 and window["examples"] == 4 and set(window["sums"]) >= {"loss", "task_loss"}
    monkeypatch.setattr(trainer_module, "_train_step", real_step)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored

    assert main(["train", str(config), "--output-dir", str(stopped), "--resume"]) == 0
    _same_adapter(stopped / "checkpoint-8", straight / "checkpoint-8")
    assert _without_timing(_rows(stopped)) == _without_timing(_rows(straight))
    a, b = (json.loads((d / "eval.json").read_text()) for d in (stopped, straight))
    assert a["train"]["examples"] == b["train"]["examples"] == 32


def test_resume_from_a_checkpoint_between_logging_steps_counts_every_example(tmp_path: Path, tiny_bert: str,
                                                                           run_config, capsys) -> None:
    """Checkpoints every 3 steps, log rows every 2: resumed from checkpoint-3, the rows of steps 4 and 6 and
    train.examples (24) are those of the uninterrupted run (before: 20 examples, other losses). A run folder with
    no checkpoint says so when resumed."""
    cfg = _small(tiny_bert, tmp_path / "s", run_config, max_steps=6, save_steps=3, logging_steps=2)
    straight = train(RunConfig.from_dict(cfg))
    for name, keep in (("at3", 3), ("none", 0)):
        copy = shutil.copytree(straight, tmp_path / name)
        for step in {3, 6} - {keep}:
            shutil.rmtree(copy / f"checkpoint-{step}")
        (copy / "eval.json").unlink()
        (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(straight)
                                                    if r["step"] <= keep))
        capsys.readouterr()
        train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(copy)}}), resume=True)
        out = capsys.readouterr().out
        if not keep:
            assert (f"resume: {copy} has no complete checkpoint (the run stopped before its first one): starting "
                    "again from step 0") in out
        _same_adapter(copy / "checkpoint-6", straight / "checkpoint-6")
        assert _without_timing(_rows(copy)) == _without_timing(_rows(straight)), name
        assert json.loads((copy / "eval.json").read_text())["train"]["examples"] == 24, name


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 809408 "
                                                "vs 809296")], ids=["ENOSPC", "torch-writer"])
def test_a_full_disk_is_one_line_and_keeps_the_older_checkpoints(tmp_path: Path, tiny_bert: str, run_config,
                                                                  capsys, monkeypatch, error: Exception) -> None:
    from accelerate import Accelerator

    run_dir = tmp_path / "run"
    cfg = _small(tiny_bert, run_dir, run_config, max_steps=6, save_steps=2, logging_steps=2)
    real_save = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if str(output_dir).endswith("checkpoint-4.tmp"):   # the disk fills up while checkpoint-4 is written
            (Path(output_dir) / "optimizer.bin").write_bytes(b"\0" * 1000)
            raise error
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    config = _write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    size = sum(f.stat().st_size for f in (run_dir / "checkpoint-2").rglob("*") if f.is_file())
    assert err.startswith(f"morelora: error: no space left on the disk of {run_dir} for checkpoint-4: it needs about "
                          f"{size / 2**20:.1f} MB, ")
    assert err.endswith(" free; the partial checkpoint was removed and the older checkpoint-2 is kept; free some "
                        "space (or lower train.save_total_limit) and continue with --resume")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (run_dir / "eval.json").exists() and not (run_dir / LOCK_NAME).exists()

    monkeypatch.setattr(Accelerator, "save_state", real_save)   # space freed: the run continues
    assert main(["train", str(config), "--resume"]) == 0
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4, 6] and (run_dir / "eval.json").is_file()
