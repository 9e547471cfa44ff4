"""Load test of `morelora serve`, several servers side by side in one process (loopback only, bounded).

    python bench/serve_load.py [--requests 240] [--concurrency 1 8 32] [--time-limit 120] [--quick]

Eight classification tasks with the same inputs (SST-2 sentences, one task file per task) on the bundled MiniLM,
so that every variant does the same work per request and only the task mix differs. Each variant is a server
(`morelora.serve.create_app`, the same code as `morelora serve`) on 127.0.0.1:

* ``more-mixed``: MoRE, each request drawn from the 8 tasks (the server batches them together)
* ``more-1task``: the same MoRE server, every request for one task
* ``peft-mixed``: PEFT LoRA with one adapter per task, batches run with ``adapter_names`` (PEFT's mixed batch)
* ``base``: the frozen base model (task heads only)

Closed loop at each concurrency (C clients, each sending one single-input request after the other; a fixed
request count and a time limit) gives throughput and p50 / p99 latency; the best throughput is the server's
saturation. Then an open loop at 80 % of MoRE-mixed's saturation (requests at fixed intervals) gives p50 / p99
there. Untrained adapters (random B): the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
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


def _summary(latencies: list[float], elapsed: float) -> dict:
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"n": len(lat), "rps": len(lat) / elapsed, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=240, help="requests per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per measurement at most")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="40 requests, concurrency 1 and 8 (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 40, [1, 8]
    torch.set_num_threads(1)
    options = ServeOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=1024)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_runs(Path(tmp), args.max_length)
    runs, texts = built["runs"], built["texts"]
    variants = [("more-mixed", "more", TASKS), ("more-1task", "more", TASKS[:1]), ("peft-mixed", "peft", TASKS),
                ("base", "base", TASKS)]
    table: dict[str, dict] = {}
    for name, key, tasks in variants:
        with BackgroundServer(runs[key], options) as server:
            for c in args.concurrency:
                r = asyncio.run(closed_loop(server.url, texts, tasks, c, args.requests, args.time_limit))
                table.setdefault(name, {})[c] = r
                print(f"{name:<11} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                      f"  ({r['n']} requests)", flush=True)
    sat = {name: max(r["rps"] for r in rows.values()) for name, rows in table.items()}
    rate = 0.8 * sat["more-mixed"]
    with BackgroundServer(runs["more"], options) as server:
        at80 = asyncio.run(open_loop(server.url, texts, TASKS, rate, args.requests))
    print("\nsaturation (best req/s over concurrency): " + ", ".join(f"{k} {v:.1f}" for k, v in sat.items()))
    print(f"more-mixed / more-1task: {sat['more-mixed'] / sat['more-1task']:.2f}x   (target >= 0.9)")
    print(f"more-mixed / peft-mixed: {sat['more-mixed'] / sat['peft-mixed']:.2f}x   (target >= 2 at 8 tasks)")
    print(f"more-mixed / base:       {sat['more-mixed'] / sat['base']:.2f}x")
    print(f"more-mixed open loop at 80 % of saturation ({rate:.1f} req/s): {at80['rps']:.1f} req/s, "
          f"p50 {at80['p50_ms']:.1f} ms, p99 {at80['p99_ms']:.1f} ms, p99/p50 {at80['p99_ms'] / at80['p50_ms']:.2f} "
          "(target <= 3)")


if __name__ == "__main__":
    main()
