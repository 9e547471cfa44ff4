"""train.fused_adamw: the config switch, what the trainer builds, and that fused AdamW only changes rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from morelora.config import ConfigError, RunConfig, apply_overrides
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
