"""A quantised frozen base (bitsandbytes 4-bit / 8-bit, CPU backend): every method wraps the packed layers as it
wraps float ones. Reference: the same method on a float copy of the base whose weights are the dequantised ones
(PEFT's `dequantize_bnb_weight`), so the two must agree to float rounding, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import ids, nontrivial_options, tiny_llama
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn
from transformers import AutoModelForCausalLM

import morelora
from morelora import MoreLoraError
from morelora.config import ConfigError, QuantizationConfig, load_config
from morelora.quantization import bnb_config, is_quantized, prepare_quantized

TASKS = ["a", "b", "c"]
METHODS = list(morelora.METHODS)
opts = nontrivial_options


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A 64-wide tiny LLaMA folder (64: one 4-bit quantisation block per row)."""
    path = tmp_path_factory.mktemp("llama64")
    tiny_llama(hidden=64, intermediate=128).save_pretrained(path)
    return str(path)


def load_quantized(path: str, bits: int) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig(bits=bits)))
    return prepare_quantized(model, path)


def dequantized_copy(quantized: nn.Module, path: str) -> nn.Module:
    """The float model whose every linear weight is the dequantised packed one (the reference)."""
    ref = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, nn.Linear) and is_quantized(m):
                w = dequantize_bnb_weight(m.weight, getattr(m, "state", None)).float()
                ref.get_submodule(name).weight.copy_(w)
    return ref


def adapter_grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_on_a_4bit_base_like_on_its_dequantised_float_copy(name, llama_dir, tmp_path):
    q = load_quantized(llama_dir, 4)
    ref = dequantized_copy(q, llama_dir)
    torch.manual_seed(0)
    mq = morelora.build_method(name, q, TASKS, **opts(name)).train()
    assert all(isinstance(layer.base_layer if hasattr(layer, "base_layer") else layer.get_base_layer(), nn.Linear)
               and is_quantized(layer.base_layer if hasattr(layer, "base_layer") else layer.get_base_layer())
               for _, layer in mq.adapter_layers()), "every adapted layer wraps a packed bnb layer"
    mq.save_pretrained(tmp_path / "adapter")                      # the 4-bit run's adapter, loaded on the float copy
    mr = type(mq).from_pretrained(ref, tmp_path / "adapter").train()
    packed = {n: p.detach().clone() for n, p in q.named_parameters() if not p.dtype.is_floating_point}

    x, task_ids = ids(4, 6), ["a", "c", "b", "a"]                 # a mixed batch
    torch.manual_seed(1)                                          # the same random draws (DyLoRA's rank)
    out_q = mq(input_ids=x, labels=x, task_ids=task_ids)
    torch.manual_seed(1)
    out_r = mr(input_ids=x, labels=x, task_ids=task_ids)
    torch.testing.assert_close(out_q.logits, out_r.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_q.loss, out_r.loss, atol=2e-6, rtol=1e-5)
    out_q.loss.backward()
    out_r.loss.backward()
    gq, gr = adapter_grads(mq), adapter_grads(mr)
    assert gq.keys() == gr.keys() and any(g.abs().sum() > 0 for g in gq.values())
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=1e-5, rtol=1e-3, msg=f"{name}: gradient of {k}")
    assert not any(p.requires_grad for n, p in q.named_parameters() if not p.dtype.is_floating_point)

    before = {k: v.detach().clone() for k, v in mq.adapter_state_dict().items()}
    torch.optim.AdamW([p for p in mq.parameters() if p.requires_grad], lr=1e-2).step()
    after = mq.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: the adapter did not train"
    assert all(torch.equal(p, packed[n]) for n, p in q.named_parameters() if n in packed), "the packed base moved"


@pytest.mark.parametrize("name", ["more", "lora"])
def test_8bit_base_layers_add_the_same_adapter_output(name, llama_dir):
    """8-bit matmuls quantise the activations too, so the comparison is per layer: adapted output minus the
    layer's own base output equals the float copy's adapter output."""
    q = load_quantized(llama_dir, 8)
    ref = dequantized_copy(q, llama_dir)
    torch.manual_seed(0)
    mq = morelora.build_method(name, q, TASKS, **opts(name)).eval()
    torch.manual_seed(0)
    mr = morelora.build_method(name, ref, TASKS, **opts(name)).eval()
    x = torch.randn(3, 5, 64)
    task_ids = mq.resolve_task_ids(["b", "a", "c"])
    for (lname, lq), (_, lr) in zip(mq.adapter_layers(), mr.adapter_layers()):
        base_q = lq.base_layer if hasattr(lq, "base_layer") else lq.get_base_layer()
        base_r = lr.base_layer if hasattr(lr, "base_layer") else lr.get_base_layer()
        assert type(base_q).__name__ == "Linear8bitLt"
        if base_q.in_features != 64:
            continue
        with torch.no_grad(), mq._task_ids_handed_to_layers(task_ids), mr._task_ids_handed_to_layers(task_ids):
            delta_q = lq(x) - base_q(x)
            delta_r = lr(x) - base_r(x)
        assert delta_r.abs().max() > 1e-3
        torch.testing.assert_close(delta_q, delta_r, atol=1e-4, rtol=1e-3, msg=lname)


def test_merge_on_a_quantised_base_is_refused_with_the_way_out(llama_dir):
    for name in ("more", "lora"):
        m = morelora.build_method(name, load_quantized(llama_dir, 4), TASKS)
        with pytest.raises(MoreLoraError, match=r"base is quantised \(Linear4bit.*model\.quantization: null.*"
                                                r"morelora merge RUN"):
            m.merge_task("a")
        with pytest.raises(MoreLoraError, match="base is quantised"):
            m.merge_and_unload("a")
        assert m.merged_task is None


