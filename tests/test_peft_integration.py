"""morelora methods as PEFT methods: get_peft_model, forward / generate with task ids, save / load, AutoPeftModel,
and the guard that fails when PEFT changes what morelora.peft_integration patches."""

from __future__ import annotations

import inspect
import json

import peft
import pytest
import torch
from _tiny import ids, nontrivial_options, tiny_bert, tiny_llama, tiny_t5
from packaging.specifiers import SpecifierSet
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM
from peft.utils import PeftType, register_peft_method
from safetensors.torch import load_file

import morelora
from morelora import MoREConfig, build_method, get_more_model
from morelora.methods import METHODS
from morelora.peft_integration import (
    PEFT_OWN_METHODS,
    ROUTED_METHODS,
    SUPPORTED_PEFT,
    TaskAdapterTuner,
    register,
)

TASKS = ["a", "b", "c"]
X = ids(3, 6)


def more_config(**kw) -> MoREConfig:
    return MoREConfig(tasks=TASKS, init_lora_weights=False, lora_dropout=0.0, **kw)


# --------------------------------------------------------------------------------------------- the PEFT patch guard
def test_peft_version_and_patches_are_the_ones_this_module_was_written_for():
    """Fails when PEFT changes what peft_integration patches: then re-check both patches (and SUPPORTED_PEFT)."""
    assert peft.__version__ in SpecifierSet(",".join(SUPPORTED_PEFT)), \
        f"peft {peft.__version__} is outside {SUPPORTED_PEFT}: re-check morelora/peft_integration.py's two patches"
    register()
    # patch 1: PeftType is closed (a new PEFT that opens it lets us drop _add_peft_type)
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="not_a_method_xyz", config_cls=MoREConfig, model_cls=TaskAdapterTuner)
    for name in METHODS:
        if name not in PEFT_OWN_METHODS:
            peft_type = PeftType(name.upper())
            assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is TaskAdapterTuner
            assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is METHODS[name].model_class.config_class
    # patch 2: PEFT's task classes still drop task_ids for everything but Poly, and each of them is routed
    src = inspect.getsource(PeftModelForCausalLM.forward.__wrapped__)
    assert "PeftType.POLY" in src and 'kwargs["task_ids"] = task_ids' in src
    classes = {c.__name__ for c in vars(peft.peft_model).values() if isinstance(c, type) and issubclass(c, PeftModel)}
    assert classes >= {"PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
                       "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                       "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"}
    assert all(getattr(PeftModel, m)._morelora_routed for m in ROUTED_METHODS)
    assert PeftModelForCausalLM.forward._morelora_routed and PeftModelForCausalLM.generate._morelora_routed


# --------------------------------------------------------------------------------------------- MoRE through PEFT
def test_get_peft_model_computes_what_get_more_model_computes():
    torch.manual_seed(0)
    ours = get_more_model(tiny_llama(), more_config()).train()
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), more_config(task_type="CAUSAL_LM")).train()
    assert isinstance(pm, PeftModelForCausalLM)
    assert type(pm.config).__name__ == "LlamaConfig"          # the base model's config, as in PEFT
    assert isinstance(pm.peft_config["default"], MoREConfig) and pm.peft_config["default"].peft_type == "MORE"
    a = ours(input_ids=X, labels=X, task_ids=torch.tensor([0, 2, 1]))
    b = pm(input_ids=X, labels=X, task_ids=["a", "c", "b"])     # names or indices
    assert torch.equal(a.logits, b.logits)
    assert pm.aux_losses["contrastive"] > 0 and torch.allclose(a.loss, b.loss)
    # the loss includes the contrastive term: task loss + 0.1 * contrastive
    assert torch.allclose(b.loss, pm.task_loss + 0.1 * pm.aux_losses["contrastive"])
    b.loss.backward()
    grads = [n for n, p in pm.named_parameters() if p.grad is not None]
    assert grads and all(p.requires_grad for n, p in pm.named_parameters() if n in grads)
    assert any("task_embedding" in n for n in grads) and not any("embed_tokens" in n for n in grads)


