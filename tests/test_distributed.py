"""Two processes (gloo on CPU) give the run of one process with a 2x batch: DDP through ``accelerate launch``,
FSDP (both versions) sharding a tiny LLaMA per decoder layer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import ids, tiny_llama
from safetensors.torch import load_file
from torch import nn

from morelora import MoREConfig, MoREModel, get_more_model
from morelora.config import RunConfig
from morelora.training import train

needs_launcher = pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name(
    "accelerate").exists(), reason="the accelerate launcher is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_launcher
def test_two_processes_match_one_process_with_double_batch(tmp_path: Path, tiny_bert: str, run_config) -> None:
    # heads at the adapter's rate: a multiple-choice head's bias shifts every choice alike, so its gradient is
    # round-off, which AdamW scales up to about lr per step; at the default head rate (1e-2) that noise differs
    # between two processes and one by more than the tolerance below, whatever the parallelism
    cfg = run_config(tiny_bert, tmp_path / "ddp", max_steps=6, save_steps=3, batch_size=2, head_lr=None)
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

    single_cfg = run_config(tiny_bert, tmp_path / "one", max_steps=6, save_steps=3, batch_size=4, head_lr=None)
    one = train(RunConfig.from_dict(single_cfg))

    a = load_file(str(ddp / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same data, same gradients (mean of two half-batch means), up to padding round-off
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, one)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [2, 4, 6]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-4)
    routing = [json.loads(x) for x in (ddp / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in routing] == [2, 4, 6]  # written by the main process only

    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (ddp, one))
    assert ea["tasks"].keys() == eb["tasks"].keys()
    for t in ea["tasks"]:
        assert ea["tasks"][t]["num_examples"] == eb["tasks"][t]["num_examples"]
        assert ea["tasks"][t]["metrics"] == pytest.approx(eb["tasks"][t]["metrics"])
    assert proc.stdout.count("average") == 1  # only the main process prints the summary


# ------------------------------------------------------------------------------------------------ FSDP
FSDP_TASK_IDS = torch.tensor([0, 2, 1, 1])
FSDP_LR = 0.5


def _fsdp_model() -> MoREModel:
    """The model every FSDP run starts from: tasks routed to different experts, no dropout."""
    m = get_more_model(tiny_llama(), MoREConfig(r=4, tasks=["a", "b", "c"], init_lora_weights=False,
                                                lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in m.adapter_layers():
            layer.task_embedding.copy_(torch.randn(layer.task_embedding.shape, generator=g))
    m.after_weights_changed()
    return m.train()


def _fsdp_run(model: nn.Module, inner: MoREModel, x: torch.Tensor, t: torch.Tensor, full_grads) -> dict:
    """Loss, contrastive loss, full gradients of one step, and the loss after one SGD step (this process's)."""
    out = model(input_ids=x, labels=x, task_ids=t)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "contrastive": inner.aux_losses["contrastive"].detach(), "grads": full_grads()}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=FSDP_LR).step()
    with torch.no_grad():
        res["after"] = model(input_ids=x, labels=x, task_ids=t).loss
    return res


def _fsdp_rank(rank: int, port: int, out: str) -> None:
    """One of two processes: its half of the batch under FSDP2 (`fully_shard`), then FSDP1 (`use_orig_params`),
    each decoder layer its own unit; rank 0 saves the means over the processes."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    # FSDP1 advises wrapping frozen and trainable parameters apart; irrelevant at this size
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, t = ids(4, 7)[2 * rank:2 * rank + 2], FSDP_TASK_IDS[2 * rank:2 * rank + 2]
    results = {}
    m = _fsdp_model()
    for layer in m.base_model.model.layers:
        fully_shard(layer)
    fully_shard(m)
    results["fsdp2"] = _fsdp_run(m, m, x, t, lambda: {n: p.grad.full_tensor() for n, p in m.named_parameters()
                                                      if p.requires_grad})
    m1 = _fsdp_model()
    w = FullyShardedDataParallel(m1, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                                 device_id=torch.device("cpu"))

    def fsdp1_grads() -> dict:
        with FullyShardedDataParallel.summon_full_params(w, with_grads=True):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in w.named_parameters()
                    if p.requires_grad}

    results["fsdp1"] = _fsdp_run(w, m1, x, t, fsdp1_grads)
    for r in results.values():   # gradients are already averaged over the processes; the losses are per process
        for k in ("loss", "contrastive", "after"):
            torch.distributed.all_reduce(r[k])
            r[k] /= 2
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_fsdp_sharded_per_decoder_layer_matches_one_process(tmp_path: Path) -> None:
    """Outside a unit's forward its router parameters are shards (DTensors under FSDP2, flat views under FSDP1),
    so MoRE must route inside the layers; loss, contrastive loss, gradients and the loss after one SGD step equal
    those of one process with the whole batch."""
    # fork: the processes inherit the imports (a fresh interpreter per process costs more than the test)
    torch.multiprocessing.start_processes(_fsdp_rank, args=(_free_port(), str(tmp_path / "out.pt")), nprocs=2,
                                          start_method="fork")
    got = torch.load(tmp_path / "out.pt")

    m = _fsdp_model()
    x = ids(4, 7)
    want = _fsdp_run(m, m, x, FSDP_TASK_IDS, lambda: {n: p.grad.clone() for n, p in m.named_parameters()
                                                      if p.requires_grad})
    assert any(n.endswith("task_embedding") for n in want["grads"]) and want["after"] < want["loss"]
    for kind in ("fsdp2", "fsdp1"):
        r = got[kind]
        for k in ("loss", "contrastive", "after"):
            torch.testing.assert_close(r[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{kind} {k}")
        assert r["grads"].keys() == want["grads"].keys(), kind
        for n, g in want["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=f"{kind} {n}")
