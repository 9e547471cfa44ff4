"""Where a training step (or a forward) spends its time, per method: torch.profiler's top operators, side by side.

    python bench/profile_step.py [--model minilm] [--mode train|infer] [--steps 5] [--top 10]

The variants are the benchmark's (docs/BENCHMARKS.md): the frozen base, PEFT LoRA, MoRE (8 tasks, r = 8) and the
multi-expert baselines at about MoRE's trainable-parameter count; batch 8 x 64 tokens, 1 CPU thread. Profiler
times are inflated by the profiler itself: read them as shares, and time with `bench/run_bench.py`.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from morelora.bench import harness as b


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=sorted(b.MODELS))
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--baselines", nargs="*", default=["moelora", "multilora"])
    a = p.parse_args()
    torch.set_num_threads(1)
    env = b.Env(torch.device("cpu"), torch.float32)
    base, kind, targets, vocab = b.load_base(a.model, env)
    ids = b.random_input_ids(b.Case(a.model, 8, 64, 1), vocab, env.device)
    variants = {"base": b.Variant("base", b.shared_copy(base), kind).finish(env),
                "peft-lora": b.peft_variant(base, kind, targets, 8, env),
                "more": b.more_variant(base, kind, targets, 8, 8, 8, env)}
    for name in a.baselines:
        v = b.baseline_variant(name, base, kind, targets, 8, 8, 8, variants["more"].params, env)
        if not isinstance(v, str):
            variants[name] = v
    for name, v in variants.items():
        v.model.train(a.mode == "train")
        step = (lambda v=v: v.train_step(ids)) if a.mode == "train" else (lambda v=v: v.infer(ids))
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / a.steps / 1e3
        calls = sum(e.count for e in events) / a.steps
        print(f"\n{name} ({a.model} 8x64 {a.mode}, {v.params:,} trainable): {total:.1f} ms of operator self time, "
              f"{calls:.0f} operator calls per step")
        print("| operator | calls per step | self ms per step | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]:
            ms = e.self_cpu_time_total / a.steps / 1e3
            print(f"| {e.key} | {e.count / a.steps:.0f} | {ms:.1f} | {100 * ms / total:.0f} % |")


if __name__ == "__main__":
    main()
