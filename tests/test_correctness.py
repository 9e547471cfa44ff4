"""Correctness fixes of 2026-12-01 (docs/METHOD.md, "Correctness fixes"): task-id checks on every device,
bit-exact merge/unmerge, gradient checkpointing for every method, adapter configs checked on load; and
`disable_adapter()` (the frozen base model) for every method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny import ids, nontrivial_options, tiny_bert, tiny_llama

import morelora
from morelora import MoreLoraError

TASKS = ["a", "b", "c"]


# ------------------------------------------------------------------------ task ids checked on every device
class _ReportsCuda(torch.Tensor):
    """A CPU tensor that reports a GPU device, so code that branches on `ids.device` takes its GPU path here."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def _on_gpu(values: list[int]) -> torch.Tensor:
    t = torch.tensor(values).as_subclass(_ReportsCuda)
    assert t.device.type == "cuda"
    return t


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


@pytest.mark.parametrize("name", ["more", "multilora"])
def test_task_ids_checked_off_cpu(name):
    m = morelora.build_method(name, tiny_bert(), TASKS, init_lora_weights=False).eval()
    x = ids(1, 5).repeat(2, 1)   # one input twice: row 0 as task a, row 1 as task b
    want = m(input_ids=x, task_ids=torch.tensor([0, 1])).logits
    assert not torch.allclose(want[0], want[1])
    torch.testing.assert_close(_plain(m(input_ids=x, task_ids=_on_gpu([0, 1])).logits), want)
    with pytest.raises(MoreLoraError, match=r"task id 3 is out of range: this model has 3 tasks \(ids 0..2\)"):
        m(input_ids=x, task_ids=_on_gpu([0, 3]))
    with pytest.raises(MoreLoraError, match="task id -1 is out of range"):
        m.resolve_task_ids(_on_gpu([-1, 1]))
    m.merge_task("b")
    torch.testing.assert_close(_plain(m(input_ids=x, task_ids=_on_gpu([1, 1])).logits), want[1:].expand(2, -1),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(MoreLoraError, match=r"task 'b' is merged; unmerge\(\) before running other tasks"):
        m(input_ids=x, task_ids=_on_gpu([1, 0]))


# ------------------------------------------------------------------------ merge / unmerge bit-exact
def _base_weights(m) -> dict[str, torch.Tensor]:
    """The base weight of every adapted layer (PEFT's LoRA layers: `get_base_layer()`)."""
    layers = {n: layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
              for n, layer in m.adapter_layers()}
    return {n: lin.weight.detach().clone() for n, lin in layers.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["more", "multilora", "lora"])
def test_merge_unmerge_cycles_restore_base_weights_exactly(name, dtype):
    m = morelora.build_method(name, tiny_bert().to(dtype), TASKS, init_lora_weights=False, lora_dropout=0.0).eval()
    w0 = _base_weights(m)
    x = ids(2, 5)
    m.merge_task("c")
    merged, want = _base_weights(m), m(input_ids=x).logits
    m.unmerge()
    assert any(not torch.equal(merged[n], w0[n]) for n in w0)   # the merge changed the weights
    for cycle in range(10):
        m.merge_task("c" if cycle % 2 else "a")
        m.unmerge()
        now = _base_weights(m)
        drifted = [n for n in w0 if not torch.equal(now[n], w0[n])]
        assert not drifted, f"cycle {cycle}: base weights of {drifted} differ from the original"
    m.merge_task("c")
    assert all(torch.equal(v, merged[n]) for n, v in _base_weights(m).items())
    torch.testing.assert_close(m(input_ids=x).logits, want, atol=0, rtol=0)
    m.unmerge()
    plain = m.merge_and_unload("c")   # W0 is not kept once the adapter layers are gone
    torch.testing.assert_close(plain(input_ids=x).logits, want, atol=0, rtol=0)


# ------------------------------------------------------------------------ gradient checkpointing, every method
def _nontrivial(name: str) -> dict:
    """Options giving every method a non-zero adapter at init (dropout left at its default: RNG replay is tested)."""
    return {"init_ia3_weights": False} if name == "mov" else {"init_lora_weights": False}


def _step(model, x: torch.Tensor, labels: torch.Tensor, seed: int):
    """(loss, aux losses, parameter gradients) of one training step from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=x, labels=labels, task_ids=["a", "c"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in model.aux_losses.items()}, grads


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_checkpointing_matches_plain_run_for_every_method(family, reentrant):
    make = {"llama": tiny_llama, "bert": tiny_bert}[family]
    x = ids(2, 6)
    labels = x if family == "llama" else torch.tensor([0, 2])
    for name in [*morelora.METHODS, "more (per-layer routing)"]:
        ref = morelora.build_method(name.split()[0], make(), TASKS, **_nontrivial(name)).train()
        if name != "more":
            ref._grouped_routing = False   # MoRE's reference path (no effect on other methods)
        gc = copy.deepcopy(ref)
        gc.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        calls = []
        next(gc.adapter_layers())[1].register_forward_hook(lambda *_, calls=calls: calls.append(1))
        for seed in (0, 1):   # a second step: nothing the first one's recomputation left behind may change it
            want, got = _step(ref, x, labels, seed), _step(gc, x, labels, seed)
            assert len(calls) == 2 * (seed + 1), f"{name}: the layer was not recomputed in backward"
            torch.testing.assert_close(got[0], want[0], msg=f"{name}: loss")
            assert got[1].keys() == want[1].keys(), name
            for k in want[1]:
                torch.testing.assert_close(got[1][k], want[1][k], msg=f"{name}: aux loss {k}")
            assert got[2].keys() == want[2].keys() and want[2], name
            for k in want[2]:
                torch.testing.assert_close(got[2][k], want[2][k], msg=f"{name}: gradient of {k}")
            for (k, b), (_, b_ref) in zip(gc.named_buffers(), ref.named_buffers()):   # e.g. ALoRA's importance
                torch.testing.assert_close(b, b_ref, msg=f"{name}: buffer {k}")
            assert gc.call_state is None, name
            for _, layer in gc.adapter_layers():   # nothing kept after the step (no second copy of any input)
                left = [n for n in ("call_state", "aux_loss") if getattr(layer, n, None) is not None]
                assert not left, f"{name}: {left} still set on a layer after backward"


def test_run_config_gradient_checkpointing_trains_the_same(tmp_path, request, run_config):
    from morelora.config import ConfigError, RunConfig
    from morelora.training import load_run, train
    from morelora.training.build import enable_gradient_checkpointing

    path = request.getfixturevalue("tiny_llama")
    rows = {}
    for on in (False, True):
        cfg = run_config(path, tmp_path / f"gc_{on}", max_steps=3, save_steps=0, logging_steps=1)
        cfg["tasks"] = ["sst2", "arc_easy"]
        cfg["data"]["max_eval_per_task"] = 2
        cfg["method"].update(target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
        cfg["model"]["gradient_checkpointing"] = on
        run_dir = train(RunConfig.from_dict(cfg))
        rows[on] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert load_run(run_dir).model.base_model.is_gradient_checkpointing == on
    losses = [{k: v for k, v in r.items() if "loss" in k or k == "contrastive"} for r in rows[False]]
    assert len(losses) >= 3 and all(losses)
    assert [{k: r[k] for k in want} for r, want in zip(rows[True], losses)] == \
        [pytest.approx(want, rel=1e-5) for want in losses]
    with pytest.raises(ConfigError, match="model.gradient_checkpointing: Linear does not support gradient "
                                          "checkpointing in transformers; set model.gradient_checkpointing to false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------ adapter config checked on load
_LOW = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}
LOAD_OPTIONS = {"more": _LOW, "multilora": _LOW, "moelora": {**_LOW, "num_experts": 2}, "lora": _LOW}


def _trained_like(name: str, tasks: list[str], **kw):
    """`name` on the same tiny BERT, with random adapter weights (so tasks differ) drawn from a fixed seed."""
    m = morelora.build_method(name, tiny_bert(), tasks, **{**LOAD_OPTIONS[name], **kw}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.adapter_state_dict():
            t = m.base_model.get_parameter(p)
            t.copy_(torch.randn(t.shape, generator=g))
    return m


@pytest.mark.parametrize("name", ["more", "multilora", "moelora", "lora"])
def test_checkpoint_with_tasks_in_another_order_is_remapped_by_name(tmp_path, name):
    m = _trained_like(name, TASKS)
    m.save_pretrained(tmp_path / "ad")
    x = ids(1, 5)
    want = {t: m(input_ids=x, task_ids=[t]).logits for t in TASKS}
    assert name == "lora" or not torch.allclose(want["a"], want["b"])
    other = morelora.build_method(name, tiny_bert(), ["c", "a", "b"], **LOAD_OPTIONS[name]).eval()
    other.load_adapter(tmp_path / "ad")
    for t in TASKS:
        torch.testing.assert_close(other(input_ids=x, task_ids=[t]).logits, want[t], msg=t)
    loaded = morelora.load_adapter_model(tiny_bert(), tmp_path / "ad").eval()   # from_pretrained still works
    torch.testing.assert_close(loaded(input_ids=x, task_ids=["b"]).logits, want["b"])


@pytest.mark.parametrize("name,changes,message", [
    ("more", {"lora_alpha": 16.0}, "lora_alpha: checkpoint 8.0, this model 16.0"),
    ("more", {"rank_scaling": "none"}, "rank_scaling: checkpoint 'linear', this model 'none'"),
    ("multilora", {"lora_alpha": 4.0, "r": 4}, "lora_alpha: checkpoint 8.0, this model 4.0"),
    ("moelora", {"num_experts": 4}, "num_experts: checkpoint 2, this model 4"),
])
def test_checkpoint_with_another_config_is_refused(tmp_path, name, changes, message):
    _trained_like(name, TASKS).save_pretrained(tmp_path / "ad")
    opts = {**LOAD_OPTIONS[name], **changes}
    other = morelora.build_method(name, tiny_bert(), TASKS, **opts)
    with pytest.raises(morelora.CheckpointError, match=rf"saved with another adapter config: .*{message}"):
        other.load_adapter(tmp_path / "ad")
    other = morelora.build_method(name, tiny_bert(), ["a", "b", "d"], **LOAD_OPTIONS[name])
    with pytest.raises(morelora.CheckpointError, match=r"tasks: checkpoint \['a', 'b', 'c'\], this model \['a', 'b', "
                                                       r"'d'\]"):
        other.load_adapter(tmp_path / "ad")
    other = morelora.build_method(name, tiny_bert(), TASKS, **LOAD_OPTIONS[name], init_lora_weights=False)
    other.load_adapter(tmp_path / "ad")   # an init-only field may differ: the checkpoint replaces those weights


def test_per_task_heads_follow_the_task_names(tmp_path):
    from morelora.data import get_task
    from morelora.heads import MultiTaskHeadModel

    def build(names):
        torch.manual_seed(0)
        backbone = tiny_bert().bert
        heads = MultiTaskHeadModel(backbone, [get_task(n) for n in names])
        return morelora.build_method("more", heads, names, **_LOW)

    names = ["sst2", "rte", "arc_easy"]
    m = build(names)
    with torch.no_grad():
        for head in m.base_model.heads:
            head.weight.normal_()
    m.save_pretrained(tmp_path / "ad")
    other = build(["rte", "arc_easy", "sst2"])
    other.load_adapter(tmp_path / "ad")
    for t in names:
        got, want = other.base_model.heads[other.tasks.index(t)], m.base_model.heads[names.index(t)]
        assert torch.equal(got.weight, want.weight), t


# ------------------------------------------------------------------------ disable_adapter, every method
def _grad_flags(m) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("name", list(morelora.METHODS))
def test_disable_adapter_runs_the_base_model_for_every_method(name):
    x, task_ids = ids(3, 5), ["a", "c", "b"]
    for family, make in (("bert", tiny_bert), ("llama", tiny_llama)):
        base = make()   # an independent copy of the base model (same seed, same weights)
        m = morelora.build_method(name, make(), TASKS, **nontrivial_options(name)).eval()
        # a non-default flag: PEFT's own switch (enable_adapters(True), the LoRA method's) would set it True
        next(p for p in m.parameters() if p.requires_grad).requires_grad_(False)
        flags = _grad_flags(m)
        with torch.no_grad():
            want = base(input_ids=x).logits
            adapted = m(input_ids=x, task_ids=task_ids).logits
            assert not torch.equal(adapted, want), f"{name}/{family}: the adapter changes nothing: the test is void"
            with m.disable_adapter():
                assert m.adapter_disabled
                torch.testing.assert_close(m(input_ids=x, task_ids=task_ids).logits, want, atol=0, rtol=0)
                with m.disable_adapter():   # nested: still the base model, and still after the inner block
                    torch.testing.assert_close(m(input_ids=x, task_ids=task_ids).logits, want, atol=0, rtol=0)
                torch.testing.assert_close(m(input_ids=x, task_ids=task_ids).logits, want, atol=0, rtol=0)
                if family == "llama":
                    torch.testing.assert_close(
                        m.generate(input_ids=x, task_ids=task_ids, max_new_tokens=3, do_sample=False),
                        base.generate(input_ids=x, max_new_tokens=3, do_sample=False), atol=0, rtol=0)
            assert not m.adapter_disabled
            assert torch.equal(m(input_ids=x, task_ids=task_ids).logits, adapted), f"{name}/{family}: not restored"
            with pytest.raises(RuntimeError, match="in the block"):
                with m.disable_adapter():
                    raise RuntimeError("in the block")
            assert torch.equal(m(input_ids=x, task_ids=task_ids).logits, adapted), f"{name}/{family}: after a raise"
        assert _grad_flags(m) == flags, f"{name}/{family}: requires_grad flags changed"
        assert "adapter_disabled" not in json.dumps(sorted(m.state_dict()))

        # training mode with autograd: the base model's dropout draws (seeded alike), no auxiliary loss, and on the
        # encoder the gradients reach the task head only
        m.train(), base.train()
        labels = x if family == "llama" else torch.tensor([0, 2, 1])
        torch.manual_seed(3)
        want = base(input_ids=x, labels=labels)
        with m.disable_adapter():
            torch.manual_seed(3)
            out = m(input_ids=x, labels=labels, task_ids=task_ids)
        torch.testing.assert_close(out.logits, want.logits, atol=0, rtol=0, msg=f"{name}/{family}: train mode")
        torch.testing.assert_close(out.loss, want.loss, atol=0, rtol=0)
        assert m.aux_losses == {} and m.call_state is None
        if family == "bert":
            out.loss.backward()
            got = sorted(n for n, p in m.named_parameters() if p.grad is not None)
            assert got and all(".classifier." in f".{n}" for n in got), f"{name}: gradients of {got}"
        assert _grad_flags(m) == flags, f"{name}/{family}: requires_grad flags changed (train mode)"


@pytest.mark.parametrize("name", ["more", "lora"])
def test_disable_adapter_refused_while_a_task_is_merged(name):
    m = morelora.build_method(name, tiny_bert(), TASKS, **nontrivial_options(name)).eval()
    m.merge_task("b")
    with pytest.raises(MoreLoraError, match=r"task 'b' is merged into the base weights, which then contain the "
                                            r"adapter: call model.unmerge\(\) before disable_adapter\(\)"):
        with m.disable_adapter():
            pass
    assert not m.adapter_disabled and m.merged_task == 1
    m.unmerge()
    with m.disable_adapter():
        with pytest.raises(MoreLoraError, match=r"cannot merge a task inside disable_adapter\(\)"):
            m.merge_task("b")
        with pytest.raises(MoreLoraError, match=r"cannot merge and unload inside disable_adapter\(\)"):
            m.merge_and_unload("b")
    assert m.merged_task is None
