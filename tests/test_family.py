"""The wider LoRA-MoE family (MoV, MoLoRA, LoRAMoE, MoLA, MELoRA, ALoRA, AdaMoE, AdaLoRA) against
independent computations: per-token loops over experts, hand-computed balancing losses, PEFT itself."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import ids, tiny_bert, tiny_t5
from torch import nn

import morelora
from morelora import MoreLoraError, build_method
from morelora.methods_table import describe_methods
from morelora.tuners.common import top_k_balancing_loss as load_balancing_loss
from morelora.tuners.loramoe import localized_balance_loss
from morelora.tuners.mola import schedule_counts

TASKS = ["a", "b", "c"]
FAMILY = ["mov", "molora", "loramoe", "mola", "melora", "alora", "adamoe", "adalora"]
TOKEN_ROUTED = ["mov", "molora", "loramoe", "mola", "adamoe"]
RANDOM_INIT = {"mov": {"init_ia3_weights": False}, "adalora": {"init_lora_weights": False, "lora_dropout": 0.0}}


pytestmark = pytest.mark.usefixtures("one_thread")


def opts(name: str, **kw) -> dict:
    """Options giving a non-trivial adapter at init (random B / vectors, sharp routers, no dropout)."""
    o = dict(RANDOM_INIT.get(name, {"init_lora_weights": False, "lora_dropout": 0.0}))
    if name in ("molora", "loramoe", "mola", "adamoe", "mov"):
        o["router_init_std"] = 1.0
    o.update(kw)
    return o


def toy(name: str, d_in: int = 8, d_out: int = 12, layers: int = 1, **kw):
    """`name` on a Sequential of `layers` plain linear layers (d_in -> d_out, then d_out -> d_out)."""
    torch.manual_seed(0)
    mods = [nn.Linear(d_in, d_out)] + [nn.Linear(d_out, d_out) for _ in range(layers - 1)]
    return build_method(name, nn.Sequential(*mods), TASKS, target_modules=[str(i) for i in range(layers)],
                        **opts(name, **kw)).eval()


# --------------------------------------------------------------------------------------------- references
def top_k_hand(p: list[float], k: int | None) -> dict[int, float]:
    """{expert: weight}: all experts, or the k most probable renormalized (python sort, not torch.topk)."""
    if k is None:
        return dict(enumerate(p))
    chosen = sorted(range(len(p)), key=lambda e: -p[e])[:k]
    s = sum(p[e] for e in chosen)
    return {e: p[e] / s for e in chosen}


def base_out(layer, xt):
    return layer.base_layer.weight @ xt + layer.base_layer.bias


def ref_token(layer, name: str, xt: torch.Tensor) -> torch.Tensor:
    """One token through one adapted layer, expert by expert."""
    y = base_out(layer, xt)
    if name in ("melora",):
        n, di, do = layer.n, layer.in_features // layer.n, layer.out_features // layer.n
        delta = torch.zeros_like(y)
        for i in range(n):
            delta[i * do : (i + 1) * do] = layer.lora_B[i] @ (layer.lora_A[i] @ xt[i * di : (i + 1) * di])
        return y + layer.scaling * delta
    if name == "alora":
        delta = sum(layer.lora_lambda[i] * layer.lora_B[:, i] * (layer.lora_A[i] @ xt)
                    for i in range(layer.max_rank) if layer.rank_mask[i] == 1)
        return y + layer.scaling * delta
    p = torch.softmax(layer.router.weight @ xt, -1).tolist()
    if name == "mov":
        w = top_k_hand(p, layer.top_k)
        return y * sum(wt * layer.ia3_l[e] for e, wt in w.items())
    w = top_k_hand(p, layer.top_k)
    delta = torch.zeros_like(y)
    for e, wt in w.items():
        if e < layer.num_experts:                   # AdaMoE: null experts (e >= n) add nothing
            delta += wt * (layer.lora_B[e] @ (layer.lora_A[e] @ xt))
    return y + layer.scaling * delta


@pytest.mark.parametrize("name,kw", [
    ("mov", {}), ("mov", {"top_k": 2}), ("molora", {}), ("molora", {"top_k": 2}), ("loramoe", {}),
    ("mola", {}), ("adamoe", {"num_experts": 3, "num_null_experts": 2, "top_k": 3}), ("melora", {}),
    ("alora", {"r": 3, "max_rank": 5}),
])
def test_dense_reference_forward(name, kw):
    m = toy(name, layers=2, **kw)
    if name == "alora":      # prune a rank by hand: it must not contribute
        with torch.no_grad():
            m.base_model[0].rank_mask[1] = 0.0
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = m(x, task_ids=[0, 2])
        for b in range(2):
            for t in range(5):
                h = ref_token(m.base_model[0], name, x[b, t])
                want = ref_token(m.base_model[1], name, h)
                torch.testing.assert_close(out[b, t], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILY)
def test_identity_at_default_init(name):
    base = tiny_bert()
    want = copy.deepcopy(base)(input_ids=ids(2, 5)).logits
    m = build_method(name, base, TASKS).eval()
    torch.testing.assert_close(m(input_ids=ids(2, 5), task_ids=[0, 1]).logits, want)


# --------------------------------------------------------------------------------------------- balancing losses
def test_localized_balance_loss_hand_values():
    world_down = torch.tensor([False, True])                 # expert 0: world, expert 1: downstream
    # one token per sample, each sample fully on the expert of its own type: I*Q = [[1.1, 0], [0, 1.1]]
    # mean 0.55, unbiased var = 4 * 0.55^2 / 3  ->  (std / mean)^2 = 4 / 3
    onehot = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    got = localized_balance_loss(onehot, torch.tensor([False, True]), world_down, 0.1)
    assert got.item() == pytest.approx(4 / 3, rel=1e-5)
    # uniform weights: I*Q = [[.55, .45], [.45, .55]], mean .5, var = 4 * .05^2 / 3 -> 0.01/3/0.25 = 1/75
    uniform = torch.full((2, 1, 2), 0.5)
    got = localized_balance_loss(uniform, torch.tensor([False, True]), world_down, 0.1)
    assert got.item() == pytest.approx(1 / 75, rel=1e-5)


def test_localized_balance_loss_loops():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(3, 4, 5, generator=g), -1)        # 3 samples, 4 tokens, 5 experts
    sample_down = torch.tensor([True, False, True])
    expert_down = torch.tensor([False, False, True, True, True])
    vals = []
    for n in range(5):
        for m in range(3):
            q = sum(w[m, t, n].item() for t in range(4))
            vals.append(q * (1.1 if bool(expert_down[n]) == bool(sample_down[m]) else 0.9))
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    got = localized_balance_loss(w, sample_down, expert_down, 0.1)
    assert got.item() == pytest.approx(var / mean**2, rel=1e-5)


def test_load_balancing_loss_hand_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.15, 0.75, 0.1], [0.25, 0.15, 0.6]])
    # top-1: experts 0, 0, 1, 2 -> f = (.5, .25, .25); P = (.425, .35, .225); 3 * sum f P = 1.06875
    assert load_balancing_loss(probs, 1).item() == pytest.approx(1.06875, rel=1e-6)
    # top-2: {0,1}, {0,1}, {1,0}, {2,0} -> f = (1, .75, .25) -> 3 * (.425 + .2625 + .05625) = 2.23125
    assert load_balancing_loss(probs, 2).item() == pytest.approx(2.23125, rel=1e-6)
    assert load_balancing_loss(torch.full((6, 4), 0.25), 1).item() == pytest.approx(1.0)  # balanced: k


def _router_probs(m):
    """Hook every layer's router: {layer name: softmax of its last output}."""
    seen = {}
    for name, layer in m.adapter_layers():
        layer.router.register_forward_hook(lambda mod, a, out, n=name: seen.__setitem__(n, out.float().softmax(-1)))
    return seen


