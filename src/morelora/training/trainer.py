"""Multi-task training on :class:`accelerate.Accelerator` (so ``accelerate launch`` gives DDP/FSDP/DeepSpeed).

The trainer is method-agnostic: it trains the run :func:`morelora.training.build.build_run` assembles and only
uses the interface every method shares (forward with ``task_ids``, ``aux_losses``, ``save_pretrained`` /
``load_adapter``, ``parameter_counts``, ``generate``, ``routing_state``).

Data order and several processes
--------------------------------
One :class:`~morelora.data.sampling.MultiTaskSampler`, seeded with ``train.seed`` and identical on every
process, draws *global* batches of ``batch_size * num_processes`` examples; process ``i`` takes the
``i``-th contiguous slice. So every process sees different examples, a global batch comes from one task
(unless ``data.mixed_batches``), the sampler state is the same everywhere (one copy in a checkpoint) and
an N-process run follows the data order of a one-process run with an N times larger batch.
``train.batch_size`` is per process; the effective batch is ``batch_size * num_processes * grad_accum``.

Checkpoints (``checkpoint-<step>/``) hold the adapter (``adapter/``: trainable state only), optimizer,
scheduler, sampler and RNG states (via ``accelerator.save_state``) and ``trainer_state.json``; they are
written to ``checkpoint-<step>.tmp`` and renamed when complete. ``resume=True`` continues from the newest
complete one with the same data order. Under FSDP / DeepSpeed accelerate also stores its own model shards.

What stops a run early, and what each leaves (README, "What an operator gets"):

* SIGTERM / SIGINT (preemption, Ctrl-C): the current step ends, a checkpoint of it is written (with the loss
  window since the last log row, so ``--resume`` writes the same metrics rows and ``train.examples``) and the
  process exits 128 + the signal's number; a second signal stops at once.
* a non-finite loss (or adapter weights at a checkpoint): stops at that step, writing nothing more, with one line
  naming the step and what to try; the checkpoints written before stay (all finite), and ``load_run`` refuses a
  non-finite adapter, so nothing diverged is evaluated or served.
* a full disk while checkpointing: the partial ``checkpoint-<step>.tmp`` is removed, older checkpoints are kept,
  one line names the folder and the space needed.
* a second process training into the same folder is refused (``RUN_DIR/.lock``, naming the holder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from morelora.config import (
    AUTO_HEAD_LR,
    BOOKKEEPING_TRAIN_KEYS,
    ConfigError,
    RunConfig,
    TrainConfig,
    config_diff,
    load_run_config,
)
from morelora.data.sampling import MultiTaskSampler
from morelora.errors import CheckpointError
from morelora.training import checkpoint as ckpt
from morelora.training.build import Run, build_run, load_run, nonfinite_tensors
from morelora.training.evaluate import evaluate, make_collator

__all__ = ["evaluate_run", "time_steps", "train"]


# ------------------------------------------------------------------------------------------------ train


@dataclass
class TrainState:
    """What the loop counts; stored in each checkpoint's ``trainer_state.json``."""

    step: int = 0
    examples: int = 0
    train_time: float = 0.0
    num_processes: int = 1
    #: the loss window since the last log row (:meth:`_LossTracker.state_dict`): a resume between two logging
    #: steps continues it, so the next row and ``examples`` are those of an uninterrupted run
    window: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in ckpt.read_trainer_state(checkpoint).items() if k in known})


def train(cfg: RunConfig, resume: bool = False, checkpoint: str | Path | None = None) -> Path:
    """Train ``cfg`` into ``cfg.train.output_dir``; returns the run folder (with ``eval.json``).

    ``resume`` continues from the newest complete checkpoint that loads (an older one, with a warning, when the
    newest is damaged); ``checkpoint`` (implies ``resume``) names the checkpoint folder to continue from."""
    run_dir = Path(cfg.train.output_dir)
    resume = resume or checkpoint is not None
    accelerator = _make_accelerator(cfg)
    with _StopSignals() as stop:   # first: a signal from the moment the run folder is locked stops with a step
        lock = _lock_run_dir(accelerator, run_dir)
        try:
            return _train(cfg, accelerator, run_dir, resume, checkpoint, stop)
        finally:
            if lock is not None:
                lock.release()


