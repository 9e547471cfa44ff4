"""bfloat16 on CPU, so a GPU run does not meet it first: every method on a bf16 base (mixed batches, backward,
merge, export to PEFT) against the same method on a float32 copy of the bf16 weights, and `train.mixed_precision:
bf16` (autocast) through the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import ids, nontrivial_options, tiny_llama

import morelora

TASKS = ["a", "b", "c"]
METHODS = list(morelora.METHODS)
opts = nontrivial_options


def build(name: str, dtype: torch.dtype):
    base = tiny_llama().to(torch.bfloat16).to(dtype)   # float32: the bf16 weights, upcast exactly
    torch.manual_seed(0)
    return morelora.build_method(name, base, TASKS, **opts(name))


def close_bf16(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within bf16 rounding of the reference's scale (2^-8 relative per op, a few ops deep)."""
    err, scale = (got.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert err <= 0.03 * scale, f"{what}: max error {err:.4g} vs scale {scale:.4g}"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_a_bf16_base(name, tmp_path):
    mb, mf = build(name, torch.bfloat16).eval(), build(name, torch.float32).eval()
    adapter = [p for n, p in mb.named_parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter), "the adapter keeps float32 weights"
    x, task_ids = ids(4, 6), ["a", "c", "b", "a"]
    with torch.no_grad():
        mixed = mb(input_ids=x, task_ids=task_ids).logits
        assert mixed.dtype == torch.bfloat16
        if morelora.METHODS[name].routing != "per token":    # token routers flip near-ties under bf16 rounding
            close_bf16(mixed, mf(input_ids=x, task_ids=task_ids).logits, f"{name} bf16 vs float32")
        for i, t in enumerate(task_ids):                     # a mixed batch = each example run alone
            close_bf16(mixed[i], mb(input_ids=x[i:i + 1], task_ids=[t]).logits[0], f"{name} row {i}")

    mb.train()
    loss = mb(input_ids=x, labels=x, task_ids=task_ids).loss
    loss.backward()
    grads = [p.grad for p in adapter if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    mb.eval()

    if not morelora.METHODS[name].mergeable:
        return
    with torch.no_grad():
        ref_c = mb(input_ids=x, task_ids=["c"] * 4).logits
    from peft import PeftModel

    mb.export_lora("c", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path / "peft").eval()
    with torch.no_grad():
        close_bf16(peft_model(input_ids=x).logits, ref_c, f"{name} PEFT export on the bf16 base")

    weights = {n: p.detach().clone() for n, p in mb.base_model.named_parameters() if n.endswith("base_layer.weight")}
    mb.merge_task("c")
    merged = {n: p.detach().clone() for n, p in mb.base_model.named_parameters() if n in weights}
    assert any(not torch.equal(merged[n], weights[n]) for n in weights)
    with torch.no_grad():
        close_bf16(mb(input_ids=x).logits, ref_c, f"{name} merged")
    mb.unmerge()
    for n, p in mb.base_model.named_parameters():
        if n in weights:   # back to W0 up to bf16 roundings (of dW, of W0 + dW, then of the difference)
            bound = 2**-7 * (merged[n].float().abs() + weights[n].float().abs()) + 1e-7
            assert ((p.float() - weights[n].float()).abs() <= bound).all(), n


def test_bf16_autocast_training_on_cpu(tmp_path, tiny_bert, run_config):
    """train.mixed_precision: bf16 runs under CPU autocast: the losses move off the float32 run's by bf16
    rounding (autocast is on), not by more; the adapter stays float32."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from morelora.config import RunConfig
    from morelora.training import train

    losses = {}
    for mp in ("no", "bf16"):
        cfg = run_config(tiny_bert, tmp_path / mp, mixed_precision=mp, max_steps=3, logging_steps=1, save_steps=0)
        AcceleratorState._reset_state(reset_partial_state=True)   # one process, two precisions: a fresh state each
        try:
            run_dir = train(RunConfig.from_dict(cfg))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[mp] = torch.tensor([r["loss"] for r in rows if "loss" in r])
        state = load_file(str(run_dir / "checkpoint-3" / "adapter" / "adapter_model.safetensors"))
        assert {v.dtype for v in state.values()} == {torch.float32}
    assert len(losses["bf16"]) == 3 and torch.isfinite(losses["bf16"]).all()
    assert not torch.equal(losses["bf16"], losses["no"]), "bf16 autocast was not applied"
    torch.testing.assert_close(losses["bf16"], losses["no"], rtol=0.03, atol=0.0)
