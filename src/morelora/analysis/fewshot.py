"""``morelora fewshot RUN_DIR --task-file FILE --task-name NAME --shots K``: transfer a trained MoRE to a new task.

Per seed ``s`` (``--seeds N`` seeds starting at ``--seed``), ``K`` examples are drawn with ``s`` from the file's
train split (from the whole file when that split has fewer than ``K``); every other example of the file is the
evaluation set. Three variants are trained on the same ``K`` examples with the same budget (``--epochs``
passes, batch ``--batch-size``, AdamW without weight decay at ``--lr``, gradients clipped at 1.0):

``more_transfer``
    the trained run, plus the new task: ``model.add_task(NAME, init_from=<nearest learned task>)``. Only the
    new task's rows of the per-task tables (``task_embedding``, or ``router_logits`` for runs without task
    embeddings) and its new head are trained: every other parameter is frozen (``requires_grad=False``) and a
    gradient hook zeroes the other tasks' rows, so the learned tasks are left exactly as they were. The loss is
    the task loss plus the run's weighted contrastive loss (which pulls the new row towards the new task).
    A multiple-choice head starts as a copy of the nearest task's head when that task is multiple choice too
    (a choice scorer does not depend on labels); any other head starts fresh.
``lora_scratch``
    PEFT LoRA (same base model, ``target_modules``, ``r``, ``lora_alpha`` and dropout as the run) and a fresh
    head, trained from scratch.
``more_scratch``
    a fresh MoRE with the run's method options and the new task only, trained from scratch.

**Nearest task** (the rule of ``init_from``): for each learned task ``t`` the ``K`` examples are run through the
trained model *as task t* (eval mode), and the contrastive loss the run was trained with is computed for label
``t``: per adapted layer, ``cross_entropy(normalize(x[:, 0]) @ normalize(E)^T / tau, t)`` with ``x`` the layer's
input, averaged over layers and examples. The nearest task is the one with the lowest loss, i.e. the learned
task whose task embeddings the new examples' representations are most confidently assigned to. The mean
cosine of the examples' representations to ``E[t]`` is reported too. Runs without task embeddings have no such
rule: the new task's router row then starts like a new task at initialisation (``init_from=None``).

Writes ``RUN_DIR/fewshot-<NAME>.json``: scores per seed and mean ± 95% CI (Student t) per variant, the nearest
task per seed with the scores behind it, and the trainable parameters of each variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morelora.analysis import format_mean_ci, mean_ci

__all__ = ["VARIANTS", "configure", "fewshot", "infer_kind", "main", "more_transfer", "nearest_task"]

VARIANTS = ("more_transfer", "lora_scratch", "more_scratch")
DESCRIPTIONS = {
    "more_transfer": "trained MoRE + add_task(init_from=nearest); only the new task's rows and head trained",
    "lora_scratch": "PEFT LoRA (same layers, r, alpha) + fresh head, from scratch",
    "more_scratch": "fresh MoRE (the run's method options) on the new task alone, from scratch",
}
#: Per-task parameter tables of a MoRE layer: row t belongs to task t.
PER_TASK_TABLES = ("task_embedding", "router_logits")


# ------------------------------------------------------------------------------------------- helpers


def infer_kind(path: str | Path) -> str:
    """Task kind from the columns of a generic task file's first row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        import gzip

        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt") as f:
            line = next((ln for ln in f if ln.strip()), "{}")
        row = json.loads(line)
    elif name.endswith(".csv"):
        import csv

        with open(path, newline="") as f:
            row = next(csv.DictReader(f), {})
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).slice(0, 1).to_pylist()
        row = rows[0] if rows else {}
    from morelora.errors import MoreLoraError

    if "choices" in row and "query" in row:
        return "multiple_choice"
    if "input" in row and "target" in row:
        return "text2text"
    if "text" in row and "label" in row:
        label = row["label"]
        if isinstance(label, float) and not label.is_integer():
            return "regression"
        return "classification"
    raise MoreLoraError(f"{path}: cannot tell the task kind from its columns {sorted(row)}; pass --kind")


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layer_inputs_hooks(model: Any, store: dict[str, Any]) -> list[Any]:
    """Forward pre-hooks storing each adapted layer's input at the first position (``x[:, 0]``)."""
    handles = []
    for name, layer in model.adapter_layers():
        def hook(_module: Any, args: tuple, _name: str = name) -> None:
            x = args[0]
            store[_name] = (x[:, 0, :] if x.dim() == 3 else x).detach().float()

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def _batches(examples: Sequence[dict], size: int) -> list[list[dict]]:
    return [list(examples[i:i + size]) for i in range(0, len(examples), size)]


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def nearest_task(model: Any, collator: Any, examples: Sequence[dict], new_index: int,
                 batch_size: int = 32) -> tuple[str | None, dict[str, dict[str, float]]]:
    """The learned task whose task embeddings best claim ``examples`` (see the module docstring).

    ``collator`` must know the new task at index ``new_index`` (only used to build the inputs). Returns
    ``(task name or None, {"contrastive_loss": {task: loss}, "cosine": {task: mean cosine}})``.
    """
    import torch
    import torch.nn.functional as F

    from morelora.tuners.more.layer import contrastive_logits

    layers = [(n, layer) for n, layer in model.adapter_layers() if hasattr(layer, "task_embedding")]
    if not layers:
        return None, {}
    tau = float(getattr(model.config, "contrastive_temperature", 0.05))
    device = next(model.parameters()).device
    learned = list(model.tasks)
    losses = dict.fromkeys(learned, 0.0)
    cosines = dict.fromkeys(learned, 0.0)
    store: dict[str, torch.Tensor] = {}
    handles = _layer_inputs_hooks(model, store)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in _batches(examples, batch_size):
                batch = _to(collator([(new_index, ex) for ex in chunk]), device)
                if "choice_mask" in batch:  # encoder: scores only, no loss needed
                    batch.pop("labels", None)
                for t, task in enumerate(learned):
                    batch["task_ids"] = torch.full_like(batch["task_ids"], t)
                    store.clear()
                    model(**batch)
                    loss_sum, cos_sum = 0.0, 0.0
                    for name, layer in layers:
                        logits = contrastive_logits(store[name], layer.task_embedding.detach(), tau)
                        target = torch.full((logits.shape[0],), t, dtype=torch.long, device=logits.device)
                        loss_sum += float(F.cross_entropy(logits, target, reduction="mean"))
                        cos_sum += float((logits[:, t] * tau).mean())   # the cosine to E[t]
                    weight = len(chunk) / len(examples)
                    losses[task] += weight * loss_sum / len(layers)
                    cosines[task] += weight * cos_sum / len(layers)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    best = min(learned, key=lambda t: losses[t])
    return best, {"contrastive_loss": losses, "cosine": cosines}


