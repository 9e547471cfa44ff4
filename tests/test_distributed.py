"""Two processes (``accelerate launch``, gloo on CPU) give the run of one process with a 2x batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from morelora.config import RunConfig
from morelora.training import train

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name(
    "accelerate").exists(), reason="the accelerate launcher is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_double_batch(tmp_path: Path, tiny_bert: str, run_config) -> None:
    cfg = run_config(tiny_bert, tmp_path / "ddp", max_steps=6, save_steps=3, batch_size=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    # ACCELERATE_USE_CPU: without a GPU, the launched processes join a gloo process group on the CPU
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "morelora", "train", str(tmp_path / "c.yaml")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = tmp_path / "ddp"
    state = json.loads((ddp / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["examples"] == 24
    assert (ddp / "checkpoint-6" / "random_states_1.pkl").exists()

    single_cfg = run_config(tiny_bert, tmp_path / "one", max_steps=6, save_steps=3, batch_size=4)
    one = train(RunConfig.from_dict(single_cfg))

    a = load_file(str(ddp / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same data, same gradients (mean of two half-batch means), up to padding round-off
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, one)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [2, 4, 6]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-4)

    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (ddp, one))
    assert ea["tasks"].keys() == eb["tasks"].keys()
    for t in ea["tasks"]:
        assert ea["tasks"][t]["num_examples"] == eb["tasks"][t]["num_examples"]
        assert ea["tasks"][t]["metrics"] == pytest.approx(eb["tasks"][t]["metrics"])
    assert proc.stdout.count("average") == 1  # only the main process prints the summary