def test_task_ids_reach_the_layers_through_every_wrapper():
    pm = peft.get_peft_model(tiny_llama(), more_config(task_embedding_std=1.0)).eval()   # no task_type: PeftModel
    assert type(pm) is PeftModel
    with torch.no_grad():
        ref = pm(input_ids=X, task_ids=[0, 1, 2]).logits
        inner = pm.get_base_model()(input_ids=X, task_ids=[0, 1, 2]).logits   # the wrapped model takes them too
        other = pm(input_ids=X, task_ids=[1, 1, 1]).logits
    assert torch.equal(ref, inner) and not torch.allclose(ref, other)
    with pytest.raises(morelora.MoreLoraError, match="task_ids are required"):
        pm(input_ids=X)
    assert "task_ids" in inspect.signature(pm.get_base_model().forward).parameters   # Trainer keeps the column


def test_generate_follows_task_ids():
    torch.manual_seed(0)
    ours = get_more_model(tiny_llama(), more_config()).eval()
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), more_config(task_type="CAUSAL_LM")).eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    a = ours.generate(input_ids=X, task_ids=[0, 1, 2], **kw)
    b = pm.generate(input_ids=X, task_ids=["a", "b", "c"], **kw)
    assert torch.equal(a, b)
    c = pm.generate(input_ids=X, task_ids=[2, 2, 2], num_beams=2, **kw)
    assert c.shape[0] == 3