def _train(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, resume: bool, checkpoint: str | Path | None,
           stop: _StopSignals) -> Path:
    tc = cfg.train
    ckpt.check_new_run_dir(run_dir, resume)
    report_to(cfg)   # a tracker that is not installed: refused before anything loads
    if checkpoint is not None:
        checkpoint = ckpt.resolve_checkpoint(run_dir, checkpoint)
    if resume:
        for change in _check_same_config(run_dir, cfg):
            accelerator.print(f"resume: {change}")
    set_seed(tc.seed)
    run = build_run(cfg)
    accelerator.wait_for_everyone()  # every process has checked the folder before anyone writes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(run_dir / "config.yaml")

    sampler = _make_sampler(cfg, run, accelerator.num_processes)
    optimizer, scheduler = _make_optimizer(cfg, run.model, accelerator.device)
    model, optimizer, scheduler = accelerator.prepare(run.model, optimizer, scheduler)
    _register_checkpointing(accelerator, sampler)
    state = (_resume(accelerator, run_dir, checkpoint) if resume
             else TrainState(num_processes=accelerator.num_processes))
    if accelerator.is_main_process:   # the code each stretch of the run trained with (runs span sessions)
        ckpt.record_provenance(run_dir, "resume" if resume else "start", state.step)
    batches = _batches(sampler, make_collator(run, train=True), run, accelerator)
    logger = _MetricsLogger(run_dir, accelerator, cfg)
    routing = _RoutingLogger(run_dir, accelerator)
    tracker = _LossTracker()
    tracker.load_state_dict(state.window, accelerator.device)
    history = _validation_history(run_dir) if resume else []   # (step, validation average), for select_best
    if accelerator.is_main_process:
        (run_dir / ckpt.BEST_NAME).unlink(missing_ok=True)   # chosen again at the end
    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)

    try:
        model.train()
        if resume and _eval_due(tc, state.step) and not _validation_logged(run_dir, state.step):
            # stopped between the checkpoint of an evaluation step and its evaluation: that evaluation is done now
            history.append((state.step, _evaluate_during_training(run, accelerator, logger, state.step, history)))
            model.train()
        while state.step < tc.max_steps and not _patience_out(history, tc.early_stopping_patience):
            t0 = time.perf_counter()
            finite = _train_step(run, model, batches, optimizer, scheduler, accelerator, state.step, tracker)
            state.step += 1
            state.train_time += time.perf_counter() - t0
            diverged, stopping = _step_flags(accelerator, finite, stop)
            if diverged:
                raise _diverged(cfg, run_dir, state.step, "the loss")
            bar.update(1)
            if state.step % tc.logging_steps == 0 or state.step == tc.max_steps:
                row = tracker.pop(accelerator, state, lr=scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
                logger.log(row)
                routing.log(run.model, state.step)
            saved = ((tc.save_steps and state.step % tc.save_steps == 0) or state.step == tc.max_steps
                     or (tc.select_best and _eval_due(tc, state.step)))
            if saved or stopping:
                _save_checkpoint(accelerator, run, run_dir, state, tracker, _best(history))
            if _eval_due(tc, state.step):   # the curve ends at the last step
                history.append((state.step, _evaluate_during_training(run, accelerator, logger, state.step,
                                                                      history)))
                model.train()
                if _patience_out(history, tc.early_stopping_patience):
                    accelerator.print(f"early stopping at step {state.step}: the validation average has not risen "
                                      f"for {tc.early_stopping_patience} evaluations (best "
                                      f"{_best(history)[1]:.4f} at step {_best(history)[0]})")
                    if not (saved or stopping):
                        _save_checkpoint(accelerator, run, run_dir, state, tracker, _best(history))
            if stopping:
                raise stop.stopped(run_dir, state.step)
    except BaseException:   # stopped: the logs' files closed, the bar ended
        bar.close()
        logger.close()
        raise
    bar.close()
    stop.restore()   # the checkpoint of the last step exists: a signal during the test pass just ends the process

    tested, selected = f"checkpoint-{state.step}", None
    if tc.select_best and history:
        step, score = _best(history)
        selected, tested = {"metric": "validation eval_average", "step": step, "score": score}, f"checkpoint-{step}"
        if step != state.step:
            run.model.load_adapter(run_dir / tested / ckpt.ADAPTER_DIR)
        if accelerator.is_main_process:
            _write_json(run_dir / ckpt.BEST_NAME, selected)
        accelerator.print(f"selected {tested}: the best validation average, {score:.4f}")
    result = evaluate(run, "test", tc.eval_batch_size, accelerator, keep_predictions=True, progress=True)
    if accelerator.is_main_process:
        predictions = {"split": "test", "checkpoint": tested, "tasks": result.pop("predictions")}
        _write_json(run_dir / "test_predictions.json", predictions, indent=None)
        if selected:
            result["selected"] = selected
        _write_eval(run_dir / "eval.json", result, run, state)
    accelerator.wait_for_everyone()
    logger.close()
    return run_dir


def time_steps(cfg: RunConfig, steps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Measure ``cfg``'s training step and evaluation on this machine, writing nothing.

    Runs ``warmup`` + ``steps`` real optimizer steps (the run's model, method, batch size and data order) and
    returns ``{"step_s": seconds per step, "test_s": one pass over the test sets, "validation_s": one pass
    over the validation sets}``. An evaluation pass is estimated from one timed batch of ``eval_batch_size``
    test examples per task (after an untimed one when ``warmup``): seconds per example of that batch x the
    task's number of examples.
    """
    tc = cfg.train
    accelerator = _make_accelerator(cfg)
    set_seed(tc.seed)
    run = build_run(cfg)
    sampler = _make_sampler(cfg, run, accelerator.num_processes)
    optimizer, scheduler = _make_optimizer(cfg, run.model, accelerator.device)
    model, optimizer, scheduler = accelerator.prepare(run.model, optimizer, scheduler)
    batches = _batches(sampler, make_collator(run, train=True), run, accelerator)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        _train_step(run, model, batches, optimizer, scheduler, accelerator, step)
    step_s = (time.perf_counter() - t0) / max(steps, 1)

    from morelora.training.evaluate import _predict

    model.eval()
    collator, passes = make_collator(run, train=False), {"test": 0.0, "validation": 0.0}
    with torch.no_grad():
        for t in range(len(run.specs)):
            batch = run.data[t]["test"][:tc.eval_batch_size] or run.data[t]["validation"][:tc.eval_batch_size]
            if not batch:
                continue
            if warmup:  # the first inference batch after training pays one-off costs (e.g. routing caches)
                _predict(run, run.model, collator, t, batch, tc.eval_batch_size, accelerator)
            t0 = time.perf_counter()
            _predict(run, run.model, collator, t, batch, tc.eval_batch_size, accelerator)
            per_example = (time.perf_counter() - t0) / len(batch)
            for split in passes:
                passes[split] += per_example * len(run.data[t][split])
    return {"step_s": step_s, "test_s": passes["test"], "validation_s": passes["validation"]}


# ------------------------------------------------------------------------------------- loop helpers


def _train_step(run: Run, model: Any, batches: Any, optimizer: Any, scheduler: Any, accelerator: Accelerator,
                step: int, tracker: _LossTracker | None = None) -> torch.Tensor:
    """One optimizer step: ``train.grad_accum`` micro-batches, clipping, the method's per-step hook.

    Returns whether every micro-batch's loss was finite (a bool tensor on the device: read it once per step)."""
    tc = run.cfg.train
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    for _ in range(tc.grad_accum):
        batch = next(batches)
        with accelerator.accumulate(model):
            out = model(**batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and tc.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:  # the method's per-step hook sees this step's gradients
                run.model.on_step_end(step)
            scheduler.step()
            optimizer.zero_grad()
        finite &= torch.isfinite(out.loss.detach()).all()
        if tracker is not None:
            tracker.add(out.loss, run.model, batch)
    return finite


def _step_flags(accelerator: Accelerator, finite: torch.Tensor, stop: _StopSignals) -> tuple[bool, bool]:
    """(a process saw a non-finite loss, a process was asked to stop), agreed by every process in one reduce."""
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop.signum is not None), device=finite.device)])
    diverged, stopping = accelerator.reduce(flags, reduction="sum").tolist()
    return diverged > 0, stopping > 0


