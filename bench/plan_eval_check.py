"""The --plan estimate of a test pass against a full test pass: configs/compare_offline.yaml, untrained MoRE.

Run: PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/plan_eval_check.py
"""
import time

from accelerate import Accelerator

from morelora.config import load_config
from morelora.training.build import build_run
from morelora.training.evaluate import evaluate
from morelora.training.trainer import time_steps

cfg = load_config("configs/compare_offline.yaml", ["train.output_dir=/tmp/plan_eval_check"])
est = time_steps(cfg, steps=3, warmup=1)
print("estimate", est, flush=True)
run = build_run(cfg)
t0 = time.perf_counter()
evaluate(run, "test", cfg.train.eval_batch_size, Accelerator())
print("measured test pass s", time.perf_counter() - t0, flush=True)