def test_save_load_and_auto_peft_model(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), more_config(task_type="CAUSAL_LM")).eval()
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    pm.peft_config["default"].base_model_name_or_path = str(base_dir)
    pm.save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "MORE" and meta["tasks"] == TASKS and meta["r"] == 8
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in state)
    assert set(state) == {"base_model.model." + k for k in pm.adapter.adapter_state_dict()}   # adapter only
    with torch.no_grad():
        ref = pm(input_ids=X, task_ids=[0, 1, 2]).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
        assert isinstance(loaded, PeftModelForCausalLM) and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())      # inference mode
        assert torch.equal(loaded(input_ids=X, task_ids=[0, 1, 2]).logits, ref)
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert torch.equal(auto(input_ids=X, task_ids=[0, 1, 2]).logits, ref)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_a_morelora_save_loads_through_peft(tmp_path):
    """A run folder's adapter/ (morelora's format) loads with PeftModel.from_pretrained, same outputs."""
    ours = get_more_model(tiny_llama(), more_config()).eval()
    ours.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = ours(input_ids=X, task_ids=[2, 0, 1]).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=X, task_ids=["c", "a", "b"]).logits, ref)
    again = morelora.MoREModel.from_pretrained(tiny_llama(), tmp_path / "adapter")   # morelora's loader still reads it
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=X, task_ids=[2, 0, 1]).logits, ref)
    # a folder saved before adapter_config.json carried peft_type: PEFT needs the config passed explicitly
    path = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["peft_type"], meta["base_model_name_or_path"]
    path.write_text(json.dumps(meta))
    with pytest.raises(KeyError, match="peft_type"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    config = MoREConfig.from_pretrained(tmp_path / "adapter")
    assert config.tasks == TASKS and config.r == 8 and config.peft_type == "MORE"
    old = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", config=config)
    with torch.no_grad():
        assert torch.equal(old(input_ids=X, task_ids=[2, 0, 1]).logits, ref)


def test_disable_adapter_gives_the_base_model_and_merge():
    pm = peft.get_peft_model(tiny_llama(), more_config(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        base = tiny_llama()(input_ids=X).logits
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=X).logits, base)
        adapted = pm(input_ids=X, task_ids=[1, 1, 1]).logits
        assert not torch.allclose(adapted, base)
        merged = pm.merge_and_unload(task="b")
        assert "task_ids" not in inspect.signature(merged.forward).parameters
        assert torch.allclose(merged(input_ids=X).logits, adapted, atol=1e-5)


def test_sequence_classification_with_bert(tmp_path):
    """PEFT wraps the head (ModulesToSaveWrapper): it trains, and a save restores it onto a base with another head."""
    torch.manual_seed(0)
    cfg = MoREConfig(tasks=TASKS, init_lora_weights=False, lora_dropout=0.0, task_type="SEQ_CLS",
                     target_modules=["query", "value"])
    pm = peft.get_peft_model(tiny_bert(), cfg).train()
    out = pm(input_ids=X, labels=torch.tensor([0, 1, 2]), task_ids=[0, 1, 2])
    out.loss.backward()
    head = pm.base_model.model.classifier.modules_to_save["default"]
    assert head.weight.grad is not None and "contrastive" in pm.aux_losses     # the head is trained
    with torch.no_grad():
        head.weight.add_(1.0)
        pm.eval()
        ref = pm(input_ids=X, task_ids=[0, 1, 2]).logits
        pm.save_pretrained(tmp_path)
        base = tiny_bert()
        torch.nn.init.normal_(base.classifier.weight)          # a fresh random head, as from_pretrained gives
        loaded = PeftModel.from_pretrained(base, tmp_path)
        assert torch.equal(loaded(input_ids=X, task_ids=[0, 1, 2]).logits, ref)


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(PEFT_OWN_METHODS) - {"more"}))
def test_every_other_method_through_peft(method, tmp_path):
    """Each registered method: get_peft_model from its config, mixed-task forward = morelora's own, save / load."""
    config_class = METHODS[method].model_class.config_class
    opts = nontrivial_options(method)
    torch.manual_seed(0)
    ours = build_method(method, tiny_llama(), TASKS, **opts).eval()
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), config_class(tasks=TASKS, task_type="CAUSAL_LM", **opts)).eval()
    assert pm.peft_config["default"].peft_type == method.upper()
    with torch.no_grad():
        ref = ours(input_ids=X, task_ids=[0, 1, 2]).logits
        assert torch.equal(pm(input_ids=X, task_ids=[0, 1, 2]).logits, ref)
        pm.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert torch.equal(loaded(input_ids=X, task_ids=[0, 1, 2]).logits, ref)


def test_what_is_refused_says_why():
    pm = peft.get_peft_model(tiny_llama(), more_config(task_type="CAUSAL_LM"))
    with pytest.raises(morelora.MoreLoraError, match="every task in one adapter"):
        pm.add_adapter("second", more_config())
    with pytest.raises(morelora.MoreLoraError, match=r"name the task to merge: merge_and_unload\(task=...\)"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="uses shared state"):
        peft.inject_adapter_in_model(more_config(), tiny_llama())
    with pytest.raises(morelora.UnknownTaskError, match="unknown task 'z'"):
        pm(input_ids=X, task_ids=["a", "b", "z"])


def test_seq2seq_forward_and_generate():
    torch.manual_seed(0)
    ours = get_more_model(tiny_t5(), more_config(task_embedding_std=1.0)).eval()
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_t5(), more_config(task_type="SEQ_2_SEQ_LM", task_embedding_std=1.0)).eval()
    assert type(pm).__name__ == "PeftModelForSeq2SeqLM"
    with torch.no_grad():
        a = ours(input_ids=X, labels=X[:, :3].contiguous(), task_ids=[0, 1, 2])
        b = pm(input_ids=X, labels=X[:, :3].contiguous(), task_ids=["a", "b", "c"])
        assert torch.equal(a.logits, b.logits)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2)
    assert torch.equal(ours.generate(input_ids=X, task_ids=[2, 1, 0], **kw),
                       pm.generate(input_ids=X, task_ids=[2, 1, 0], **kw))