def _diverged(cfg: RunConfig, run_dir: Path, step: int, what: str) -> ckpt.NonFiniteError:
    """The one line of a run stopped by nan / inf: the step, the checkpoint that stays, what to change."""
    tc = cfg.train
    last = ckpt.latest_checkpoint(run_dir)
    kept = (f"the last good checkpoint, {last.name}, is kept" if last is not None
            else "no checkpoint was written before it")
    head = f", train.head_lr {tc.head_lr}" if tc.head_lr is not None else ""
    return ckpt.NonFiniteError(
        f"{what} is not finite (nan / inf) at step {step}: training stopped there, writing nothing more ({kept}); "
        f"train again with a lower train.lr (now {tc.lr}{head}), or clip with train.max_grad_norm "
        f"(now {tc.max_grad_norm}), or more train.warmup_steps (now {tc.warmup_steps})")


class _StopSignals:
    """SIGTERM / SIGINT while the loop runs (main thread only): noted, acted on after the current step (a
    checkpoint, then :class:`~morelora.training.checkpoint.TrainingStopped`). A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:   # asked twice: stop now, as without this handler
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"morelora: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def stopped(self, run_dir: Path, step: int) -> ckpt.TrainingStopped:
        name = signal.Signals(self.signum or signal.SIGTERM).name
        return ckpt.TrainingStopped(
            f"stopped by {name} at step {step}: {run_dir / f'checkpoint-{step}'} saved; continue the run with "
            "the same command and --resume", exit_code=128 + int(self.signum or signal.SIGTERM))


def _lock_run_dir(accelerator: Accelerator, run_dir: Path) -> ckpt.RunLock | None:
    """The run folder's lock, taken by the main process (every process raises when it is refused)."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = ckpt.RunLock.acquire(run_dir)
        except ckpt.RunError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise ckpt.RunError(error)
    if lock is not None and lock.took_over:
        accelerator.print(f"warning: {run_dir} was locked by {ckpt.describe_holder(lock.took_over)}, which is no "
                          "longer running (killed?): taking the lock over")
    return lock



