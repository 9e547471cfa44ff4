"""MoRE's batched routing and contrastive loss (MoREModel groups layers by shape) against the per-layer path."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import VOCAB, ids, tiny_bert, tiny_llama, tiny_t5
from torch import nn
from transformers import BertConfig, BertForMultipleChoice

from morelora import MoREConfig, MoREModel, get_more_model

TASKS = ["a", "b", "c"]
MIXED = torch.tensor([0, 2, 1, 1, 0, 2])
# two shapes per model, so that there are two groups: (32, r) and the FFN's down projection
TARGETS = {"bert": ["query", "value", "intermediate.dense", "output.dense"],
           "llama": ["q_proj", "v_proj", "down_proj"], "t5": ["q", "v", "wo"]}


def _base(family: str) -> nn.Module:
    return {"bert": tiny_bert, "llama": tiny_llama, "t5": tiny_t5}[family]()


def _inputs(family: str, batch: int = 6, length: int = 7) -> dict:
    x = ids(batch, length)
    if family == "bert":
        return {"input_ids": x, "labels": torch.arange(batch) % 3}
    if family == "t5":
        return {"input_ids": x, "labels": ids(batch, 4, seed=2)}
    return {"input_ids": x, "labels": x}


def _pair(base: nn.Module, **kw) -> tuple[MoREModel, MoREModel]:
    """(grouped model, an identical copy forced onto the per-layer path), tasks routed to different experts."""
    opts = dict(r=4, tasks=TASKS, init_lora_weights=False, lora_dropout=0.1)
    opts.update(kw)
    m = get_more_model(base, MoREConfig(**opts))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in m.adapter_layers():
            if layer.cfg.use_task_embeddings:
                layer.task_embedding.copy_(torch.randn(layer.task_embedding.shape, generator=g))
    m.after_weights_changed()
    ref = copy.deepcopy(m)
    ref._grouped_routing = False
    return m.train(), ref.train()


def _gate_calls(m: MoREModel) -> list:
    calls: list = []
    for _, layer in m.adapter_layers():
        if layer.cfg.use_task_embeddings:
            layer.gate.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _step(m: MoREModel, seed: int = 0, **inputs) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)   # same dropout masks in both models
    out = m(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    return out.loss.detach(), m.aux_losses.get("contrastive"), grads


def _assert_same_step(m: MoREModel, ref: MoREModel, **inputs) -> None:
    loss, cl, grads = _step(m, **inputs)
    ref_loss, ref_cl, ref_grads = _step(ref, **inputs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    if ref_cl is None:
        assert cl is None
    else:
        torch.testing.assert_close(cl, ref_cl, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), name
        if g is not None:
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    for _, layer in m.adapter_layers():   # per-call state is gone
        assert layer.call_state is None and layer.aux_loss is None
    assert m.call_state is None


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_grouped_matches_per_layer_on_mixed_batch(family):
    m, ref = _pair(_base(family), target_modules=TARGETS[family])
    assert len(m._layer_groups()) == 2
    calls, ref_calls = _gate_calls(m), _gate_calls(ref)
    inputs = _inputs(family)
    _assert_same_step(m, ref, **inputs, task_ids=MIXED)
    assert calls == [] and len(ref_calls) == len(m.adapted_names), "grouped: no per-layer gate run"
    assert m.aux_losses["contrastive"] > 0
    # one optimizer step each, then inference (cached tables in both)
    for model in (m, ref):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        _step(model, **inputs, task_ids=MIXED)
        opt.step()
        model.eval()
    x = {k: v for k, v in inputs.items() if k != "labels"}
    if family == "t5":
        x["decoder_input_ids"] = inputs["labels"]
    with torch.no_grad():
        out, ref_out = m(**x, task_ids=MIXED).logits, ref(**x, task_ids=MIXED).logits
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert m.task_ranks() == ref.task_ranks()


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_grouped_batch_smaller_than_the_task_count(family):
    """Fewer examples than tasks: the group routes only the batch's rows (not every task's); the same step."""
    m, ref = _pair(_base(family), target_modules=TARGETS[family])
    _assert_same_step(m, ref, **_inputs(family, batch=2), task_ids=torch.tensor([2, 0]))


def test_grouped_eval_logits_identical_and_gate_cached():
    m, ref = _pair(tiny_bert())
    m.eval(), ref.eval()
    x = ids(6, 7)
    assert torch.equal(m(input_ids=x, task_ids=MIXED).logits, ref(input_ids=x, task_ids=MIXED).logits)
    calls = _gate_calls(m)
    m(input_ids=x, task_ids=MIXED)
    assert calls == [], "inference uses the cached tables"


def test_grouped_rows_a_multiple_of_the_task_ids():
    """Encoder multiple choice: (B, C, L) flattened to (B * C, L); the coefficients repeat like the ids."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    m, ref = _pair(BertForMultipleChoice(cfg), target_modules=TARGETS["bert"])
    x = ids(12, 7).view(3, 4, 7)
    _assert_same_step(m, ref, input_ids=x, labels=torch.tensor([0, 3, 1]), task_ids=torch.tensor([2, 0, 1]))
    # causal LM with twice the rows of the task ids (as beams / several sequences per input)
    m, ref = _pair(tiny_llama(), target_modules=TARGETS["llama"])
    x = ids(6, 7)
    _assert_same_step(m, ref, input_ids=x, labels=x, task_ids=torch.tensor([1, 0, 2]))