def _hand_balance(probs: torch.Tensor, k: int) -> float:
    p = probs.reshape(-1, probs.shape[-1]).tolist()
    n, tokens = len(p[0]), len(p)
    f = [0.0] * n
    for row in p:
        for e in sorted(range(n), key=lambda e: -row[e])[:k]:
            f[e] += 1 / tokens
    mean_p = [sum(row[e] for row in p) / tokens for e in range(n)]
    return n * sum(fe * pe for fe, pe in zip(f, mean_p))


@pytest.mark.parametrize("name", ["mola", "adamoe"])
def test_model_balance_loss_over_all_experts(name):
    m = toy(name, layers=2, balance_weight=0.5).train()
    seen = _router_probs(m)
    x = torch.randn(3, 4, 8)
    y = m(x, task_ids=[0, 1, 2])
    layers = dict(m.adapter_layers())
    if name == "adamoe":   # router scores real + null experts
        assert seen["0"].shape[-1] == layers["0"].num_experts + layers["0"].num_null_experts
    want = sum(_hand_balance(seen[n], layers[n].top_k) for n in layers) / len(layers)
    assert m.aux_losses["balance"].item() == pytest.approx(want, rel=1e-5)
    assert y.shape == (3, 4, 12)


def test_loramoe_loss_uses_task_types_and_is_added():
    base = tiny_bert()
    m = build_method("loramoe", base, TASKS, downstream_tasks=["a"], balance_weight=0.3,
                     **opts("loramoe")).train()
    assert [len(layer.lora_A) for _, layer in m.adapter_layers()] == [6] * 4
    assert all("intermediate" in n or n.endswith("output.dense") and "attention" not in n for n in m.adapted_names)
    seen = _router_probs(m)
    x, labels, task_ids = ids(3, 5), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    torch.manual_seed(0)
    out = m(input_ids=x, labels=labels, task_ids=task_ids)
    sample_down = torch.tensor([True, False, True])
    expert_down = torch.tensor([False] * 3 + [True] * 3)
    losses = []
    for name in m.adapted_names:
        w = seen[name]
        vals = [sum(w[s, t, n].item() for t in range(5)) * (1.1 if expert_down[n] == sample_down[s] else 0.9)
                for n in range(6) for s in range(3)]
        mean = sum(vals) / len(vals)
        losses.append(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / mean**2)
    want = sum(losses) / len(losses)
    assert m.aux_losses["balance"].item() == pytest.approx(want, rel=1e-5)
    m.eval()
    task_loss = torch.nn.functional.cross_entropy(out.logits, labels)
    assert out.loss.item() == pytest.approx(task_loss.item() + 0.3 * want, rel=1e-5)
    m.add_task("d", init_from="b")
    layer = next(layer for _, layer in m.adapter_layers())
    assert layer.task_is_downstream.tolist() == [True, False, False, False]
    m.add_task("e")
    assert m.config.downstream_tasks == ["a", "e"] and layer.task_is_downstream[-1]


