"""Evaluation batches by length against batches in file order, on a finished run: time, and same answers?

    python bench/eval_sorted.py RUN_DIR [--split test] [--batch-size 64] [--tasks sst2 piqa]

For each task of the run: one pass in the data's order (the evaluation before 2026-12-07) and one with batches of
similar length (`morelora.training.evaluate._predict`, longest first), side by side in one process, the same
model and checkpoint. Prints each pass's seconds, their ratio, how many predictions differ and the largest
absolute difference of the outputs (logits / choice scores), then the totals.
"""

from __future__ import annotations

import argparse
import time

import torch

from morelora.training import load_run
from morelora.training.evaluate import make_collator, predict_batch, text_length


def one_pass(run, collator, task: int, examples: list[dict], order: list[int], batch_size: int):
    outputs: list = [None] * len(examples)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, answer in zip(rows, predict_batch(run, run.model, collator, [(task, examples[i]) for i in rows])):
            outputs[i] = answer
    return time.perf_counter() - started, outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    ap.add_argument("--tasks", nargs="*", default=None)
    args = ap.parse_args(argv)
    run = load_run(args.run_dir)
    run.model.eval()
    collator = make_collator(run, train=False)
    batch_size = args.batch_size or run.cfg.train.eval_batch_size
    total = [0.0, 0.0, 0, 0]
    print(f"{'task':14s} {'n':>6s} {'file order s':>12s} {'by length s':>11s} {'ratio':>6s} {'differ':>6s} "
          f"{'max |diff|':>10s}")
    with torch.no_grad():
        for t, spec in enumerate(run.specs):
            if args.tasks and spec.name not in args.tasks:
                continue
            examples = run.data[t][args.split]
            plain_s, plain = one_pass(run, collator, t, examples, list(range(len(examples))), batch_size)
            order = sorted(range(len(examples)), key=lambda i: -text_length(examples[i]))
            sorted_s, by_length = one_pass(run, collator, t, examples, order, batch_size)
            differ = sum(a[0] != b[0] for a, b in zip(plain, by_length))
            gap = max(float((a[1] - b[1]).abs().max()) for a, b in zip(plain, by_length))
            print(f"{spec.name:14s} {len(examples):6d} {plain_s:12.1f} {sorted_s:11.1f} {plain_s / sorted_s:6.2f} "
                  f"{differ:6d} {gap:10.2e}", flush=True)
            total = [total[0] + plain_s, total[1] + sorted_s, total[2] + differ, total[3] + len(examples)]
    print(f"{'all':14s} {total[3]:6d} {total[0]:12.1f} {total[1]:11.1f} {total[0] / total[1]:6.2f} {total[2]:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