def _add_head(base: Any, spec: Any, copy_from: int | None = None) -> list[Any]:
    """Append a head for ``spec`` to a :class:`MultiTaskHeadModel`; returns its parameters."""
    head = base.new_head(spec)
    if copy_from is not None and base.heads[copy_from].weight.shape == head.weight.shape:
        head.load_state_dict(base.heads[copy_from].state_dict())
    head.to(base.heads[0].weight.device)
    base.specs.append(spec)
    base.task_names.append(spec.name)
    base.heads.append(head)
    return list(head.parameters())


def _fit(model: Any, collator: Any, examples: Sequence[dict], task_index: int, params: Sequence[Any], epochs: int,
         batch_size: int, lr: float, seed: int) -> list[float]:
    """Train ``params`` of ``model`` on ``examples`` (AdamW, no weight decay, clip 1.0); returns the epoch losses."""
    import torch

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(examples)))
    rng = random.Random(seed)
    model.train()
    history = []
    for _ in range(epochs):
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            out = model(**_to(collator([(task_index, ex) for ex in chunk]), device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += float(out.loss.detach()) * len(chunk)
        history.append(total / len(examples))
    model.eval()
    return history


class _DropTaskIds:
    """Wraps a single-task model (PEFT LoRA) so it accepts and ignores ``task_ids`` like morelora's methods."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _score(run_like: Any, name: str, batch_size: int) -> float:
    from morelora.training.evaluate import evaluate

    return float(evaluate(run_like, "test", batch_size)["tasks"][name]["score"])


def _count(params: Sequence[Any]) -> int:
    return int(sum(p.numel() for p in params))


# ------------------------------------------------------------------------------------------- variants


def more_transfer(trained: Any, spec: Any, shots: list[dict], evals: list[dict], seed: int, opts: dict) -> dict:
    """The ``more_transfer`` variant on a copy of ``trained.model`` (left unchanged).

    Returns ``{"score", "trainable_parameters", "nearest", "nearest_scores", "losses", "model"}``; ``opts`` holds
    ``epochs``, ``batch_size``, ``lr`` and ``eval_batch_size``.
    """
    import torch

    from morelora.errors import MoreLoraError
    from morelora.heads import MultiTaskHeadModel
    from morelora.training.build import Run
    from morelora.training.evaluate import make_collator

    torch.manual_seed(seed)
    model = copy.deepcopy(trained.model)
    specs = [*trained.specs, spec]
    empty = {"train": [], "validation": [], "test": []}
    run_like = Run(trained.cfg, trained.kind, specs, [empty] * len(trained.specs) + [
        {"train": shots, "validation": [], "test": evals}], trained.tokenizer, model)
    collator = make_collator(run_like, train=True)
    new_index = len(trained.specs)
    nearest, scores = nearest_task(model, collator, shots, new_index, opts["eval_batch_size"])

    model.add_task(spec.name, init_from=nearest)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable, count = [], 0
    for _, layer in model.adapter_layers():
        for pname in PER_TASK_TABLES:
            table = getattr(layer, pname, None)
            if table is None:
                continue
            mask = torch.zeros_like(table[:, :1])
            mask[-1] = 1.0
            table.requires_grad_(True)
            table.register_hook(lambda g, m=mask: g * m)
            trainable.append(table)
            count += table[-1].numel()
    base = model.base_model
    if isinstance(base, MultiTaskHeadModel):
        src = trained.task_names.index(nearest) if nearest is not None else None
        same_kind = src is not None and trained.specs[src].kind == "multiple_choice" == spec.kind
        head = _add_head(base, spec, copy_from=src if same_kind else None)
        trainable += head
        count += _count(head)
    if not trainable:
        raise MoreLoraError("the run's model has no per-task tables to train (is it a MoRE run?)")
    losses = _fit(model, collator, shots, new_index, trainable, opts["epochs"], opts["batch_size"], opts["lr"], seed)
    return {"score": _score(run_like, spec.name, opts["eval_batch_size"]), "trainable_parameters": count,
            "nearest": nearest, "nearest_scores": scores, "losses": losses, "model": model}


def _scratch_run(trained: Any, spec: Any, shots: list[dict], evals: list[dict], model: Any) -> Any:
    from morelora.training.build import Run

    cfg = copy.deepcopy(trained.cfg)
    cfg.tasks, cfg.task_files = [spec.name], {}
    return Run(cfg, trained.kind, [spec], [{"train": shots, "validation": [], "test": evals}], trained.tokenizer,
               model)


def _more_scratch(trained: Any, spec: Any, shots: list[dict], evals: list[dict], seed: int, opts: dict) -> dict:
    import torch

    from morelora.training.build import build_model

    torch.manual_seed(seed)
    _, model = build_model(trained.cfg, trained.kind, [spec])
    model.to(_device())
    return _fit_and_score(trained, spec, shots, evals, seed, opts, model,
                          [p for p in model.parameters() if p.requires_grad])


def _fit_and_score(trained: Any, spec: Any, shots: list[dict], evals: list[dict], seed: int, opts: dict,
                   model: Any, params: list[Any]) -> dict:
    """Train ``params`` of a fresh single-task ``model`` on the shots; its score on ``evals``."""
    from morelora.training.evaluate import make_collator

    run_like = _scratch_run(trained, spec, shots, evals, model)
    losses = _fit(model, make_collator(run_like), shots, 0, params, opts["epochs"], opts["batch_size"], opts["lr"],
                  seed)
    return {"score": _score(run_like, spec.name, opts["eval_batch_size"]), "trainable_parameters": _count(params),
            "losses": losses}


def _lora_scratch(trained: Any, spec: Any, shots: list[dict], evals: list[dict], seed: int, opts: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from morelora.heads import MultiTaskHeadModel
    from morelora.training.build import build_base_model

    torch.manual_seed(seed)
    method = trained.cfg.method
    _, base = build_base_model(trained.cfg, trained.kind, [spec])
    lora = LoraConfig(r=int(method.get("r", 8)), lora_alpha=float(method.get("lora_alpha", 32)),
                      lora_dropout=float(method.get("lora_dropout", 0.1)),
                      target_modules=method.get("target_modules"))
    peft_model = get_peft_model(base, lora)
    if isinstance(base, MultiTaskHeadModel):
        for p in base.heads.parameters():
            p.requires_grad_(True)
    peft_model.to(_device())
    return _fit_and_score(trained, spec, shots, evals, seed, opts, _DropTaskIds(peft_model),
                          [p for p in peft_model.parameters() if p.requires_grad])


_RUNNERS = {"more_transfer": more_transfer, "lora_scratch": _lora_scratch, "more_scratch": _more_scratch}


# ------------------------------------------------------------------------------------------- driver


def fewshot(run_dir: str | Path, task_file: str | Path, task_name: str, shots: int, kind: str | None = None,
            seeds: int = 3, seed: int = 0, epochs: int = 10, lr: float | None = None, batch_size: int | None = None,
            max_eval: int | None = None, checkpoint: str | Path | None = None,
            variants: Sequence[str] = VARIANTS, out: str | Path | None = None) -> dict[str, Any]:
    """Run the few-shot comparison (see the module docstring); writes and returns the result dict."""
    from morelora.analysis import load_trained_model
    from morelora.data import TaskSpec
    from morelora.data.splits import subsample
    from morelora.errors import MoreLoraError

    bad = [v for v in variants if v not in _RUNNERS]
    if bad:
        raise MoreLoraError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if shots < 1 or seeds < 1 or epochs < 1:
        raise MoreLoraError("--shots, --seeds and --epochs must be >= 1")
    kind = kind or infer_kind(task_file)
    trained = load_trained_model(run_dir, checkpoint)
    if trained.cfg.method_name != "more":
        raise MoreLoraError(f"fewshot transfers MoRE runs; {run_dir} was trained with {trained.cfg.method_name!r}")
    if task_name in trained.task_names:
        raise MoreLoraError(f"task {task_name!r} is already one of the run's tasks {trained.task_names}: "
                            "pick a new name")
    if trained.kind == "encoder" and kind == "text2text":
        raise MoreLoraError(f"{run_dir} is an encoder run: it takes classification, regression or multiple_choice "
                         "tasks, not text2text")
    trained.model.to(_device())
    spec = TaskSpec.from_file(task_name, task_file, kind)
    splits = spec.load()
    every = splits["train"] + splits["validation"] + splits["test"]
    pool = splits["train"] if len(splits["train"]) >= shots else every
    if len(every) <= shots:
        raise MoreLoraError(f"{task_file} has {len(every)} examples: nothing left to evaluate on after {shots} shots")
    tc = trained.cfg.train
    opts = {"epochs": epochs, "lr": float(lr if lr is not None else tc.lr),
            "batch_size": int(batch_size or min(shots, tc.batch_size)), "eval_batch_size": tc.eval_batch_size}

    per_seed: dict[str, list[dict]] = {v: [] for v in variants}
    nearest: list[dict[str, Any]] = []
    num_eval = []
    for s in range(seed, seed + seeds):
        picked = sorted(np.random.default_rng(s).choice(len(pool), size=shots, replace=False).tolist())
        chosen = [pool[i] for i in picked]
        ids = {id(ex) for ex in chosen}
        evals = subsample([ex for ex in every if id(ex) not in ids], max_eval, 0)
        num_eval.append(len(evals))
        for v in variants:
            r = _RUNNERS[v](trained, spec, chosen, evals, s, opts)
            r.pop("model", None)
            per_seed[v].append(r)
            print(f"seed {s}  {v:>14}  {spec.main_metric} {r['score']:.4f}"
                  + (f"   (init_from {r['nearest']})" if v == "more_transfer" else ""), flush=True)
            if v == "more_transfer":
                nearest.append({"seed": s, "task": r["nearest"], **r["nearest_scores"]})

    result: dict[str, Any] = {
        "run_dir": str(run_dir), "task": task_name, "task_file": str(task_file), "kind": kind,
        "metric": spec.main_metric, "shots": shots, "seeds": list(range(seed, seed + seeds)),
        "num_eval_examples": num_eval, **opts,
        "nearest_rule": "lowest contrastive loss of the K examples run as task t, averaged over adapted layers",
        "nearest": nearest, "variants": {},
    }
    for v in variants:
        scores = [r["score"] for r in per_seed[v]]
        result["variants"][v] = {"description": DESCRIPTIONS[v], "scores": scores, **mean_ci(scores),
                                 "trainable_parameters": per_seed[v][0]["trainable_parameters"],
                                 "final_train_loss": [r["losses"][-1] for r in per_seed[v]]}
    path = Path(out) if out else Path(run_dir) / f"fewshot-{task_name}.json"
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    result["path"] = str(path)
    return result


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def print_result(result: dict[str, Any]) -> None:
    """A small table: variant, mean ± CI, trainable parameters."""
    print(f"\n{result['task']} ({result['kind']}), {result['shots']} shots, {len(result['seeds'])} seed(s), "
          f"{result['metric']} on the rest of the file:")
    for v, r in result["variants"].items():
        print(f"  {v:>14}  {format_mean_ci(r)}   trainable params {r['trainable_parameters']:,}")
    picks = ", ".join(n["task"] or "none (no task embeddings)" for n in result["nearest"])
    if picks:
        print(f"  nearest learned task per seed: {picks}")
    print(f"-> {result['path']}")


# ----------------------------------------------------------------------------------------------- CLI


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``morelora fewshot``."""
    p.add_argument("run_dir", help="MoRE run folder written by `morelora train`")
    p.add_argument("--task-file", required=True, help="the new task: a generic JSONL / CSV / Parquet task file")
    p.add_argument("--task-name", required=True, help="name of the new task")
    p.add_argument("--shots", type=int, required=True, help="K: training examples drawn per seed")
    p.add_argument("--kind", choices=("classification", "regression", "multiple_choice", "text2text"),
                   help="task kind (default: guessed from the file's columns)")
    p.add_argument("--seeds", type=int, default=3, help="number of K-shot draws (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the K examples (default 10)")
    p.add_argument("--lr", type=float, help="learning rate (default: the run's train.lr)")
    p.add_argument("--batch-size", type=int, help="default: min(K, the run's train.batch_size)")
    p.add_argument("--max-eval", type=int, help="evaluate on at most this many of the remaining examples")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest complete one)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {','.join(VARIANTS)}")
    p.add_argument("--out", help="result file (default: RUN_DIR/fewshot-<NAME>.json)")


def main(args: argparse.Namespace) -> None:
    """``morelora fewshot``."""
    result = fewshot(args.run_dir, args.task_file, args.task_name, args.shots, kind=args.kind, seeds=args.seeds,
                     seed=args.seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                     max_eval=args.max_eval, checkpoint=args.checkpoint,
                     variants=[v.strip() for v in args.variants.split(",") if v.strip()], out=args.out)
    print_result(result)