# --------------------------------------------------------------------------------------------- MoLA schedules
def test_mola_schedules_and_per_layer_counts():
    assert schedule_counts("inverted_triangle", 4) == [2, 4, 6, 8]
    assert schedule_counts("inverted_triangle", 8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert schedule_counts("triangle", 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    assert schedule_counts("square", 3) == [5, 5, 5]
    m = build_method("mola", tiny_t5(), TASKS)                      # 2 encoder + 2 decoder blocks
    counts = m.experts_per_layer()
    for name, k in counts.items():
        depth = int(name.split("block.")[1].split(".")[0])
        assert k == [2, 6][depth], name
        assert m.base_model.get_submodule(name).lora_A.shape[0] == k
    m = build_method("mola", tiny_t5(), TASKS, experts_per_layer=[3, 4])
    assert set(m.experts_per_layer().values()) == {3, 4}
    with pytest.raises(MoreLoraError, match="lists 3 counts but the adapted layers span 2 depths"):
        build_method("mola", tiny_t5(), TASKS, experts_per_layer=[3, 4, 5])
    with pytest.raises(MoreLoraError, match="top_k=3 exceeds the smallest expert count 2"):
        build_method("mola", tiny_t5(), TASKS, top_k=3)


def test_mola_layers_outside_the_blocks_take_the_nearest_depth():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=20,
                                vocab_size=50, max_position_embeddings=32))
    m = build_method("mola", bert, TASKS, target_modules=["query", "dense"])  # "dense" matches pooler.dense
    counts = m.experts_per_layer()
    assert counts["pooler.dense"] == 8 == counts["encoder.layer.3.output.dense"]   # after the last block
    assert counts["encoder.layer.0.attention.self.query"] == 2
    with pytest.raises(MoreLoraError, match="none of"):
        build_method("mola", torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)}), TASKS, target_modules=["proj"])


