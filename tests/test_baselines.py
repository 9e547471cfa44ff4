"""The issue-4 baselines against independent computations: dense W0 + dW_t, token loops, PEFT's LoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from _tiny import ids, tiny_bert, tiny_llama, tiny_t5
from torch import nn

import morelora
from morelora import MoreLoraError
from morelora.tuners.common import load_balancing_loss

TASKS = ["a", "b", "c"]
NAMES = ["lora", "multilora", "moelora", "mixlora", "hydralora", "dylora"]
MERGEABLE = ["lora", "multilora", "moelora", "dylora"]
TOKEN_ROUTED = ["mixlora", "hydralora"]
R, ALPHA = 4, 8.0
OPTIONS = {"lora": {}, "multilora": {}, "moelora": {"num_experts": 2, "task_embedding_dim": 8},
           "mixlora": {"num_experts": 4, "top_k": 2}, "hydralora": {"num_heads": 3}, "dylora": {"inference_rank": 3}}


def build(name: str, base: nn.Module | None = None, **kw):
    """`name` on a tiny BERT with random B, random routers and no dropout (so outputs differ per task)."""
    opts = {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "init_lora_weights": False, **OPTIONS[name], **kw}
    m = morelora.build_method(name, base if base is not None else tiny_bert(), TASKS, **opts)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in m.adapter_layers():
            for attr in ("task_embedding", "router"):
                p = getattr(layer, attr, None)
                p = p.weight if isinstance(p, nn.Linear) else p
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def no_dropout(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def hand_delta(name: str, layer: nn.Module, task: int, rank: int | None = None) -> torch.Tensor:
    """dW_t written out from the layer's parameters (not through the layer's own code)."""
    if name == "lora":
        return ALPHA / R * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    if name == "multilora":
        return ALPHA / R * layer.lora_B[task] @ layer.lora_A[task]
    if name == "moelora":
        n = OPTIONS["moelora"]["num_experts"]
        g = torch.softmax(layer.gate.weight @ layer.task_embedding[task], -1)
        s = R // n
        return sum(ALPHA / R * g[i] * layer.lora_B[:, i * s:(i + 1) * s] @ layer.lora_A[i * s:(i + 1) * s]
                   for i in range(n))
    if name == "dylora":
        k = rank or OPTIONS["dylora"]["inference_rank"]
        return ALPHA / k * layer.lora_B[:, :k] @ layer.lora_A[:k]
    raise AssertionError(name)


def dense_copy(m, name: str, task: int, rank: int | None = None) -> nn.Module:
    """An independent plain model with W0 + dW_t in every adapted layer."""
    dense = copy.deepcopy(m.base_model)
    with torch.no_grad():
        for lname, layer in m.adapter_layers():
            parent, _, child = lname.rpartition(".")
            lin = copy.deepcopy(layer.base_layer)
            lin.weight += hand_delta(name, layer, task, rank)
            setattr(dense.get_submodule(parent), child, lin)
    return dense.eval()


# ------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("name", MERGEABLE)
def test_per_task_methods_match_dense_reference(name):
    m = build(name)
    x, task_ids = ids(4, 7), [2, 0, 1, 2]
    out = m(input_ids=x, task_ids=task_ids).logits
    for i, t in enumerate(task_ids):
        ref = dense_copy(m, name, t)(input_ids=x[i : i + 1]).logits
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    if name in ("multilora", "moelora"):  # the tasks really differ
        assert not torch.allclose(m(input_ids=x, task_ids=[0] * 4).logits, m(input_ids=x, task_ids=[1] * 4).logits)


@pytest.mark.parametrize("name", TOKEN_ROUTED)
def test_token_routed_layer_matches_token_loop(name):
    m = build(name)
    _, layer = next(iter(m.adapter_layers()))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    out = layer(x, task_ids=torch.tensor([0, 2]))
    want = torch.empty_like(out)
    with torch.no_grad():
        _token_loop(name, layer, x, want)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _token_loop(name: str, layer: nn.Module, x: torch.Tensor, want: torch.Tensor) -> None:
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    for b in range(2):
        for s in range(5):
            v = x[b, s]
            p = [float(z) for z in torch.softmax(layer.router.weight @ v, -1)]
            y = w0 @ v + b0
            if name == "mixlora":
                top = sorted(range(len(p)), key=lambda i: -p[i])[:2]
                for i in top:
                    w = p[i] / sum(p[j] for j in top)
                    y = y + w * ALPHA / R * layer.lora_B[i] @ (layer.lora_A[i] @ v)
            else:
                for i in range(3):
                    y = y + p[i] * ALPHA / R * layer.lora_B[i] @ (layer.lora_A @ v)
            want[b, s] = y


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_equals_single_task_runs(name):
    m = build(name)
    x, task_ids = ids(5, 6), ["c", "a", "b", "a", "c"]
    out = m(input_ids=x, task_ids=task_ids).logits
    for i, t in enumerate(task_ids):
        torch.testing.assert_close(out[i : i + 1], m(input_ids=x[i : i + 1], task_ids=[t]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_hand_value():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1], [0.6, 0.1, 0.2, 0.1]])
    # top-2 sets {0,1} {3,2} {0,2} {0,2}: f = (3, 1, 3, 1) / 4;  P = (1.6, 0.7, 1.0, 0.7) / 4
    # loss = 4 * (0.75 * 0.4 + 0.25 * 0.175 + 0.75 * 0.25 + 0.25 * 0.175) = 2.3
    loss = load_balancing_loss(probs, probs.topk(2, -1).indices, 4)
    torch.testing.assert_close(loss, torch.tensor(2.3))
    uniform = torch.full((6, 4), 0.25)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 3), 4), torch.tensor(2.0))


def test_mixlora_balance_loss_in_model_loss():
    m = no_dropout(build("mixlora", balance_weight=0.5)).train()
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, kw, n=name: captured.__setitem__(n, a[0]),
                                             with_kwargs=True) for name, layer in m.adapter_layers()]
    x, labels = ids(3, 5), torch.tensor([0, 2, 1])
    out = m(input_ids=x, labels=labels, task_ids=[0, 1, 2])
    for h in hooks:
        h.remove()
    losses = []
    for name, layer in m.adapter_layers():
        tokens = captured[name].reshape(-1, layer.in_features)
        probs = torch.softmax(tokens @ layer.router.weight.T, -1)
        top = probs.topk(2, -1).indices
        n = probs.shape[1]
        f = torch.tensor([sum(int(i in row) for row in top.tolist()) / len(tokens) for i in range(n)])
        losses.append(n * sum(f[i] * probs[:, i].mean() for i in range(n)))
    want = torch.stack(losses).mean()
    torch.testing.assert_close(m.aux_losses["balance"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + 0.5 * want, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for _, layer in m.adapter_layers())
    m.eval()
    m(input_ids=x, task_ids=[0, 1, 2])
    assert m.aux_losses == {}


# ------------------------------------------------------------------------------------- save / merge / export
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    m = build(name)
    with torch.no_grad():
        m.base_model.classifier.bias.add_(1.0)
    x = ids(3, 6)
    want = m(input_ids=x, task_ids=[0, 1, 2]).logits
    m.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert meta["morelora_method"] == name
    loaded = morelora.load_adapter_model(tiny_bert(), tmp_path / "ckpt").eval()
    assert type(loaded) is type(m)
    torch.testing.assert_close(loaded(input_ids=x, task_ids=[0, 1, 2]).logits, want)
    assert loaded.parameter_counts() == m.parameter_counts()


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_peft_export_parity(name, tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    fresh = copy.deepcopy(base)
    m = build(name, base)
    with torch.no_grad():
        m.base_model.classifier.weight.add_(0.5)  # a trained head travels with the adapter
    w0 = {n: layer.base_layer.weight.clone() for n, layer in m.adapter_layers()}
    x = ids(3, 8)
    for task in ("a", "c"):
        want = m(input_ids=x, task_ids=[task] * 3).logits
        m.export_lora(task, tmp_path / task)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / task).eval()
        torch.testing.assert_close(peft_model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
        m.merge_task(task)
        torch.testing.assert_close(m(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(MoreLoraError, match="already merged"):
            m.merge_task(task)
        m.unmerge()
        for n, layer in m.adapter_layers():
            torch.testing.assert_close(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    want = m(input_ids=x, task_ids=["b"] * 3).logits
    plain = m.merge_and_unload("b")
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert all(type(mod) is nn.Linear for mod in plain.modules() if hasattr(mod, "in_features"))
    torch.testing.assert_close(plain(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TOKEN_ROUTED)
def test_token_routed_methods_refuse_merge_and_export(name, tmp_path):
    m = build(name)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in m.adapter_layers()}
    for call in (lambda: m.merge_task("a"), lambda: m.export_lora("a", tmp_path / "x"),
                 lambda: m.merge_and_unload("a")):
        with pytest.raises(NotImplementedError, match="depends on the input token.*cannot be merged"):
            call()
    assert m.merged_task is None and not (tmp_path / "x").exists()
    for n, layer in m.adapter_layers():
        assert torch.equal(layer.base_layer.weight, w0[n])
    assert not morelora.get_method(name).mergeable and morelora.get_method(name).routing == "per token"


# ------------------------------------------------------------------------------------- method specifics
def test_lora_is_peft_lora():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    ours = morelora.build_method("lora", tiny_bert(), TASKS, r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                 init_lora_weights=False)
    ref = get_peft_model(tiny_bert(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False))
    layers = dict(ours.adapter_layers())
    assert len(layers) == 4 and all(isinstance(layer, LoraLayer) for layer in layers.values())
    ref_params = dict(ref.named_parameters())
    for n, layer in layers.items():  # same seed, same injection order -> the same initial factors
        for pname in ("lora_A.default.weight", "lora_B.default.weight"):
            assert torch.equal(layer.get_parameter(pname), ref_params[f"base_model.model.{n}.{pname}"])
    x = ids(3, 6)
    want = ref.eval()(input_ids=x).logits
    torch.testing.assert_close(ours.eval()(input_ids=x, task_ids=["a", "b", "c"]).logits, want)
    torch.testing.assert_close(ours(input_ids=x).logits, want)   # one adapter: task ids are optional
    ours.merge_task("a")   # merging any task applies the shared change; every task still runs
    torch.testing.assert_close(ours(input_ids=x, task_ids=["b", "c", "a"]).logits, want, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    with pytest.raises(morelora.UnknownTaskError):
        ours(input_ids=x, task_ids=["zzz"] * 3)
    ours.train()
    ours(input_ids=x, labels=torch.tensor([0, 1, 2]), task_ids=[0, 1, 2]).loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or "classifier" in n for n in grads)
    assert ours.add_task("d", init_from="a") == 3 and ours.tasks[-1] == "d"


def test_dylora_samples_a_rank_per_training_forward():
    m = no_dropout(build("dylora")).train()
    x = ids(2, 6)
    seen = set()
    with torch.no_grad():
        for seed in range(12):
            torch.manual_seed(seed)
            out = m(input_ids=x, task_ids=[0, 1]).logits
            b = m.last_train_rank
            seen.add(b)
            if seed < 3:
                torch.testing.assert_close(out, dense_copy(m, "dylora", 0, rank=b)(input_ids=x).logits,
                                           atol=1e-5, rtol=1e-5)
    assert seen == {1, 2, 3, 4}
    assert all(layer.call_state is None for _, layer in m.adapter_layers())
    m.eval()
    m.set_inference_rank(1)
    torch.testing.assert_close(m(input_ids=x, task_ids=[2, 2]).logits,
                               dense_copy(m, "dylora", 0, rank=1)(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert m.config.inference_rank == 1
    with pytest.raises(MoreLoraError, match="inference_rank .5. must be <= r .4."):
        m.set_inference_rank(5)


def test_multilora_tasks_are_isolated_and_add_task():
    m = build("multilora").train()
    m(input_ids=ids(2, 5), labels=torch.tensor([0, 1]), task_ids=[0, 0]).loss.backward()
    for _, layer in m.adapter_layers():
        assert layer.lora_A.grad[0].abs().sum() > 0 and layer.lora_B.grad[0].abs().sum() > 0
        assert layer.lora_A.grad[1:].abs().sum() == 0 and layer.lora_B.grad[1:].abs().sum() == 0
    m.eval()
    for name in ("multilora", "moelora"):
        m = build(name)
        assert m.add_task("new", init_from="c") == 3
        x = ids(2, 5)
        torch.testing.assert_close(m(input_ids=x, task_ids=["new"] * 2).logits,
                                   m(input_ids=x, task_ids=["c"] * 2).logits)
        m.add_task("fresh")
        assert m(input_ids=x, task_ids=["fresh", "a"]).logits.shape == (2, 3)


def test_multilora_generate_follows_task_ids_through_beams():
    m = build("multilora", tiny_t5())
    x = ids(3, 6)
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    batched = m.generate(input_ids=x, task_ids=["a", "c", "b"], **kw)
    for i, t in enumerate(["a", "c", "b"]):
        one = m.generate(input_ids=x[i : i + 1], task_ids=[t], **kw)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2, : one.shape[1]], one)


def test_parameter_counts_by_hand():
    d, ffn, n_layers, T, head = 32, 37, 2, 3, 32 * 3 + 3      # tiny BERT: query/value 32x32; FFN 32->37->32
    lora = 2 * n_layers * R * (d + d)
    want = {
        "lora": lora,
        "multilora": T * lora,
        "moelora": 2 * n_layers * (R * (d + d) + T * 8 + 8 * 2),
        "mixlora": n_layers * sum(4 * R * (d_in + d_out) + d_in * 4 for d_in, d_out in [(d, ffn), (ffn, d)]),
        "hydralora": 2 * n_layers * (R * d + 3 * d * R + d * 3),
        "dylora": lora,
    }
    for name, adapter in want.items():
        c = build(name).parameter_counts()
        assert c["adapter"] == adapter, name
        assert c["per_task"] == pytest.approx(adapter / T)
        assert c["trainable"] == adapter + head == c["adapter"] + c["modules_to_save"]


# ------------------------------------------------------------------------------------- registry / configs
def _forward(m, family: str, x: torch.Tensor):
    if family == "t5":
        return m(input_ids=x, decoder_input_ids=x[:, :2], task_ids=["a", "c", "b"]).logits
    return m(input_ids=x, task_ids=["a", "c", "b"]).logits


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_build_method_every_name_every_family(family):
    make = {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family]
    x = ids(3, 5)
    ref = _forward(make(), family, x) if family != "t5" else None
    ffn = {"bert": ("intermediate.dense", "output.dense"), "t5": ("wi", "wo"),
           "llama": ("gate_proj", "up_proj", "down_proj")}[family]
    for name in NAMES:
        m = morelora.build_method(name, make(), TASKS).eval()
        assert isinstance(m, morelora.get_method(name).model_class) and m.adapted_names
        out = _forward(m, family, x)
        if ref is not None:   # B = 0 at init: the identity change
            torch.testing.assert_close(out, ref)
        c = m.parameter_counts()
        assert c["adapter"] > 0 and c["per_task"] == pytest.approx(c["adapter"] / 3)
        if name == "mixlora":   # FFN only (BERT's attention.output.dense is not an FFN layer)
            assert all(n.endswith(ffn) and "attention" not in n for n in m.adapted_names), m.adapted_names
            assert len(m.adapted_names) == 2 * len(ffn) or family == "t5"


def test_config_validation():
    cases = [("lora", {"r": 0}, "r must be an integer >= 1"),
             ("multilora", {"lora_dropout": 1.0}, "lora_dropout must be in"),
             ("moelora", {"r": 6, "num_experts": 4}, "multiple of num_experts"),
             ("mixlora", {"top_k": 9}, r"top_k \(9\) must be <= num_experts \(8\)"),
             ("mixlora", {"balance_weight": -1}, "balance_weight must be >= 0"),
             ("hydralora", {"num_heads": 0}, "num_heads must be an integer >= 1"),
             ("dylora", {"inference_rank": 9}, r"inference_rank \(9\) must be <= r \(8\)"),
             ("lora", {"rank": 2}, "unknown option")]
    for name, opts, msg in cases:
        with pytest.raises(MoreLoraError, match=msg):
            morelora.build_method(name, tiny_bert(), TASKS, **opts)
    with pytest.raises(MoreLoraError, match="PEFT could not inject LoRA"):
        morelora.build_method("lora", tiny_bert(), TASKS, target_modules=["nonexistent"])
    with pytest.raises(MoreLoraError, match="no default FFN target_modules"):
        morelora.build_method("mixlora", nn.Sequential(nn.Linear(4, 4)), TASKS)
