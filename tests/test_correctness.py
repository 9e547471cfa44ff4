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