def _make_accelerator(cfg: RunConfig) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        # our sampler splits one global batch between processes: the scheduler steps once per step
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # single-task batches leave the other tasks' heads / per-task parameters unused
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _check_same_config(run_dir: Path, cfg: RunConfig) -> list[str]:
    """A resumed run must learn what it started learning: only step counts and bookkeeping keys may change.

    Returns one line per applied change (``train.max_steps 300 -> 500``); raises naming every other change."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = load_run_config(run_dir)
    allowed = {f"train.{k}" for k in (*BOOKKEEPING_TRAIN_KEYS, "max_steps")}

    def value(c: RunConfig, key: str) -> Any:
        block, _, name = key.partition(".")
        node = c.to_dict()[block]
        return node.get(name) if name and isinstance(node, dict) else node

    diff = config_diff(saved, cfg)
    refused = [k for k in diff if k not in allowed]
    if refused:
        changes = "; ".join(f"{k} {value(saved, k)!r} -> {value(cfg, k)!r}" for k in refused)
        raise ckpt.RunError(f"--resume with a config that differs from {saved_path} in: {changes}; resume with "
                            "the run's own values or train a new run into another --output-dir")
    return [f"applying the changed {k}: {value(saved, k)!r} -> {value(cfg, k)!r}"
            + (" (the learning-rate schedule follows the new length)" if k == "train.max_steps" else "")
            for k in diff]


def _make_sampler(cfg: RunConfig, run: Run, num_processes: int) -> MultiTaskSampler:
    """One global sampler, the same on every process (see the module docstring)."""
    d = cfg.data
    sizes = [len(x["train"]) for x in run.data]
    empty = [s.name for s, n in zip(run.specs, sizes) if n == 0]
    if empty:
        raise ConfigError(f"tasks without training examples: {', '.join(empty)}")
    return MultiTaskSampler(sizes, cfg.train.batch_size * num_processes, strategy=d.sampling,
                            temperature=d.temperature, mixed=d.mixed_batches, seed=cfg.train.seed)


def _batches(sampler: MultiTaskSampler, collator: Any, run: Run, accelerator: Accelerator):
    """This process's slice of each global batch, collated and on the device."""
    rank, n = accelerator.process_index, accelerator.num_processes
    for indices in sampler:
        per = len(indices) // n
        mine = indices[rank * per:(rank + 1) * per]
        batch = collator([(t, run.data[t]["train"][i]) for t, i in mine])
        yield {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _make_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device | None = None):
    """AdamW over the trainable parameters (no weight decay on biases / norms; task heads at ``train.head_lr``:
    ``auto`` = :data:`~morelora.config.AUTO_HEAD_LR`, ``None`` = ``train.lr``; ``train.lr_ratios`` scales the
    rate of the parameters its patterns name) + linear warm-up/decay."""
    from transformers import get_linear_schedule_with_warmup

    tc = cfg.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    heads: set[int] = set()
    if tc.head_lr is not None:
        for name in getattr(model, "saved_module_names", []):
            heads |= {id(p) for p in model.base_model.get_submodule(name).parameters()}
        if not heads and tc.head_lr != "auto":
            raise ConfigError("train.head_lr is set but the model has no task heads (modules_to_save)")
    head_lr = AUTO_HEAD_LR if tc.head_lr == "auto" else tc.lr if tc.head_lr is None else tc.head_lr
    ratio = _lr_ratios(tc.lr_ratios, [n for n, _ in params])
    groups = []
    # groups in a fixed order (adapter matrices, adapter vectors, head matrices, head vectors), each split by ratio
    # (1 first): without lr_ratios the groups of every earlier version, so their optimizer states still resume
    for lr, in_group in ((tc.lr, lambda p: id(p) not in heads), (head_lr, lambda p: id(p) in heads)):
        chosen = [(n, p) for n, p in params if in_group(p)]
        for decay, is_matrix in ((tc.weight_decay, True), (0.0, False)):
            kind = [(n, p) for n, p in chosen if (p.ndim >= 2) == is_matrix]
            for r in dict.fromkeys([1.0, *tc.lr_ratios.values()]):
                groups.append({"params": [p for n, p in kind if ratio[n] == r], "weight_decay": decay, "lr": lr * r})
    fused = _use_fused_adamw(tc.fused_adamw, [p for _, p in params], device)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, **({"fused": True} if fused else {}))
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    return optimizer, scheduler


