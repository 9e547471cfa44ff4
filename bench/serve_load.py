"""Load test of `morelora serve`, several servers side by side in one process (loopback only, bounded).

    python bench/serve_load.py [--requests 240] [--rounds 4] [--concurrency 1 8 32] [--time-limit 120] [--quick]

Eight classification tasks with the same inputs (SST-2 sentences, one task file per task) on the bundled MiniLM,
so that every variant does the same work per request and only the task mix differs. Each variant is a server
(`morelora.serve.create_app`, the same code as `morelora serve`) on 127.0.0.1:

* ``more-mixed``: MoRE, each request drawn from the 8 tasks (the server batches them together)
* ``more-1task``: the same MoRE server, every request for one task
* ``peft-mixed``: PEFT LoRA with one adapter per task, batches run with ``adapter_names`` (PEFT's mixed batch)
* ``base``: the frozen base model (task heads only)

All servers run at once, and the variants are measured in rounds, each round in a rotated order, so that a
change in the machine's load between minutes falls on every variant alike (run one variant after another and
the ratios measure the load drift). In a round, a closed loop at each concurrency (C clients, each sending one
single-input request after the other; a fixed request count and a time limit) gives throughput and latency; the
best throughput over concurrency is the variant's saturation in that round, and the ratios are taken within
the round. Then an open loop at 80 % of that round's MoRE-mixed saturation (requests at fixed intervals) gives
p50 / p99 there. The report: median throughput over rounds, latency quantiles of all requests, each ratio's
median and range over rounds. Untrained adapters (random B): the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from torch import nn

from morelora.config import RunConfig
from morelora.serve import BackgroundServer, ServeOptions
from morelora.training.build import build_base_model, build_run

TASKS = [f"sst2_{i}" for i in range(8)]


class PeftPerTask(nn.Module):
    """PEFT LoRA, one adapter per task, behind the `task_ids` interface the server uses (``adapter_names``)."""

    def __init__(self, model: nn.Module, tasks: list[str], r: int, targets: list[str]) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        self.tasks = tasks
        self.peft = get_peft_model(model, cfg, adapter_name=tasks[0])
        for t in tasks[1:]:
            self.peft.add_adapter(t, cfg)

    def forward(self, input_ids: torch.Tensor, task_ids: torch.Tensor, **kwargs):
        rows = input_ids.shape[1] if input_ids.dim() == 3 else 1   # (B, C, L) runs as (B*C, L)
        names = [self.tasks[i] for i in task_ids.repeat_interleave(rows).tolist()]
        return self.peft(input_ids=input_ids, task_ids=task_ids, adapter_names=names, **kwargs)


def build_runs(folder: Path, max_length: int) -> dict:
    from morelora.data import get_task

    sst2 = get_task("sst2").load(max_train=64, max_eval=256)
    path = folder / "sst2.jsonl"
    with path.open("w") as f:
        for split in ("train", "test"):
            for ex in sst2[split]:
                f.write(json.dumps({"text": ex["text"], "label": ex["label"], "split": split}) + "\n")
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "minilm", "max_length": max_length},
        "tasks": TASKS, "task_files": {t: {"path": str(path), "kind": "classification"} for t in TASKS},
        "method": {"name": "more", "r": 8, "lora_alpha": 16, "init_lora_weights": False},
        "train": {"output_dir": str(folder / "unused")},
    })
    more = build_run(cfg)
    _, base = build_base_model(cfg, "encoder", more.specs)
    _, peft_base = build_base_model(cfg, "encoder", more.specs)
    targets = sorted({n.rsplit(".", 1)[-1] for n in more.model.adapted_names})
    texts = [ex["text"] for ex in more.data[0]["test"]
             if len(more.tokenizer(ex["text"])["input_ids"]) <= max_length]
    runs = {"more": more, "peft": replace(more, model=PeftPerTask(peft_base, TASKS, 8, targets).eval()),
            "base": replace(more, model=base.eval())}
    return {"runs": runs, "texts": texts}


async def _timed_request(http: httpx.AsyncClient, texts: list[str], tasks: list[str], i: int,
                         latencies: list[float]) -> None:
    """Request ``i`` of the mixed-task stream (task i mod T, input i mod N); its latency goes to ``latencies``."""
    t0 = time.perf_counter()
    r = await http.post("/v1/predict", json={"task": tasks[i % len(tasks)], "inputs": [texts[i % len(texts)]]})
    r.raise_for_status()
    latencies.append(time.perf_counter() - t0)


async def closed_loop(url: str, texts: list[str], tasks: list[str], concurrency: int, requests: int,
                      limit_s: float) -> dict:
    latencies: list[float] = []
    counter = iter(range(requests))
    stop = time.perf_counter() + limit_s

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > stop:
                return
            await _timed_request(http, texts, tasks, i, latencies)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=256)) as http:
        await client_warmup(http, texts, tasks)
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
    return _summary(latencies, elapsed)


async def open_loop(url: str, texts: list[str], tasks: list[str], rate: float, requests: int) -> dict:
    latencies: list[float] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        await _timed_request(http, texts, tasks, i, latencies)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=256)) as http:
        await client_warmup(http, texts, tasks)
        t0 = time.perf_counter()
        jobs = []
        for i in range(requests):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            jobs.append(asyncio.create_task(one(http, i)))
        await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - t0
    return _summary(latencies, elapsed)


async def client_warmup(http: httpx.AsyncClient, texts: list[str], tasks: list[str]) -> None:
    for t in tasks:
        (await http.post("/v1/predict", json={"task": t, "inputs": texts[:1]})).raise_for_status()


def _quantiles(sorted_latencies: list[float]) -> list[float]:
    lat = sorted_latencies
    return statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99


def _summary(latencies: list[float], elapsed: float) -> dict:
    q = _quantiles(sorted(latencies))
    return {"n": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "latencies": latencies}


def _rounds_table(rounds: list[dict[str, dict[int, dict]]]) -> dict[str, dict[int, dict]]:
    """Pool the rounds: per variant and concurrency, the median throughput and the pooled latency quantiles."""
    table: dict[str, dict[int, dict]] = {}
    for name in rounds[0]:
        for c in rounds[0][name]:
            runs = [r[name][c] for r in rounds]
            lat = sorted(x for r in runs for x in r["latencies"])
            q = _quantiles(lat)
            table.setdefault(name, {})[c] = {"n": len(lat), "rps": statistics.median(r["rps"] for r in runs),
                                             "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}
    return table


def saturation(round_: dict[str, dict[int, dict]]) -> dict[str, float]:
    """Best throughput over the concurrency levels, per variant, in one round."""
    return {name: max(r["rps"] for r in rows.values()) for name, rows in round_.items()}


def ratios(rounds: list[dict[str, dict[int, dict]]]) -> dict[str, list[float]]:
    """Per round: MoRE mixed's saturation over each other variant's (measured minutes apart at most)."""
    out: dict[str, list[float]] = {}
    for round_ in rounds:
        sat = saturation(round_)
        for other in ("more-1task", "peft-mixed", "base"):
            out.setdefault(other, []).append(sat["more-mixed"] / sat[other])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=240, help="requests per variant and concurrency, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs every variant once, in rotated order")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per measurement at most")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--json", type=Path, help="also write every measurement (and its latencies) here")
    p.add_argument("--quick", action="store_true", help="48 requests, 2 rounds, concurrency 1 and 8 (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.concurrency = 48, 2, [1, 8]
    per_round = max(2, args.requests // args.rounds)
    torch.set_num_threads(1)
    options = ServeOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=1024)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_runs(Path(tmp), args.max_length)
    runs, texts = built["runs"], built["texts"]
    variants = [("more-mixed", "more", TASKS), ("more-1task", "more", TASKS[:1]), ("peft-mixed", "peft", TASKS),
                ("base", "base", TASKS)]
    rounds: list[dict[str, dict[int, dict]]] = []
    open_rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        servers = {key: stack.enter_context(BackgroundServer(run, options)) for key, run in runs.items()}
        for k in range(args.rounds):
            order = variants[k % len(variants):] + variants[:k % len(variants)]
            round_: dict[str, dict[int, dict]] = {}
            for name, key, tasks in order:
                for c in args.concurrency:
                    r = asyncio.run(closed_loop(servers[key].url, texts, tasks, c, per_round, args.time_limit))
                    round_.setdefault(name, {})[c] = r
                    print(f"round {k + 1}/{args.rounds} {name:<11} c={c:<3} {r['rps']:7.1f} req/s  p50 "
                          f"{r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  ({r['n']} requests)", flush=True)
            rounds.append({name: round_[name] for name, _, _ in variants})
            rate = 0.8 * saturation(round_)["more-mixed"]   # 80 % of this round's saturation
            at80 = asyncio.run(open_loop(servers["more"].url, texts, TASKS, rate, per_round))
            open_rounds.append({**at80, "offered_rps": rate})
            print(f"round {k + 1}/{args.rounds} more-mixed open loop at {rate:.1f} req/s: {at80['rps']:.1f} req/s, "
                  f"p50 {at80['p50_ms']:.1f} ms, p99 {at80['p99_ms']:.1f} ms", flush=True)
    table = _rounds_table(rounds)
    print(f"\n{args.rounds} rounds x {per_round} requests; median req/s over rounds, p50 / p99 of all requests:")
    print("| variant | " + " | ".join(f"c={c}" for c in args.concurrency) + " |")
    print("|---|" + "---|" * len(args.concurrency))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(f"{r['rps']:.1f} req/s, {r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms"
                                          for r in rows.values()) + " |")
    targets = {"more-1task": ">= 0.9", "peft-mixed": ">= 2 at 8 tasks", "base": "none"}
    for other, values in ratios(rounds).items():
        print(f"more-mixed / {other + ':':<11} median {statistics.median(values):.2f}x, rounds "
              f"{min(values):.2f}-{max(values):.2f}x   (target {targets[other]})")
    added = {name: [1000 / saturation(r)[name] - 1000 / saturation(r)["base"] for r in rounds]
             for name in ("more-mixed", "more-1task", "peft-mixed")}
    print("time per request added to the frozen base's, at saturation: " + ", ".join(
        f"{name} {statistics.median(v):+.2f} ms (rounds {min(v):+.2f} to {max(v):+.2f})" for name, v in added.items()))
    tail = [r["p99_ms"] / r["p50_ms"] for r in open_rounds]
    print(f"more-mixed open loop at 80 % of saturation: p99 / p50 median {statistics.median(tail):.2f}, rounds "
          f"{min(tail):.2f}-{max(tail):.2f}   (target <= 3); achieved / offered req/s "
          + ", ".join(f"{r['rps']:.1f} / {r['offered_rps']:.1f}" for r in open_rounds))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rounds": rounds, "open_loop": open_rounds}
    if args.json:
        args.json.write_text(json.dumps(result))
    return result

if __name__ == "__main__":
    main()
