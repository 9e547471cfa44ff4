"""Inference-path options, side by side in one process: the in-place add of the last low-rank product (the default,
`TaskAdapterLayer.inplace_inference_add`) against `result + adapter(x)`, and a prototype of rank truncation.

    python bench/inference_add.py [--models minilm llama-1024] [--repeats 30]

Per model (batch 8 x 64 tokens, 8 tasks, r = 8, CPU clock, 1 thread) it times inference of: the frozen base, PEFT
LoRA, PEFT's mixed-adapter batch (8 adapters), MoRE on a single-task and on a mixed batch with the in-place add
and with it switched off, and a prototype that runs only the ranks the batch's tasks use (not in the library:
see docs/BENCHMARKS.md). It prints each variant's added time over the base and the paired ratios with the 95 %
CI of their median.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from morelora.bench import harness as b
from morelora.tuners.base import TaskAdapterLayer, per_example
from morelora.tuners.more.layer import MoRELinear


def _truncated_parts(self: MoRELinear, x: torch.Tensor, task_ids: torch.Tensor):
    """Prototype: MoRE's low-rank parts over the first K ranks only (K = the batch's largest task rank, set below)."""
    coef = self._batch_coefficients(task_ids)
    k = self._proto_k
    z = F.linear(x, self.lora_A[:k])
    return z * per_example(coef[:, :k], z), self.lora_B[:, :k], 1.0


def _wrapped(fn: Callable[[], None], *, inplace: bool = True, truncate: bool = False) -> Callable[[], None]:
    def call() -> None:
        saved = MoRELinear.low_rank_parts, TaskAdapterLayer.inplace_inference_add
        TaskAdapterLayer.inplace_inference_add = inplace
        if truncate:
            MoRELinear.low_rank_parts = _truncated_parts
        try:
            fn()
        finally:
            MoRELinear.low_rank_parts, TaskAdapterLayer.inplace_inference_add = saved
    return call


def run(model: str, repeats: int) -> None:
    env = b.Env(torch.device("cpu"), torch.float32)
    base, kind, targets, vocab = b.load_base(model, env)
    case = b.Case(model, 8, 64, repeats)
    ids = b.random_input_ids(case, vocab, env.device)
    v = {"base": b.Variant("base", b.shared_copy(base), kind).finish(env),
         "peft-lora": b.peft_variant(base, kind, targets, 8, env),
         "peft-mixed-8": b.peft_variant(base, kind, targets, 8, env, n_adapters=8, batch=8),
         "more": b.more_variant(base, kind, targets, 8, 8, 8, env),
         "more-mixed": b.more_variant(base, kind, targets, 8, 8, 8, env, mixed=True)}
    fns = {name: (lambda x=x: x.infer(ids)) for name, x in v.items()}
    for name in ("more", "more-mixed"):
        fns[f"{name} (out of place)"] = _wrapped(fns[name], inplace=False)
    ks = []
    for _, layer in v["more"].model.adapter_layers():
        layer._proto_k = layer.task_ranks()[0]          # single-task batch: task 0's rank in this layer
        ks.append(layer._proto_k)
    fns["more (prototype: first K ranks)"] = _wrapped(fns["more"], truncate=True)
    for x in v.values():
        x.model.eval()
    times, _ = b.time_rounds(fns, repeats, env)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(f"\n{model} 8x64, inference, {repeats} rounds, CPU clock (mean rank of task 0 over layers "
          f"{sum(ks) / len(ks):.2f} of 8)\n")
    print("| variant | median ms | added over base ms |\n|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m:.1f} | {m - med['base']:.1f} |")
    print("\n| figure | value | 95% CI of median |\n|---|---|---|")
    for a, c in (("more", "more (out of place)"), ("more-mixed", "more-mixed (out of place)"),
                 ("more", "peft-lora"), ("more (out of place)", "peft-lora"),
                 ("more (prototype: first K ranks)", "more"), ("more-mixed", "more")):
        pr = b.paired_ratios(times, a, c)
        lo, hi = b.median_ci(pr)
        print(f"| {a} / {c} | {statistics.median(pr):.3f} | {lo:.3f}-{hi:.3f} |")
    for a in ("more-mixed", "more-mixed (out of place)"):
        value, _, (lo, hi) = b.added_time(times, a, "peft-mixed-8", "base")
        print(f"| added: ({a} - base) / (peft-mixed-8 - base) | {value:.3f} | {lo:.3f}-{hi:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "llama-1024"], choices=sorted(b.MODELS))
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    for model in a.models:
        run(model, a.repeats)


if __name__ == "__main__":
    main()