def test_generate_with_beams_same_as_per_layer():
    m, ref = _pair(tiny_llama())
    x = ids(3, 6)
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    for model in (m, ref):
        model.eval()
    out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), task_ids=["a", "c", "b"], **kw)
    want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), task_ids=["a", "c", "b"], **kw)
    assert torch.equal(out, want)


@pytest.mark.parametrize("opts", [dict(routing="hard"), dict(routing="frozen"), dict(ste_estimator="prefix_mask"),
                                  dict(expert_structure="subset"), dict(use_task_embeddings=False),
                                  dict(contrastive_weight=0.0)])
def test_ablations_keep_the_per_layer_routing(opts, monkeypatch):
    m, ref = _pair(tiny_bert(), **opts)
    routed = []
    orig = MoREModel._route_group
    monkeypatch.setattr(MoREModel, "_route_group", staticmethod(lambda *a: routed.append(1) or orig(*a)))
    _assert_same_step(m, ref, **_inputs("bert"), task_ids=MIXED)
    assert routed == [] or opts == dict(contrastive_weight=0.0)   # grouped routing only for the full method
    assert m.task_ranks() == ref.task_ranks()


def test_task_ids_given_to_a_layer_directly_use_its_own_path():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, other=None):
            h = self.a(x[:, None, :])
            return (self.b(h, task_ids=other) if other is not None else self.b(h))[:, 0]

    torch.manual_seed(0)
    m, ref = _pair(Two(), target_modules=["a", "b"])
    x, t, other = torch.randn(6, 8), MIXED, MIXED.flip(0)
    for model in (m, ref):
        model.zero_grad()
        torch.manual_seed(0)
        out = model(x, other=other, task_ids=t)
        (out.pow(2).mean() + 0.1 * model.aux_losses["contrastive"]).backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(m.aux_losses["contrastive"], ref.aux_losses["contrastive"])


def test_state_cleared_after_an_error_and_after_add_task():
    m, ref = _pair(tiny_bert(), target_modules=TARGETS["bert"])
    inputs = _inputs("bert")
    name, layer = list(m.adapter_layers())[3]

    def boom(*a):
        raise RuntimeError("boom")

    handle = layer.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        m(**inputs, task_ids=MIXED)
    handle.remove()
    for _, lay in m.adapter_layers():
        assert lay.call_state is None
    assert m.call_state is None
    _assert_same_step(m, ref, **inputs, task_ids=MIXED)     # nothing stale from the failed call
    for model in (m, ref):
        model.add_task("d", init_from="b")
    _assert_same_step(m, ref, **inputs, task_ids=torch.tensor([3, 2, 1, 0, 3, 3]))
    m.merge_and_unload("a")
    assert m._layer_groups() == []


def test_no_grad_training_mode_and_frozen_router():
    m, ref = _pair(tiny_bert())
    with torch.no_grad():
        torch.manual_seed(0)
        out = m(**_inputs("bert"), task_ids=MIXED)
        torch.manual_seed(0)
        want = ref(**_inputs("bert"), task_ids=MIXED)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=1e-6)
    for _, layer in m.adapter_layers():
        for p in (layer.task_embedding, layer.gate.weight, layer.gate.bias):
            p.requires_grad_(False)
    for _, layer in ref.adapter_layers():
        for p in (layer.task_embedding, layer.gate.weight, layer.gate.bias):
            p.requires_grad_(False)
    _assert_same_step(m, ref, **_inputs("bert"), task_ids=MIXED)


def _padded(batch: int, length: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with example i padded (0) to `length` from `length - i` real tokens, on `side`; and the mask."""
    x = ids(batch, length)
    real = torch.arange(length)[None, :] < (length - torch.arange(batch) % length)[:, None]
    mask = (real if side == "right" else real.flip(-1)).long()
    return x * mask, mask


@pytest.mark.parametrize("pooling", ["first", "mean", "last"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_grouped_matches_per_layer_for_every_pooling(family, pooling):
    """The contrastive loss of the stored pooled inputs (grouped) = each layer's own (per layer), padded batches."""
    m, ref = _pair(_base(family), target_modules=TARGETS[family], contrastive_pooling=pooling)
    assert m.contrastive_pooling == ref.contrastive_pooling == pooling
    for side in ("right", "left"):
        x, mask = _padded(6, 7, side)
        labels = x.masked_fill(mask == 0, -100) if family == "llama" else torch.arange(6) % 3
        _assert_same_step(m, ref, input_ids=x, attention_mask=mask, labels=labels, task_ids=MIXED)


def test_grouped_pooling_with_multiple_choice_rows():
    """(B, C, L) choices: the model flattens the mask like the inputs; grouped = per layer for mean and last."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    x, mask = _padded(12, 7, "right")
    for pooling in ("mean", "last"):
        m, ref = _pair(BertForMultipleChoice(copy.deepcopy(cfg)), target_modules=TARGETS["bert"],
                       contrastive_pooling=pooling)
        _assert_same_step(m, ref, input_ids=x.view(3, 4, 7), attention_mask=mask.view(3, 4, 7),
                          labels=torch.tensor([0, 3, 1]), task_ids=torch.tensor([2, 0, 1]))