def _lr_ratios(patterns: dict[str, float], names: list[str]) -> dict[str, float]:
    """``{name: ratio}`` of every trainable parameter: the ratio of the first pattern of ``train.lr_ratios`` that
    ``re.search`` finds in its name, else 1. A pattern that names no trainable parameter is a config error."""
    out = {}
    for name in names:
        hit = next((r for pattern, r in patterns.items() if re.search(pattern, name)), 1.0)
        out[name] = float(hit)
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ConfigError(f"train.lr_ratios: {pattern!r} matches no trainable parameter (their names: {example}); "
                              "fix the pattern or remove it")
    return out


def _use_fused_adamw(setting: bool | str, params: list[torch.Tensor], device: torch.device | None) -> bool:
    """``train.fused_adamw``: true / false, or "auto": fused where torch has the kernel for the device and dtypes."""
    if setting != "auto":
        return bool(setting)
    device_types = {device.type} if device is not None else {p.device.type for p in params}
    return all(_fused_adamw_runs(t, dtype) for t in device_types for dtype in {p.dtype for p in params})


@functools.cache
def _fused_adamw_runs(device_type: str, dtype: torch.dtype) -> bool:
    try:
        p = torch.zeros(1, device=device_type, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


class _LossTracker:
    """Sums losses, aux losses and examples between two log lines."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.examples, self.since = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, model: Any, batch: dict[str, Any]) -> None:
        values = {"loss": loss.detach().float(), "task_loss": model.task_loss.float()}
        values.update({k: v.detach().float() for k, v in model.aux_losses.items()})
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.examples += int(batch["task_ids"].shape[0])

    def state_dict(self, accelerator: Accelerator) -> dict[str, Any]:
        """The window so far, averaged over processes (each process resumes with the average: a row's mean over
        processes is unchanged); a collective, called on every process."""
        names = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in names] + [
            torch.tensor(float(self.examples), device=accelerator.device)]).to(accelerator.device)
        means = accelerator.reduce(local, reduction="mean").tolist()
        return {"sums": dict(zip(names, means[:-1])), "count": self.count, "examples": means[-1]}

    def load_state_dict(self, window: dict[str, Any], device: torch.device) -> None:
        self._reset()
        if window:
            self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in window["sums"].items()}
            self.count, self.examples = int(window["count"]), window["examples"]

    def pop(self, accelerator: Accelerator, state: TrainState, lr: float) -> dict[str, Any]:
        names = sorted(self.sums)
        local = torch.stack([self.sums[k] / max(self.count, 1) for k in names] + [
            torch.tensor(float(self.examples))]).to(accelerator.device)
        means = accelerator.reduce(local, reduction="mean").tolist()
        examples = means[-1] * accelerator.num_processes
        elapsed = time.perf_counter() - self.since
        state.examples += int(round(examples))
        row = {"step": state.step, **dict(zip(names, means[:-1])), "lr": lr,
               "examples_per_s": examples / max(elapsed, 1e-9), "examples": state.examples}
        self._reset()
        return row


class _MetricsLogger:
    """``metrics.jsonl`` and the ``train.report_to`` trackers (accelerate's tracker classes), main process only."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, cfg: RunConfig) -> None:
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.trackers = _make_trackers(cfg, run_dir) if self.main else []
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(_flat_config(cfg))

    def log(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        values = {k: v for k, v in row.items()
                  if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=row["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def report_to(cfg: RunConfig) -> list[str]:
    """The trackers a run logs to: ``train.report_to``, or TensorBoard when it is installed (null). A tracker
    that is not installed is a ConfigError naming the package."""
    import importlib.util

    names = cfg.train.report_to
    if names is None:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(f"train.report_to: {missing[0]} is not installed (pip install {missing[0]}), or remove it "
                          "from train.report_to")
    return list(names)


def _make_trackers(cfg: RunConfig, run_dir: Path) -> list[Any]:
    """accelerate's tracker objects, each writing beside the run (offline / local modes work as their docs say)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in report_to(cfg):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", run_dir))
        elif name == "wandb":
            trackers.append(WandBTracker("morelora", name=run_dir.name, dir=str(run_dir)))
        else:
            if "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")   # MLflow's local store
            trackers.append(MLflowTracker(experiment_name="morelora", run_name=run_dir.name))
    return trackers


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as ``{"train.lr": 0.001, ...}`` of scalars (lists and mappings as text): tracker hparams."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and prefix.count(".") < 1:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node if isinstance(node, (bool, int, float, str)) else json.dumps(node)

    walk("", cfg.to_dict())
    return flat


class _RoutingLogger:
    """``routing.jsonl`` (main process): ``{"step", "task_ranks"}`` rows of the method's ``routing_state()``,
    nothing for methods without one. Read without autograd and with the CPU RNG restored: training is unchanged."""

    def __init__(self, run_dir: Path, accelerator: Accelerator) -> None:
        self.main = accelerator.is_main_process
        self.path = run_dir / ckpt.ROUTING_FILE

    def log(self, model: Any, step: int) -> None:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            choices = model.routing_state()   # on every process: sharded parameters may need all of them
        if choices is None or not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "task_ranks": choices}) + "\n")


def _register_checkpointing(accelerator: Accelerator, sampler: MultiTaskSampler) -> None:
    """Checkpoints hold the adapter (not accelerate's copy of the frozen model) plus the sampler state."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # plain / DDP runs: the adapter below is the whole trainable state
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(output_dir) / ckpt.ADAPTER_DIR)

    def load_hook(models: list, input_dir: str) -> None:
        if not sharded:  # FSDP / DeepSpeed restore their own model shards
            accelerator.unwrap_model(models[0]).load_adapter(Path(input_dir) / ckpt.ADAPTER_DIR)
            models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    accelerator.register_for_checkpointing(sampler)


def _save_checkpoint(accelerator: Accelerator, run: Run, run_dir: Path, state: TrainState,
                     tracker: _LossTracker, best: tuple[int, float] | None = None) -> None:
    """``accelerator.save_state`` into ``checkpoint-<step>.tmp``, then an atomic rename. Refuses non-finite adapter
    weights (:class:`~morelora.training.checkpoint.NonFiniteError`); a full disk removes the partial folder and
    raises :class:`~morelora.training.checkpoint.DiskFullError`, older checkpoints kept."""
    bad = torch.tensor(float(bool(nonfinite_tensors(run.model)[0])), device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        raise _diverged(run.cfg, run_dir, state.step, "the adapter's weights are")
    state.window = tracker.state_dict(accelerator)
    tmp = run_dir / f"checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        ckpt.tmp_checkpoint_dir(run_dir, state.step)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.finalize_checkpoint(tmp, asdict(state))
    except (OSError, RuntimeError) as e:
        if not ckpt.is_disk_full(e):
            raise
        last = ckpt.latest_checkpoint(run_dir)
        needed = max(ckpt.folder_size(tmp) if tmp.is_dir() else 0,
                     ckpt.folder_size(last) if last is not None else 3 * _adapter_bytes(run.model))
        shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.DiskFullError(ckpt.disk_full_message(run_dir, state.step, needed)) from None
    if accelerator.is_main_process:
        protect = best[0] if best is not None and run.cfg.train.select_best else None
        ckpt.prune_checkpoints(run_dir, run.cfg.train.save_total_limit, protect)
    accelerator.wait_for_everyone()


def _adapter_bytes(model: Any) -> int:
    """Bytes of the adapter's tensors (a checkpoint holds them and AdamW's two moments: about 3x)."""
    return sum(v.numel() * v.element_size() for v in model.adapter_state_dict().values())


#: What loading a damaged checkpoint raises (torch.load, safetensors, JSON, accelerate's own checks).
_DAMAGED = (CheckpointError, OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError)


def _resume(accelerator: Accelerator, run_dir: Path, checkpoint: Path | None = None) -> TrainState:
    """Restore ``checkpoint``, or else the newest complete checkpoint that loads (older ones are tried with a
    warning when the newest is damaged); a run killed before its first checkpoint starts over."""
    candidates = [checkpoint] if checkpoint is not None else [p for _, p in reversed(ckpt.list_checkpoints(run_dir))]
    if not candidates:
        accelerator.print(f"resume: {run_dir} has no complete checkpoint (the run stopped before its first one): "
                          "starting again from step 0")
        if accelerator.is_main_process:
            _truncate_logs(run_dir, 0)
        return TrainState(num_processes=accelerator.num_processes)
    for path in candidates:
        try:
            state = TrainState.read(path)
            accelerator.load_state(str(path))
            break
        except _DAMAGED as e:
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            if checkpoint is not None:
                raise CheckpointError(f"cannot resume from {path} ({reason}); choose another --checkpoint") from None
            accelerator.print(f"warning: cannot load {path} ({reason}); trying the next older checkpoint")
    else:
        raise CheckpointError(f"no checkpoint in {run_dir} loads (see the warnings above); train again into "
                              "another --output-dir")
    if state.num_processes != accelerator.num_processes:
        accelerator.print(f"warning: {path} was written by {state.num_processes} processes, resuming with "
                          f"{accelerator.num_processes}: the data order changes")
        state.num_processes = accelerator.num_processes
    if accelerator.is_main_process:
        _truncate_logs(run_dir, state.step)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {path} (step {state.step})")
    return state


def _truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the log rows after ``step``: the resumed run writes them again."""
    for name in ckpt.LOG_FILES:
        ckpt.truncate_metrics(run_dir / name, step)


def _eval_due(tc: TrainConfig, step: int) -> bool:
    """Whether step ``step`` has a validation evaluation (every ``eval_steps``, and the last step)."""
    return bool(tc.eval_steps) and step > 0 and (step % tc.eval_steps == 0 or step == tc.max_steps)


def _validation_logged(run_dir: Path, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds the validation row of ``step``."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return any(r.get("split") == "validation" and r.get("step") == step for r in rows)


def _evaluate_during_training(run: Run, accelerator: Accelerator, logger: _MetricsLogger, step: int,
                              history: list[tuple[int, float]]) -> float:
    """The validation row of ``step`` (logged and printed); returns the validation average."""
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG stream
        result = evaluate(run, "validation", run.cfg.train.eval_batch_size, accelerator)
    row = {"step": step, "split": "validation", "eval_average": result["average"]}
    row.update({f"eval_{t}": r["score"] for t, r in result["tasks"].items()})
    logger.log(row)
    best = _best(history)
    mark = ("  (best so far)" if best is None or result["average"] > best[1]
            else f"  (best {best[1]:.4f} at step {best[0]})")
    scores = ", ".join(f"{t} {r['score']:.4f}" for t, r in result["tasks"].items())
    accelerator.print(f"validation at step {step}: average {result['average']:.4f} ({scores}){mark}")
    return result["average"]


def _validation_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation average) of every validation row in ``metrics.jsonl`` (a resumed run's, truncated)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [(r["step"], r["eval_average"]) for r in rows if r.get("split") == "validation"]


def _best(history: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The (step, score) of the highest validation average (the earliest of equal ones), None before any."""
    return max(history, key=lambda h: (h[1], -h[0])) if history else None


def _patience_out(history: list[tuple[int, float]], patience: int | None) -> bool:
    """``train.early_stopping_patience``: the last ``patience`` evaluations all came after the best one."""
    if not patience or not history:
        return False
    return len(history) - 1 - history.index(_best(history)) >= patience


def _write_eval(path: Path, result: dict[str, Any], run: Run, state: TrainState | None) -> None:
    result = dict(result)
    result["method"] = run.cfg.method_name
    result["model"] = run.cfg.model.name_or_path
    result["parameters"] = run.model.parameter_counts()
    result["code"] = ckpt.code_version()
    if state is not None:
        result["train"] = {"steps": state.step, "examples": state.examples,
                           "train_time_s": round(state.train_time, 2), "num_processes": state.num_processes}
    _write_json(path, result)


def _write_json(path: Path, data: dict[str, Any], indent: int | None = 2) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ run folders


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str | Path | None = None,
                 batch_size: int | None = None, no_adapter: bool = False) -> Path:
    """Evaluate a run's checkpoint on ``split`` -> ``eval.json`` (+ ``test_predictions.json``) for the test
    split, ``eval_<split>.json`` otherwise. Returns the path of the written file.

    ``no_adapter``: score the checkpoint with its adapter disabled (``model.disable_adapter()``: the frozen base
    model with the run's trained task heads), what the heads alone achieve -> ``eval_no_adapter.json`` /
    ``eval_<split>_no_adapter.json`` (marked ``"adapter": "disabled"``; no predictions file), beside the others."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint)
    path = ckpt.resolve_checkpoint(run_dir, checkpoint)
    accelerator = Accelerator(mixed_precision=run.cfg.train.mixed_precision)
    run.model.to(accelerator.device)
    with run.model.disable_adapter() if no_adapter else contextlib.nullcontext():
        result = evaluate(run, split, batch_size or run.cfg.train.eval_batch_size, accelerator,
                          keep_predictions=not no_adapter, progress=True)
    tasks = result.pop("predictions", None)   # kept for the adapter's test pass only
    suffix = "_no_adapter" if no_adapter else ""
    out = run_dir / (f"eval{suffix}.json" if split == "test" else f"eval_{split}{suffix}.json")
    if no_adapter:
        result["adapter"] = "disabled"
    if accelerator.is_main_process:
        if split == "test" and not no_adapter:
            _write_json(run_dir / "test_predictions.json", {"split": split, "checkpoint": path.name, "tasks": tasks},
                        indent=None)
        _write_eval(out, result, run, TrainState.read(path))
    accelerator.wait_for_everyone()
    return out
