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


# ------------------------------------------------------------------------------------------- train.lr_ratios
ROUTER = r"\.(task_embedding|gate\.(weight|bias)|router_logits)$"


def _groups(optimizer) -> list[tuple[float, float, set[int]]]:
    return [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]


def test_lr_ratios_scale_the_named_parameters_first_adam_step(tmp_path: Path, tiny_bert: str, run_config):
    """The router (found through the modules, not the names) trains at 10x, the heads at head_lr x 1; one AdamW
    step from zero state moves each parameter by lr x ratio (Adam's first step is lr * g / (|g| + eps))."""
    from morelora.training import build_run

    cfg = run_config(tiny_bert, tmp_path / "r", lr=1e-3, head_lr=5e-3, weight_decay=0.0, warmup_steps=0,
                     lr_ratios={ROUTER: 10})
    run = build_run(RunConfig.from_dict(cfg))
    model = run.model
    router = {id(p) for m in model.modules() if hasattr(m, "gate") and hasattr(m, "task_embedding")
              for p in (m.gate.weight, m.gate.bias, m.task_embedding)}
    heads = {id(p) for p in model.base_model.heads.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "task_embedding")]
    assert heads and len(layers) == 4 and len(router) == 3 * 4   # query, value x 2 layers
    optimizer, _ = _make_optimizer(run.cfg, model)
    rate = {i: lr for lr, _, ids in _groups(optimizer) for i in ids}
    assert set(rate) == {id(p) for p in trainable}
    for p in trainable:
        expected = 5e-3 if id(p) in heads else 1e-2 if id(p) in router else 1e-3
        assert rate[id(p)] == pytest.approx(expected)
    before = {id(p): p.detach().clone() for p in trainable}
    torch.manual_seed(0)
    for p in trainable:
        p.grad = torch.randn_like(p) + 0.5 * torch.sign(torch.randn_like(p))   # |g| >> eps
    optimizer.step()
    for p in trainable:
        torch.testing.assert_close((p.detach() - before[id(p)]).abs(), torch.full_like(p, rate[id(p)]),
                                   rtol=1e-4, atol=0)


def test_without_lr_ratios_the_groups_are_the_earlier_layout(tmp_path: Path, tiny_bert: str, run_config):
    """No lr_ratios: the four groups of every earlier version, in order (adapter matrices, adapter vectors, head
    matrices, head vectors), so that the optimizer states of earlier checkpoints resume."""
    from morelora.training import build_run

    run = build_run(RunConfig.from_dict(run_config(tiny_bert, tmp_path / "d", head_lr=1e-2, weight_decay=0.05)))
    heads = {id(p) for p in run.model.base_model.heads.parameters()}
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    expected = [(lr, decay, {id(p) for p in trainable if (id(p) in heads) == head and (p.ndim >= 2) == matrix})
                for lr, head in ((1e-3, False), (1e-2, True)) for decay, matrix in ((0.05, True), (0.0, False))]
    assert _groups(_make_optimizer(run.cfg, run.model)[0]) == expected
    # a ratio of 1 names parameters but changes nothing: the same groups, the same members
    run.cfg.train.lr_ratios = {"lora_B": 1}
    assert _groups(_make_optimizer(run.cfg, run.model)[0]) == expected


def test_lr_ratios_in_a_run_and_bad_values(tmp_path: Path, tiny_bert: str, run_config, capsys):
    """Through `train`: a ratio of 0 keeps the named parameters at their start (lora_B stays 0), and the config
    (YAML / override) and its errors name the key and what to do."""
    from morelora.cli import main as cli_main

    cfg = run_config(tiny_bert, tmp_path / "z", max_steps=3, save_steps=3)
    cfg["train"]["lr_ratios"] = {"lora_B": 0.0}
    run_dir = train(RunConfig.from_dict(cfg))
    ckpt = load_file(str(run_dir / "checkpoint-3" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() == 0 for k, v in ckpt.items() if "lora_B" in k)
    assert any(v.abs().max() > 0 for k, v in ckpt.items() if "heads" in k)
    raw = apply_overrides({}, ["train.lr_ratios={lora_B: 16, 'gate\\.': 2}"])
    assert RunConfig.from_dict(raw).train.lr_ratios == {"lora_B": 16.0, "gate\\.": 2.0}
    with pytest.raises(ConfigError, match=r"train.lr_ratios: '\(' is not a regular expression"):
        RunConfig.from_dict({"train": {"lr_ratios": {"(": 2}}})
    with pytest.raises(ConfigError, match="expected a ratio >= 0"):
        RunConfig.from_dict({"train": {"lr_ratios": {"lora_B": -1}}})
    with pytest.raises(ConfigError, match="train.lr_ratios.lora_B: expected float"):
        RunConfig.from_dict({"train": {"lr_ratios": {"lora_B": "fast"}}})
    bad = run_config(tiny_bert, tmp_path / "typo", max_steps=1)
    bad["train"]["lr_ratios"] = {"lora_C": 2}
    (tmp_path / "typo.yaml").write_text(__import__("yaml").safe_dump(bad))
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "typo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.lr_ratios: 'lora_C' matches no trainable parameter" in err and "fix the pattern" in err
