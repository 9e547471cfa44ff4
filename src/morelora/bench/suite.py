"""``morelora bench``: MoRE at the cost of plain LoRA, measured side by side (docs/BENCHMARKS.md).

Sections (`run_benchmarks(suite, sections=...)`):

* ``main``   training step (forward + backward + AdamW step) and inference: frozen base, PEFT LoRA, MoRE and the
             registered multi-expert baselines (at the trainable-parameter count closest to MoRE's), plus peak
             memory per method;
* ``mixed``  MoRE on mixed-task vs single-task batches; PEFT's mixed-adapter batch (``adapter_names``);
* ``merge``  ``merge_task(t)`` vs the frozen base;
* ``tasks``  number of tasks 2 -> 256 at a fixed batch;
* ``rank``   rank r 4 -> 64, MoRE vs PEFT LoRA.

How variants are built and timed is :mod:`morelora.bench.harness`'s. `main(argv)` is the command line
(``morelora bench``, ``python -m morelora.bench``, ``python bench/run_bench.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from morelora.bench.harness import (
    DTYPES,
    MODELS,
    Case,
    Env,
    Times,
    Variant,
    added_time,
    baseline_variant,
    load_base,
    median_ci,
    more_variant,
    paired_ratios,
    peak_memory,
    peft_variant,
    quantiles,
    random_input_ids,
    run_mode,
    shared_copy,
    task_names,
)

__all__ = ["BASELINES", "SECTIONS", "SUITES", "TARGETS", "Suite", "configure", "format_report", "main", "ratio_row",
           "run", "run_benchmarks", "target_row", "timing_rows"]

BASELINES = ("moelora", "mixlora", "hydralora", "multilora")
SECTIONS = ("main", "mixed", "merge", "tasks", "rank")
Row = dict[str, Any]


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



# ------------------------------------------------------------------------------------------------ rows
def timing_rows(section: str, case: Case, mode: str, times: Times, wall: Times, variants: dict[str, Variant],
                refs: Sequence[str], env: Env, extra: dict[str, Any] | None = None) -> list[Row]:
    """One timing row per variant: median, minimum, IQR, wall median and the paired ratios to ``refs``."""
    rows = []
    for name, ts in times.items():
        med, p25, p75 = quantiles(ts)
        v = variants[name]
        row = {"kind": "timing", "section": section, "model": case.model, "batch": case.batch, "seq": case.seq,
               "mode": mode, "variant": name, "clock": "cpu" if env.cpu_clock() else "wall",
               "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "iqr_pct": 100 * (p75 - p25) / med,
               "wall_median_ms": 1e3 * statistics.median(wall[name]), "n": len(ts), "trainable_params": v.params,
               "note": v.note, **(extra or {})}
        for ref in refs:
            if ref in times and ref != name:
                row[f"ratio_vs_{ref}"] = statistics.median(paired_ratios(times, name, ref))
        rows.append(row)
    env.log(f"  {section} {case.model} {case.batch}x{case.seq} {mode}: "
            + ", ".join(f"{n} {1e3 * statistics.median(x):.1f} ms" for n, x in times.items()))
    return rows


def target_row(key: str, case: Case, value: float, per_round: Sequence[float], detail: str, mode: str,
               min_ratio: float | None = None, ci: tuple[float, float] | None = None) -> Row:
    """A target row: the figure, the p25-p75 of its per-round values, its 95 % CI (given, or that of the median of
    the per-round values), its limit, PASS/MISS (by the figure) and whether the CI lies wholly on that side of the
    limit ("decided")."""
    limit, what = TARGETS[key]
    strict = key == "vs_baseline"
    ok = value < limit if strict else value <= limit
    _, p25, p75 = quantiles(per_round)
    lo, hi = ci if ci is not None else median_ci(per_round)
    decided = (hi < limit if strict else hi <= limit) if ok else (lo >= limit if strict else lo > limit)
    return {"kind": "target", "target": key, "what": what, "detail": detail, "model": case.model,
            "batch": case.batch, "seq": case.seq, "mode": mode, "value": value, "p25": p25, "p75": p75,
            "ci_low": lo, "ci_high": hi, "min_ratio": min_ratio, "limit": limit, "status": "PASS" if ok else "MISS",
            "decided": bool(decided)}


def ratio_row(key: str, case: Case, times: Times, a: str, b: str, detail: str, mode: str) -> Row:
    """Target row for t_a / t_b (median of paired ratios; min(t_a) / min(t_b) alongside)."""
    per_round = paired_ratios(times, a, b)
    return target_row(key, case, statistics.median(per_round), per_round, detail, mode, min(times[a]) / min(times[b]))



def _bench_main(case: Case, suite: Suite, env: Env, baselines: Sequence[str]) -> list[Row]:
    base, kind, targets, vocab = load_base(case.model, env)
    ids = random_input_ids(case, vocab, env.device)
    variants = {"base": Variant("base", shared_copy(base), kind, note="frozen").finish(env),
                "peft-lora": peft_variant(base, kind, targets, suite.r, env),
                "more": more_variant(base, kind, targets, suite.r, suite.num_tasks, case.batch, env)}
    rows: list[Row] = []
    for name in baselines if case.baselines else ():
        v = baseline_variant(name, base, kind, targets, suite.r, suite.num_tasks, case.batch, variants["more"].params,
                             env)
        if isinstance(v, str):
            rows.append({"kind": "skip", "section": "main", "model": case.model, "note": v})
        else:
            variants[name] = v
    for mode in ("train", "infer") if case.train else ("infer",):
        times, wall, fns = run_mode(variants, mode, ids, case, env)
        rows += timing_rows("main", case, mode, times, wall, variants, ["peft-lora", "base", "more"], env)
        rows.append(ratio_row(f"{mode}_vs_lora", case, times, "more", "peft-lora", "more / peft-lora", mode))
        for name in (n for n in variants if n in baselines):
            detail = (f"more / {name} ({variants[name].note}; params {variants['more'].params:,} vs "
                      f"{variants[name].params:,})")
            rows.append(ratio_row("vs_baseline", case, times, "more", name, detail, mode))
        for name, v in variants.items():          # peak memory of one more step
            rows.append({"kind": "memory", "section": "main", "model": case.model, "batch": case.batch,
                         "seq": case.seq, "mode": mode, "variant": name,
                         "peak_mb": peak_memory(fns[name], env.device) / 2**20,
                         "train_state_mb": 4 * 4 * v.params / 2**20 if mode == "train" else 0.0})
    return rows


def _bench_mixed(case: Case, suite: Suite, env: Env) -> list[Row]:
    base, kind, targets, vocab = load_base(case.model, env)
    ids = random_input_ids(case, vocab, env.device)
    t = suite.num_tasks
    single = more_variant(base, kind, targets, suite.r, t, case.batch, env)
    mixed = more_variant(base, kind, targets, suite.r, t, case.batch, env, mixed=True)
    train = {"more": single, "more-mixed": mixed}
    times, wall, _ = run_mode(train, "train", ids, case, env)
    rows = timing_rows("mixed", case, "train", times, wall, train, ["more"], env, {"tasks": t})
    rows.append(ratio_row("mixed_vs_single", case, times, "more-mixed", "more", "train, more mixed / single", "train"))
    peft_mixed = f"peft-mixed-{t}"
    variants = {"base": Variant("base", shared_copy(base), kind, note="frozen").finish(env),
                "peft-lora": peft_variant(base, kind, targets, suite.r, env), **train,
                peft_mixed: peft_variant(base, kind, targets, suite.r, env, n_adapters=t, batch=case.batch)}
    times, wall, _ = run_mode(variants, "infer", ids, case, env)
    rows += timing_rows("mixed", case, "infer", times, wall, variants, ["more", "base", "peft-lora"], env,
                         {"tasks": t})
    rows.append(ratio_row("mixed_vs_single", case, times, "more-mixed", "more", "infer, more mixed / single", "infer"))
    mins = {k: min(times[k]) for k in ("more-mixed", peft_mixed, "base")}
    value, per_round, ci = added_time(times, "more-mixed", peft_mixed, "base")
    rows.append(target_row("added_vs_peft_mixed", case, value, per_round,
                        f"infer, (more-mixed - base) / ({peft_mixed} - base), medians of paired differences", "infer",
                        (mins["more-mixed"] - mins["base"]) / max(mins[peft_mixed] - mins["base"], 1e-12), ci))
    return rows


def _bench_merge(case: Case, suite: Suite, env: Env) -> list[Row]:
    from morelora.methods import build_method

    base, kind, targets, vocab = load_base(case.model, env)
    ids = random_input_ids(case, vocab, env.device)
    merged = build_method("more", copy.deepcopy(base), task_names(suite.num_tasks), r=suite.r, lora_alpha=4 * suite.r,
                          lora_dropout=0.1, target_modules=list(targets), init_lora_weights=False)
    merged.merge_task(0)                          # writes the weights: this copy owns its own
    variants = {"base": Variant("base", base, kind, note="frozen"),
                "more-merged": Variant("more-merged", merged, kind, note="merge_task(0), called without task_ids"),
                "more": more_variant(base, kind, targets, suite.r, suite.num_tasks, case.batch, env)}
    times, wall, _ = run_mode(variants, "infer", ids, case, env)
    return timing_rows("merge", case, "infer", times, wall, variants, ["base"], env) + [
        ratio_row("merged_vs_base", case, times, "more-merged", "base", "infer, merged / base", "infer")]


def _bench_tasks(suite: Suite, env: Env) -> list[Row]:
    case = suite.tasks_case
    base, kind, targets, vocab = load_base(case.model, env)
    ids = random_input_ids(case, vocab, env.device)
    variants = {f"more-T{t}": more_variant(base, kind, targets, suite.r, t, case.batch, env, mixed=True)
                for t in suite.task_counts}
    for n, v in variants.items():
        v.name, v.note = n, "mixed-task batch"
    variants["peft-lora"] = peft_variant(base, kind, targets, suite.r, env)
    lo, hi = f"more-T{suite.task_counts[0]}", f"more-T{suite.task_counts[-1]}"
    rows: list[Row] = []
    for mode in ("train", "infer"):
        times, wall, _ = run_mode(variants, mode, ids, case, env)
        rows += timing_rows("tasks", case, mode, times, wall, variants, [lo, "peft-lora"], env)
        rows.append(ratio_row("tasks_flat", case, times, hi, lo, f"{mode}, {hi} / {lo}", mode))
    return rows


def _bench_rank(suite: Suite, env: Env) -> list[Row]:
    case = suite.rank_case
    base, kind, targets, vocab = load_base(case.model, env)
    ids = random_input_ids(case, vocab, env.device)
    variants: dict[str, Variant] = {}
    for r in suite.ranks:
        for v in (more_variant(base, kind, targets, r, suite.num_tasks, case.batch, env),
                  peft_variant(base, kind, targets, r, env)):
            v.name = f"{v.name}-r{r}"
            variants[v.name] = v
    rows: list[Row] = []
    for mode in ("train", "infer"):
        times, wall, _ = run_mode(variants, mode, ids, case, env)
        rows += timing_rows("rank", case, mode, times, wall, variants, [], env)
        rows += [ratio_row(f"{mode}_vs_lora", case, times, f"more-r{r}", f"peft-lora-r{r}", f"r={r}, more / peft-lora",
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


