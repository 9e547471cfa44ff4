"""Inference adds the last low-rank product into the base output in place (`add_low_rank`): same numbers as the
autograd path (which the other tests check against dense references), and really taken."""

from __future__ import annotations

import pytest
import torch
from _tiny import ids, tiny_bert, tiny_llama
from torch import nn

import morelora
from morelora.tuners.base import add_low_rank

TASKS = ["a", "b", "c"]
INPLACE = {"more": {}, "moelora": {"num_experts": 2}, "multilora": {}, "dylora": {}, "alora": {}}


def build(name: str, base: nn.Module):
    m = morelora.build_method(name, base, TASKS, r=4, lora_alpha=8.0, lora_dropout=0.0, init_lora_weights=False,
                              **INPLACE[name])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # routers away from their init, so tasks use different ranks / gates
        for _, layer in m.adapter_layers():
            for p in (getattr(layer, "task_embedding", None), getattr(getattr(layer, "gate", None), "weight", None)):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("name", list(INPLACE))
def test_no_grad_output_equals_autograd_path_and_adds_in_place(name, family):
    m = build(name, tiny_bert() if family == "bert" else tiny_llama())
    x, task_ids = ids(5, 7), [2, 0, 1, 2, 1]
    ref = m(input_ids=x, task_ids=task_ids).logits            # grad enabled: result + adapter_forward(x)
    assert ref.requires_grad
    lname, layer = next(iter(m.adapter_layers()))
    seen = {}
    h1 = layer.base_layer.register_forward_hook(lambda mod, i, o: seen.__setitem__("base", o))
    h2 = layer.register_forward_hook(lambda mod, i, o: seen.__setitem__("layer", o))
    try:
        with torch.no_grad():
            got = m(input_ids=x, task_ids=task_ids).logits
            assert seen["layer"] is seen["base"], f"{lname}: the adapter output was not added into the base output"
            layer.inplace_inference_add = False                # the switch: the same numbers, out of place
            off = m(input_ids=x, task_ids=task_ids).logits
            assert seen["layer"] is not seen["base"]
    finally:
        h1.remove(), h2.remove()
        layer.__dict__.pop("inplace_inference_add", None)
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off, ref.detach(), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(m(input_ids=x, task_ids=task_ids).logits, ref.detach(), atol=1e-5, rtol=1e-5)
    if name in ("dylora", "alora"):
        return                                                  # one adapter shared by all tasks
    # the tasks differ, so a wrong per-example pick would show
    with torch.no_grad():
        assert not torch.allclose(m(input_ids=x, task_ids=[0] * 5).logits, m(input_ids=x, task_ids=[1] * 5).logits)


def test_add_low_rank_matches_matmul():
    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(3, 5, 4, generator=g), torch.randn(6, 4, generator=g)
    base = torch.randn(3, 5, 6, generator=g)
    want = base + 0.5 * torch.einsum("bnk,dk->bnd", z, w)
    torch.testing.assert_close(add_low_rank(base.clone(), z, w, 0.5), want)
    torch.testing.assert_close(add_low_rank(None, z, w, 0.5), want - base)
    wb = torch.randn(3, 6, 4, generator=g)                    # one weight per example (MultiLoRA)
    want = base + 2.0 * torch.einsum("bnk,bdk->bnd", z, wb)
    torch.testing.assert_close(add_low_rank(base.clone(), z, wb, 2.0), want)
    torch.testing.assert_close(add_low_rank(None, z, wb, 2.0), want - base)
    out = base.to(torch.bfloat16)                              # result dtype wins, like the autograd path
    assert add_low_rank(out, z, w).dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), base + z @ w.T, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("name", ["more", "multilora"])
def test_bf16_model_in_place_add_matches_autograd_path(name):
    """A bf16 base (as on a GPU): the in-place add casts z and W to the output's dtype like the autograd path."""
    m = build(name, tiny_llama().to(torch.bfloat16))
    x, task_ids = ids(3, 6), [1, 2, 0]
    ref = m(input_ids=x, task_ids=task_ids).logits.detach()
    with torch.no_grad():
        got = m(input_ids=x, task_ids=task_ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
