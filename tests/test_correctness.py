"""Correctness fixes of 2026-12-01 (docs/METHOD.md, "Correctness fixes"): task-id checks on every device,
bit-exact merge/unmerge, gradient checkpointing for every method, adapter configs checked on load."""

from __future__ import annotations

import pytest
import torch
from _tiny import ids, tiny_bert

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