def test_quantization_config_errors():
    def err(override: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        return str(e.value)

    assert load_config(None, []).model.quantization is None
    q = load_config(None, ["model.quantization={bits: 4}"]).model.quantization
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "float32")
    assert load_config(None, ["model.quantization={bits: 8}"]).model.quantization.quant_type is None
    assert err("model.quantization={bits: 3}") == "model.quantization.bits: expected 4 or 8, got 3"
    assert err("model.quantization={bits: 8, quant_type: nf4}") == \
        "model.quantization.quant_type applies to 4-bit only; remove it for bits: 8"
    assert err("model.quantization={bits: 4, quant_type: int4}") == \
        "model.quantization.quant_type: expected one of nf4, fp4, got 'int4'"
    assert err("model.quantization=4") == "model.quantization: expected a mapping, got 4"
    assert err("model.quantization.compute_dtype=fp8").startswith("model.quantization.compute_dtype: expected one of")


def test_a_model_with_nothing_to_quantise_is_one_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    path = tmp_path / "nolinear"
    BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=0, num_attention_heads=2),
              add_pooling_layer=False).save_pretrained(path)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, quantization_config=bnb_config(QuantizationConfig(bits=4)))
    with pytest.raises(ConfigError, match=r"^model\.quantization: bitsandbytes quantised no layer of .*nolinear "
                                          r"\(model type bert: no nn\.Linear layer it can pack\); set "
                                          r"model\.quantization: null$"):
        prepare_quantized(copy.deepcopy(model), str(path))


# ------------------------------------------------------------------------------------ runs, export, errors
@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, tiny_llama):
    """MoRE trained 6 steps through the trainer on the tiny LLaMA loaded 4-bit."""
    from conftest import tiny_run_config

    from morelora.config import RunConfig
    from morelora.training import train

    cfg = tiny_run_config(tiny_llama, tmp_path_factory.mktemp("q") / "run", save_steps=0)
    cfg["tasks"] = ["rte", "sst2"]
    cfg["model"]["quantization"] = {"bits": 4}
    return train(RunConfig.from_dict(cfg))


def test_4bit_run_saves_loads_and_exports_to_peft_over_the_full_precision_base(quant_run, tiny_llama, tmp_path,
                                                                                capsys):
    from peft import PeftModel

    from morelora.cli import main
    from morelora.training import load_run

    run = load_run(quant_run)                                     # the saved adapter back on a 4-bit base
    assert run.cfg.model.quantization.bits == 4
    packed = [n for n, m in run.model.base_model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)]
    assert packed and all(is_quantized(layer.base_layer) for _, layer in run.model.adapter_layers())
    trained = run.model.adapter_state_dict()
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B")), "B left its zero init"

    assert main(["export", str(quant_run), "--task", "sst2", "--out", str(tmp_path / "peft")]) == 0
    full = load_run(quant_run, full_precision=True).model.eval()  # the same adapter on the float base
    assert not any(is_quantized(layer.base_layer) for _, layer in full.adapter_layers())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "peft").eval()
    x = ids(3, 9)
    with torch.no_grad():
        ours = full(input_ids=x, task_ids=["sst2"] * 3).logits
        theirs = peft_model(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=x).logits
    assert (ours - plain).abs().max() > 1e-4                      # the adapter changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    capsys.readouterr()
    assert main(["merge", str(quant_run), "--task", "sst2", "--out", str(tmp_path / "merged")]) == 0
    assert "(trained on a 4-bit base; merged into its full-precision weights)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)


def _cli_error(capsys, argv: list[str]) -> str:
    from morelora.cli import main

    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("morelora: error: "), lines
    return lines[0]


def _train_argv(model: str, tmp_path) -> list[str]:
    import yaml
    from conftest import tiny_run_config

    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model, tmp_path / "run")))
    return ["train", str(config), "model.quantization.bits=4", "tasks=[sst2]", "train.max_steps=1"]


def test_missing_or_old_bitsandbytes_is_one_line(monkeypatch, capsys, tmp_path, tiny_llama):
    import importlib.metadata
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    assert _cli_error(capsys, _train_argv(tiny_llama, tmp_path)) == (
        "morelora: error: model.quantization needs bitsandbytes >= 0.47: pip install 'morelora[quant]' "
        "(or set model.quantization: null)")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.45.5" if n == "bitsandbytes" else version(n))
    assert _cli_error(capsys, _train_argv(tiny_llama, tmp_path)) == (
        "morelora: error: model.quantization needs bitsandbytes >= 0.47 (CPU backend), found 0.45.5: "
        "pip install -U 'bitsandbytes>=0.47'")
    assert not (tmp_path / "run").exists()


def test_bitsandbytes_without_a_backend_here_is_one_line(monkeypatch, capsys, tmp_path, tiny_llama):
    import bitsandbytes as bnb

    from morelora import quantization

    def no_kernel(self, x):
        raise NotImplementedError("no kernel registered for bitsandbytes::gemv_4bit on cpu\nmore detail")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_kernel)
    quantization._backend_error.cache_clear()
    try:
        line = _cli_error(capsys, _train_argv(tiny_llama, tmp_path))
    finally:
        quantization._backend_error.cache_clear()
    assert line.startswith("morelora: error: bitsandbytes 0.") and line.endswith(
        "cannot run 4-bit layers on this machine (cpu: NotImplementedError: no kernel registered for "
        "bitsandbytes::gemv_4bit on cpu); set model.quantization: null, or use a machine it supports (CUDA GPU, "
        "or x86 CPU with AVX2)")
