"""A quantised frozen base (bitsandbytes 4-bit nf4 / 8-bit) against float32, in one run: base memory, MoRE training
step time (ratios to float32, measured side by side), and the demo's average score on a 4-bit base vs float32.

    python bench/quant.py [--models minilm tiny-llama llama-1024] [--steps 10] [--demo-steps 300] [--demo-eval 200]
                          [--demo-out DIR]

Memory is transformers' `get_memory_footprint()` of the loaded base (parameters + buffers). A step is MoRE (r 8,
8 tasks, the query/value or q/v projections) forward + backward + AdamW on a batch of 8 x 64 tokens, 1 CPU thread;
the three storages take turns step by step so that a loaded machine slows them alike: read the ratios, not the
absolute times. The demo is configs/demo.yaml (by default as it is: 300 steps, 200 test examples per task), seed 0,
once in float32 and once with `model.quantization: {bits: 4}` (--demo-steps 0 skips it); the difference of their
averages comes with a paired bootstrap 95 % CI over the test examples (the same examples in both runs) and the
smallest difference this one-seed pair could detect (80 % power; morelora compare's statistics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from morelora import build_method
from morelora.bench import harness as b
from morelora.config import QuantizationConfig, load_config
from morelora.quantization import bnb_config, prepare_quantized

STORAGES = {"float32": None, "8-bit": QuantizationConfig(bits=8), "4-bit nf4": QuantizationConfig(bits=4)}
TASKS = [f"t{i}" for i in range(8)]


def load(path: str, kind: str, q: QuantizationConfig | None) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    if q is None:
        return auto.from_pretrained(path)
    return prepare_quantized(auto.from_pretrained(path, quantization_config=bnb_config(q)), path)


def step_times(name: str, steps: int) -> dict[str, tuple[float, float]]:
    """{storage: (base MiB, median step seconds)} for model `name`."""
    env = b.Env(torch.device("cpu"), torch.float32)
    base, kind, targets, vocab = b.load_base(name, env)
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        models = {}
        for label, q in STORAGES.items():
            m = load(d, kind, q)
            mib = m.get_memory_footprint() / 2**20
            torch.manual_seed(0)
            more = build_method("more", m, TASKS, r=8, lora_alpha=16, target_modules=list(targets)).train()
            opt = torch.optim.AdamW([p for p in more.parameters() if p.requires_grad], lr=1e-4)
            models[label] = (mib, more, opt, [])
    ids = b.random_input_ids(b.Case(name, 8, 64, 1), vocab, torch.device("cpu"))
    task_ids = torch.arange(8) % len(TASKS)
    for i in range(steps + 2):                                  # two warm-up steps, then round-robin timing
        for _, more, opt, times in models.values():
            t0 = time.perf_counter()
            out = more(input_ids=ids, task_ids=task_ids)
            hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
            hidden.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return {label: (mib, statistics.median(times)) for label, (mib, _, _, times) in models.items()}


def demo_run(steps: int, eval_n: int, quantized: bool, out: Path) -> Path:
    """The demo's run folder (trained now, or found finished in ``out``)."""
    from morelora.training import train

    overrides = [f"train.max_steps={steps}", f"data.max_eval_per_task={eval_n}", f"train.output_dir={out}",
                 "train.save_steps=0", "train.eval_steps=0", "train.seed=0"]
    if quantized:
        overrides.append("model.quantization.bits=4")
    if (out / "eval.json").exists():
        return out
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", overrides)
    return train(cfg, resume=(out / "config.yaml").exists())


def paired_difference(quantized: Path, full: Path) -> dict:
    """4-bit minus float32 average score: paired bootstrap over the test examples, CI and MDE (one seed each)."""
    from morelora.experiments.statistics import TaskPredictions, combined_test, paired_bootstrap

    def predictions(run: Path) -> dict[str, TaskPredictions]:
        tasks = json.loads((run / "test_predictions.json").read_text())["tasks"]
        return {t: TaskPredictions([v["predictions"]], v["references"], v["main_metric"], v.get("num_labels"))
                for t, v in tasks.items()}

    boot = paired_bootstrap(predictions(quantized), predictions(full), n_resamples=2000)
    return {**combined_test([boot["diff"]], boot["var"]), "averages": [
        json.loads((r / "eval.json").read_text())["average"] for r in (full, quantized)]}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["minilm", "tiny-llama", "llama-1024"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--demo-steps", type=int, default=300)
    p.add_argument("--demo-eval", type=int, default=200)
    p.add_argument("--demo-out", type=Path, help="keep the two demo runs here (a rerun resumes / reuses them)")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':<12} {'storage':<10} {'base MiB':>9} {'vs fp32':>8} {'step ms':>8} {'vs fp32':>8}")
    for name in a.models:
        rows = step_times(name, a.steps)
        mem0, t0 = rows["float32"]
        for label, (mib, t) in rows.items():
            print(f"{name:<12} {label:<10} {mib:>9.2f} {mib / mem0:>8.3f} {1000 * t:>8.1f} {t / t0:>8.2f}")
    if a.demo_steps:
        with tempfile.TemporaryDirectory() as d:
            out = a.demo_out or Path(d)
            fp = demo_run(a.demo_steps, a.demo_eval, False, out / "fp32")
            q4 = demo_run(a.demo_steps, a.demo_eval, True, out / "nf4")
            r = paired_difference(q4, fp)
        print(f"demo ({a.demo_steps} steps, {a.demo_eval} test examples per task, seed 0): average float32 "
              f"{r['averages'][0]:.4f}, 4-bit nf4 {r['averages'][1]:.4f}; 4-bit - float32 {r['diff']:+.4f} "
              f"(95 % CI {r['ci_low']:+.4f} to {r['ci_high']:+.4f}, p {r['p']:.3f}; detectable with 80 % power: "
              f"{r['mde']:.4f}, test examples only)")


if __name__ == "__main__":
    main()