# --------------------------------------------------------------------------------------------- MELoRA
def test_melora_block_diagonal_equals_dense_lora():
    m = toy("melora", d_in=8, d_out=12, num_minis=4, r=2)
    layer = m.base_model[0]
    a, b, scale = layer.lora_factors(0)
    assert a.shape == (8, 8) and b.shape == (12, 8) and scale == pytest.approx(32 / 8)
    dense = torch.zeros(12, 8)
    for i in range(4):                    # mini LoRA i: input slice i (2 wide) -> output slice i (3 wide)
        for o in range(3):
            for j in range(2):
                dense[3 * i + o, 2 * i + j] = sum(layer.lora_B[i, o, q] * layer.lora_A[i, q, j] for q in range(2))
    torch.testing.assert_close(b @ a, dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.dense_delta(), dense * scale, atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(dense) <= 8
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = x @ (layer.base_layer.weight + scale * b @ a).T + layer.base_layer.bias
        torch.testing.assert_close(m(x, task_ids=[0] * 4), want, atol=1e-5, rtol=1e-5)
    counts = m.parameter_counts()
    assert counts["adapter"] == 4 * 2 * (2 + 3)           # n * r * (d_in/n + d_out/n)
    with pytest.raises(MoreLoraError, match="must divide by it"):
        toy("melora", d_in=8, d_out=10, num_minis=4)


@pytest.mark.parametrize("name", ["melora", "alora"])
def test_shared_methods_export_to_peft_and_merge(tmp_path, name):
    from peft import PeftModel

    base = tiny_bert()
    fresh = copy.deepcopy(base)
    m = build_method(name, base, TASKS, **opts(name)).eval()
    if name == "alora":
        with torch.no_grad():
            m.base_model.get_submodule(m.adapted_names[0]).rank_mask[:3] = 0.0
            for _, layer in m.adapter_layers():
                layer.lora_lambda.uniform_(0.5, 1.5)
    with torch.no_grad():
        m.base_model.classifier.weight.add_(0.5)
    x = ids(3, 7)
    want = m(input_ids=x, task_ids=["b"] * 3).logits
    assert torch.allclose(m(input_ids=x, task_ids=["a"] * 3).logits, want)     # shared by all tasks
    m.export_lora("b", tmp_path / "b")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "b").eval()
    torch.testing.assert_close(peft_model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
    ranks = {n.removeprefix("base_model.model."): mod.lora_A["default"].weight.shape[0]
             for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    if name == "melora":
        assert set(ranks.values()) == {8}
    else:
        assert ranks[m.adapted_names[0]] == 5 and set(ranks.values()) == {5, 8}
    w0 = {n: layer.base_layer.weight.clone() for n, layer in m.adapter_layers()}
    m.merge_task("a")
    torch.testing.assert_close(m(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
    m.unmerge()
    for n, layer in m.adapter_layers():
        torch.testing.assert_close(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- ALoRA
def test_alora_importance_pruning_and_reallocation():
    m = toy("alora", layers=3, d_in=12, r=2, max_rank=4, prune_start=10, prune_interval=5, prune_end=20,
            prune_ranks=2, importance_beta=0.5).train()
    layers = [m.base_model[i] for i in range(3)]
    x = torch.randn(6, 12)
    m(x, task_ids=[0] * 6).pow(2).sum().backward()
    for layer in layers:     # importance = |sum_tokens z_i dL/dz_i| = |lambda_i dL/dlambda_i| for active ranks
        want = (layer.lora_lambda * layer.lora_lambda.grad).abs() * layer.rank_mask
        torch.testing.assert_close(layer.importance_acc, want, atol=1e-5, rtol=1e-4)
        assert layer.importance_acc[2:].eq(0).all()
    acc = [layer.importance_acc.clone() for layer in layers]
    m.on_step_end(9)                  # folds (EMA 0.5) but prunes nothing: before prune_start
    assert m.rank_allocation() == {"0": 2, "1": 2, "2": 2}
    for layer, a in zip(layers, acc):
        torch.testing.assert_close(layer.importance, 0.5 * a)
        assert layer.importance_acc.eq(0).all()
    with torch.no_grad():
        layers[0].importance.copy_(torch.tensor([0.1, 5.0, 0.0, 0.0]))
        layers[1].importance.copy_(torch.tensor([3.0, 0.2, 0.0, 0.0]))
        layers[2].importance.copy_(torch.tensor([9.0, 8.0, 0.0, 0.0]))
        before = layers[2].lora_A.clone()
    moves = m.prune_and_reallocate(10)
    # rank 0 of layer 0 (0.1) goes to layer 2 (mean 8.5); then rank 1 of layer 1 (0.2): layer 2 again
    assert moves == [("0", "2"), ("1", "2")]
    assert m.rank_allocation() == {"0": 1, "1": 1, "2": 4}
    assert sum(m.rank_allocation().values()) == 6                    # the budget moved, not changed
    assert layers[0].rank_mask.tolist() == [0, 1, 0, 0] and layers[2].rank_mask.tolist() == [1, 1, 1, 1]
    assert layers[2].lora_B[:, 2:].eq(0).all() and not torch.equal(layers[2].lora_A[2:], before[2:])
    # pruned ranks give zero contribution: changing their weights changes nothing
    m.eval()
    with torch.no_grad():
        out = m(x, task_ids=[0] * 6)
        layers[0].lora_A[0].add_(3.0)
        layers[0].lora_B[:, 0].add_(3.0)
        layers[1].lora_lambda[1] = 7.0
        torch.testing.assert_close(m(x, task_ids=[0] * 6), out)
    counts = m.parameter_counts()
    assert counts["adapter"] == 1 * 25 + 1 * 25 + 4 * 25 and counts["per_task"] == pytest.approx(150 / 3)
    # the schedule: steps 10, 15, 20 re-allocate (if another module has a free slot), others only fold
    calls = []
    m.prune_and_reallocate = lambda step: calls.append(step)
    for step in range(8, 26):
        m.on_step_end(step)
    assert calls == [10, 15, 20]


# --------------------------------------------------------------------------------------------- AdaLoRA
def test_adalora_is_peft_and_matches_peft_model():
    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora import AdaLoraLayer

    sched = dict(init_r=6, target_r=4, total_step=10, tinit=0, tfinal=2, deltaT=1, lora_dropout=0.0,
                 init_lora_weights=False)
    base = tiny_bert()
    fresh = copy.deepcopy(base)
    m = build_method("adalora", base, TASKS, **sched).train()
    assert all(isinstance(layer.adalora, AdaLoraLayer) for _, layer in m.adapter_layers())
    ref = get_peft_model(fresh, AdaLoraConfig(lora_alpha=32, target_modules=["query", "value"], task_type="SEQ_CLS",
                                              **sched)).train()     # SEQ_CLS: PEFT adds its orth. regulariser
    own = {n: p for n, p in m.base_model.named_parameters() if ".adalora." in n}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(own[n.removeprefix("base_model.model.").replace(".lora_", ".adalora.lora_")])
    x, labels = ids(4, 6), torch.tensor([0, 1, 2, 0])
    for step in range(1, 5):
        outs = []
        for model in (m, ref):
            torch.manual_seed(step)
            kw = {"task_ids": [0, 1, 2, 0]} if model is m else {}
            out = model(input_ids=x, labels=labels, **kw)
            out.loss.backward()
            outs.append(out)
        torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-5, rtol=1e-5)
        m.on_step_end(step)
        ref.base_model.update_and_allocate(step)
        for n, p in ref.named_parameters():
            if "lora_E" in n:
                torch.testing.assert_close(own[n.removeprefix("base_model.model.").replace(".lora_", ".adalora.lora_")],
                                           p, atol=0, rtol=0)
        m.zero_grad()
        ref.zero_grad()
    assert sum(m.rank_allocation().values()) < 4 * 6                     # the budget shrank
    assert m.config.rank_pattern is not None
    with pytest.raises(MoreLoraError, match="before optimizer.zero_grad"):
        m.on_step_end(5)


# --------------------------------------------------------------------------------------------- common behaviour
@pytest.mark.parametrize("name", TOKEN_ROUTED)
def test_token_routed_refuse_merge_and_export(tmp_path, name):
    m = build_method(name, tiny_bert(), TASKS).eval()
    w0 = {n: layer.base_layer.weight.clone() for n, layer in m.adapter_layers()}
    for call in (lambda: m.merge_task("a"), lambda: m.export_lora("a", tmp_path / "x"),
                 lambda: m.merge_and_unload("a")):
        with pytest.raises(NotImplementedError, match="depends on the input token.*cannot be merged or exported"):
            call()
    assert m.merged_task is None and m.adapted_names
    for n, layer in m.adapter_layers():
        assert torch.equal(layer.base_layer.weight, w0[n])
    assert morelora.get_method(name).routing == "per token" and not morelora.get_method(name).mergeable


@pytest.mark.parametrize("name", FAMILY)
def test_save_load_round_trip(tmp_path, name):
    extra = {"loramoe": {"downstream_tasks": ["b"]}, "mola": {"experts_per_layer": "triangle"}}.get(name, {})
    m = build_method(name, tiny_bert(), TASKS, **opts(name, **extra)).eval()
    if name == "alora":
        m.prune_and_reallocate(0)
        assert m.rank_allocation() != dict.fromkeys(m.adapted_names, 8)
    if name == "adalora":
        m.train()
        m(input_ids=ids(2, 5), labels=torch.tensor([0, 1]), task_ids=[0, 1]).loss.backward()
        m.on_step_end(1)
        m.eval()
    x = ids(3, 6)
    want = m(input_ids=x, task_ids=[0, 1, 2]).logits
    m.save_pretrained(tmp_path / "ckpt")
    loaded = morelora.load_adapter_model(tiny_bert(), tmp_path / "ckpt").eval()
    assert type(loaded) is type(m)
    torch.testing.assert_close(loaded(input_ids=x, task_ids=[0, 1, 2]).logits, want)
    if name in ("alora", "adalora"):
        assert loaded.rank_allocation() == m.rank_allocation()
    if name == "adalora":
        assert loaded.peft_config["default"].rank_pattern == m.peft_config["default"].rank_pattern
    if name == "mola":
        assert loaded.experts_per_layer() == m.experts_per_layer()


def test_config_errors():
    with pytest.raises(MoreLoraError, match="expert_groups must list 6 entries"):
        build_method("loramoe", tiny_bert(), TASKS, expert_groups=["world"] * 5)
    with pytest.raises(MoreLoraError, match=r"downstream_tasks \['z'\] are not among tasks"):
        build_method("loramoe", tiny_bert(), TASKS, downstream_tasks=["z"])
    with pytest.raises(MoreLoraError, match="top_k must be an integer in 1..8"):
        build_method("adamoe", tiny_bert(), TASKS, top_k=9)
    with pytest.raises(MoreLoraError, match="leave no budgeting phase"):
        build_method("adalora", tiny_bert(), TASKS, total_step=10, tinit=5, tfinal=5)
    with pytest.raises(MoreLoraError, match="experts_per_layer must be a list of counts or one of"):
        build_method("mola", tiny_bert(), TASKS, experts_per_layer="diamond")
    with pytest.raises(MoreLoraError, match="max_rank must be an integer >= r=8"):
        build_method("alora", tiny_bert(), TASKS, max_rank=4)
    with pytest.raises(MoreLoraError, match="unknown option"):
        build_method("mov", tiny_bert(), TASKS, r=4)


def test_describe_methods():
    rows = describe_methods()
    assert [r["name"] for r in rows] == list(morelora.METHODS)
    assert all({"name", "description", "routing", "mergeable"} <= set(r) for r in rows)
    base = tiny_bert()
    before = copy.deepcopy(base.state_dict())
    names = ["melora", "mov", "adalora"]
    rows = {r["name"]: r for r in describe_methods(base, {"tasks": TASKS, "methods": {"melora": {"r": 1}}})
            if r["name"] in names}
    for name in names:
        want = build_method(name, tiny_bert(), TASKS, **({"r": 1} if name == "melora" else {})).parameter_counts()
        assert rows[name]["params_per_task"] == pytest.approx(want["per_task"]), name
    assert rows["melora"]["params_per_task"] == pytest.approx(4 * 4 * 1 * (8 + 8) / 3)
    assert not any(type(mod).__name__.endswith("Linear") and hasattr(mod, "base_layer") for mod in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(r["params_per_task"] > 0 for r in describe_methods(base, TASKS) if r["name"] in names)
