"""Per-task evaluation of a multi-task model.

Encoder models: argmax over the task head's logits (regression: its value). Text-to-text models (seq2seq
and causal): greedy ``model.generate(..., task_ids=...)``, the generated text mapped back to a label /
choice / number and compared with the references. Under several processes each process scores a
contiguous slice of each task's examples and the predictions are gathered in order.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from morelora.data.collate import EncoderCollator, Text2TextCollator
from morelora.metrics import (
    compute_metrics,
    predictions_from_logits,
    predictions_from_text,
    reference_gap,
    reference_score,
    references,
)

if TYPE_CHECKING:
    from morelora.training.build import Run

__all__ = ["evaluate", "make_collator", "predict_batch"]


def make_collator(run: Run, train: bool = True, tokenizer: Any = None) -> EncoderCollator | Text2TextCollator:
    """The run's collator (``tokenizer``: another copy of the run's tokenizer, e.g. one per thread)."""
    m, tokenizer = run.cfg.model, tokenizer or run.tokenizer
    if run.kind == "encoder":
        return EncoderCollator(tokenizer, run.specs, max_length=m.max_length, siamese=m.encoding == "siamese",
                               as_choices=m.scorer == "shared", task_prefix=m.task_prefix)
    return Text2TextCollator(tokenizer, run.specs, max_length=m.max_length,
                             max_target_length=m.max_target_length, causal=run.kind == "causal",
                             chat=m.chat_template)


@torch.no_grad()
def evaluate(run: Run, split: str, batch_size: int, accelerator: Accelerator | None = None,
             keep_predictions: bool = False, progress: bool = False) -> dict[str, Any]:
    """Score every task of ``run`` on ``split``.

    Returns ``{"split", "tasks": {name: {"metrics", "main_metric", "score", "reference_score", "vs_reference",
    "num_examples"}}, "average"}`` (``vs_reference``: :func:`morelora.metrics.reference_gap`) where
    ``average`` is the mean of the tasks' main scores; with
    ``keep_predictions`` also ``"predictions": {name: {"main_metric", "num_labels", "predictions",
    "references"}}`` (the format of ``test_predictions.json``). ``progress`` prints one line per task as it
    finishes (the main process), so a long final evaluation shows where it is.
    """
    accelerator = accelerator or Accelerator()
    model, collator = run.model, make_collator(run, train=False)
    was_training = model.training
    model.eval()
    tasks: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for t, spec in enumerate(run.specs):
        examples = run.data[t][split]
        if not examples:
            continue
        started = time.perf_counter()
        with accelerator.split_between_processes(list(range(len(examples)))) as mine:
            preds = _predict(run, model, collator, t, [examples[i] for i in mine], batch_size, accelerator)
        preds = gather_object(preds) if accelerator.num_processes > 1 else preds
        refs = references(spec, examples)
        metrics = compute_metrics(spec, preds, refs)
        if keep_predictions:
            kept[spec.name] = {"main_metric": spec.main_metric, "num_labels": spec.num_labels,
                               "predictions": preds, "references": refs}
        tasks[spec.name] = {
            "metrics": metrics,
            "main_metric": spec.main_metric,
            "score": metrics[spec.main_metric],
            "reference_score": reference_score(spec, run.data[t]["train"], examples),
            "vs_reference": reference_gap(spec, preds, run.data[t]["train"], examples),
            "num_examples": len(examples),
        }
        if progress and accelerator.is_main_process:
            print(f"eval {split} {t + 1}/{len(run.specs)} {spec.name}: {spec.main_metric} "
                  f"{metrics[spec.main_metric]:.4f} ({len(examples)} examples, "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
    model.train(was_training)
    scores = [r["score"] for r in tasks.values()]
    result = {"split": split, "tasks": tasks, "average": sum(scores) / len(scores) if scores else math.nan}
    if keep_predictions:
        result["predictions"] = kept
    return result


def _predict(run: Run, model: Any, collator: Any, task: int, examples: list[dict], batch_size: int,
             accelerator: Accelerator) -> list[Any]:
    """Predictions (label / choice index, value or text) for ``examples`` of task ``task``, in their order.

    Batches are made of examples of similar length (longest first; :func:`text_length`), so that little of a batch is
    padding; each example's answer is its own (no batch statistics), equal to an unsorted pass up to floating-point
    rounding (measured in docs/BENCHMARKS.md, "Evaluation batches by length").
    """
    spec = run.specs[task]
    order = sorted(range(len(examples)), key=lambda i: -text_length(examples[i]))   # stable: ties keep their order
    preds: list[Any] = [None] * len(examples)
    steps = range(0, len(examples), batch_size)
    for start in tqdm(steps, desc=f"eval {spec.name}", leave=False,
                      disable=not accelerator.is_local_main_process or len(steps) < 2):
        rows = order[start:start + batch_size]
        with accelerator.autocast():
            answers = predict_batch(run, model, collator, [(task, examples[i]) for i in rows], accelerator.device)
        for i, (p, _) in zip(rows, answers):
            preds[i] = p
    return preds


def text_length(ex: dict[str, Any]) -> int:
    """Characters of an example's input texts (its longest choice for a multiple-choice one): the length that
    :func:`_predict` groups by, a proxy for its tokens that needs no tokenizer."""
    texts = [v for k, v in ex.items() if isinstance(v, str) and k not in ("label", "target")]
    return sum(map(len, texts)) + max(map(len, ex.get("choices") or [""]))


def predict_batch(run: Run, model: Any, collator: Any, features: list[tuple[int, dict]],
                  device: torch.device | str = "cpu") -> list[tuple[Any, Any]]:
    """``(prediction, output)`` for each ``(task_index, example)`` of one batch, whose tasks may be mixed.

    ``prediction`` is what ``test_predictions.json`` holds (label / choice index, value or text); ``output``
    is the model's raw answer: the example's row of logits without padding (encoder: one per class /
    choice, regression: one value) or the generated text. The evaluation and the server both call this, so
    a served answer is the offline prediction by construction. Examples need no labels.
    """
    features = [(t, with_placeholder_label(run.specs[t], ex)) for t, ex in features]
    if run.kind == "encoder":
        batch = collator(features)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.detach().float().cpu()
        outputs: list[Any] = [row[:_num_outputs(run.specs[t], ex)] for row, (t, ex) in zip(logits, features)]
        predict = predictions_from_logits
    else:
        inputs, _ = collator.generation_inputs(features)
        outputs = _generate(run, model, {k: v.to(device) for k, v in inputs.items()})
        predict = None
    preds: list[Any] = [None] * len(features)
    by_task: dict[int, list[int]] = {}
    for i, (t, _) in enumerate(features):
        by_task.setdefault(t, []).append(i)
    for t, rows in by_task.items():  # one call per task: predictions depend on the task's kind
        spec = run.specs[t]
        if predict is not None:
            got = predict(spec, logits[rows])
        else:
            got = predictions_from_text(spec, [outputs[i] for i in rows], [features[i][1] for i in rows])
        for i, p in zip(rows, got):
            preds[i] = p
    return list(zip(preds, outputs))


def _num_outputs(spec: Any, example: dict) -> int:
    if spec.kind == "multiple_choice":
        return len(example["choices"])
    return 1 if spec.kind == "regression" else spec.num_labels


def with_placeholder_label(spec: Any, example: dict) -> dict:
    """``example``, or a copy with a placeholder label / gold / target where it has none: the collators read
    one (to build training targets), prediction never does."""
    key = {"multiple_choice": "gold", "text2text": "target"}.get(spec.kind, "label")
    if key in example:
        return example
    return {**example, key: "" if key == "target" else 0}


def _generate(run: Run, model: Any, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Greedy generation; returns the new text of each example."""
    tok = run.tokenizer
    out = model.generate(**inputs, max_new_tokens=run.cfg.model.max_target_length + 1, do_sample=False,
                         num_beams=1, pad_token_id=tok.pad_token_id)
    if run.kind == "causal":
        out = out[:, inputs["input_ids"].shape[1]:]
    return tok.batch_decode(out, skip_special_tokens=True)
