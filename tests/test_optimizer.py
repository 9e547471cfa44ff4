"""The trainer's optimizer: train.fused_adamw (only changes rounding) and train.head_lr (task heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from morelora.config import AUTO_HEAD_LR, ConfigError, RunConfig, apply_overrides
from morelora.training import train
from morelora.training.trainer import _make_optimizer


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_config_values(value):
    assert RunConfig.from_dict({"train": {"fused_adamw": value}}).train.fused_adamw == value


def test_config_default_override_and_bad_value():
    assert RunConfig.from_dict({}).train.fused_adamw == "auto"
    assert RunConfig.from_dict(apply_overrides({}, ["train.fused_adamw=false"])).train.fused_adamw is False
    with pytest.raises(ConfigError, match="train.fused_adamw"):
        RunConfig.from_dict({"train": {"fused_adamw": "sometimes"}})


@pytest.mark.parametrize("value, fused", [(True, True), (False, None), ("auto", True)])
def test_optimizer_fused_flag(value, fused):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = RunConfig.from_dict({"train": {"fused_adamw": value}})
    optimizer, _ = _make_optimizer(cfg, model, torch.device("cpu"))   # torch >= 2.4 has the CPU kernel
    assert {g["fused"] for g in optimizer.param_groups} == {fused}


def test_fused_training_equals_default_up_to_rounding(tmp_path: Path, tiny_bert: str, run_config):
    runs = {}
    for value in (False, True):
        cfg = run_config(tiny_bert, tmp_path / str(value), max_steps=8, save_steps=8, fused_adamw=value)
        cfg["tasks"] = ["sst2", "rte"]
        runs[value] = train(RunConfig.from_dict(cfg))
    a, b = (load_file(str(runs[v] / "checkpoint-8" / "adapter" / "adapter_model.safetensors")) for v in (False, True))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_head_lr_groups_and_training(tmp_path: Path, tiny_bert: str, run_config):
    from morelora.training import load_run

    cfg = run_config(tiny_bert, tmp_path / "h", max_steps=3, save_steps=3, lr=0.0, head_lr=1e-2)
    cfg["tasks"] = ["sst2", "rte"]
    run_dir = train(RunConfig.from_dict(cfg))
    run = load_run(run_dir)
    optimizer, _ = _make_optimizer(run.cfg, run.model)
    heads = {id(p) for p in run.model.base_model.heads.parameters()}
    by_lr: dict[float, set[int]] = {}
    for g in optimizer.param_groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    assert set(by_lr) == {0.0, 1e-2}
    assert by_lr[1e-2] == heads and not by_lr[0.0] & heads
    # lr 0 for the adapter: its zero-initialised B factors stay zero while the trained heads moved
    ckpt = load_file(str(run_dir / "checkpoint-3" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in ckpt.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() == 0 for v in lora_b)
    assert any(".heads." in k or k.startswith("heads.") for k in ckpt)
    # the default ("auto") puts the heads at AUTO_HEAD_LR, null at train.lr
    for head_lr, expected in (("auto", AUTO_HEAD_LR), (None, 5e-4)):
        run.cfg.train.head_lr, run.cfg.train.lr = head_lr, 5e-4
        groups = _make_optimizer(run.cfg, run.model)[0].param_groups
        assert {g["lr"] for g in groups if {id(p) for p in g["params"]} & heads} == {expected}
    assert RunConfig.from_dict({}).train.head_lr == "auto"
    # without task heads, an explicit head_lr is a config error; "auto" is not
    with pytest.raises(ConfigError, match="head_lr"):
        _make_optimizer(RunConfig.from_dict({"train": {"head_lr": 1e-3}}), torch.nn.Linear(2, 2))
    groups = _make_optimizer(RunConfig.from_dict({}), torch.nn.Linear(2, 2))[0].param_groups
    assert {g["lr"] for g in groups} == {3e-4}
    with pytest.raises(ConfigError, match="train.head_lr"):
        RunConfig.from_dict({"train": {"head_lr": "fast"}})
