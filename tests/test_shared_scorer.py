"""`model.scorer: shared`: every task a choice among texts, one scorer for all tasks, no task-specific parameter
outside the adapter; the sst2_flipped control task; export and serve of such runs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from morelora.config import ConfigError, RunConfig
from morelora.data import get_task, list_tasks
from morelora.serve import ServeOptions, serving
from morelora.training import build_run, load_run, train
from morelora.training.evaluate import make_collator

TASKS = ["sst2", "mrpc", "piqa"]   # single text, text pair, multiple choice


def _config(model: str, out: Path, encoding: str, method: str = "more", tasks: list[str] | None = None,
            **train_keys: object) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": model, "max_length": 48, "pooling": "mean", "encoding": encoding,
                  "scorer": "shared", "task_prefix": True},
        "tasks": tasks or TASKS,
        "data": {"max_train_per_task": 16, "max_eval_per_task": 8},
        "method": {"name": method, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"output_dir": str(out), "lr": 1e-2, "batch_size": 4, "eval_batch_size": 8, "max_steps": 3,
                  "logging_steps": 1, "save_steps": 0, **train_keys},
    })


def _batch(run) -> dict[str, torch.Tensor]:
    features = [(t, run.data[t]["test"][i]) for t in range(len(run.specs)) for i in range(2)]
    return make_collator(run)(features), features


def _adapter_params(model) -> set[int]:
    return {id(p) for _, layer in model.adapter_layers() for p in layer.parameters() if p.requires_grad} - {
        id(p) for _, layer in model.adapter_layers() for p in layer.base_layer.parameters()}


@pytest.mark.parametrize("encoding", ["siamese", "cross"])
def test_no_task_specific_parameter_outside_the_adapter(tiny_bert, tmp_path, encoding) -> None:
    """Trainable parameters outside the adapter layers: none (siamese), one Linear(H, 1) whatever the tasks
    (cross); the same count with 1 and 3 tasks, so none of them belongs to a task."""
    counts = {}
    for tasks in (["sst2"], TASKS):
        run = build_run(_config(tiny_bert, tmp_path, encoding, tasks=tasks), with_data=False)
        adapter = _adapter_params(run.model)
        outside = [(n, p.numel()) for n, p in run.model.named_parameters() if p.requires_grad and id(p) not in adapter]
        counts[len(tasks)] = outside
    hidden = 32
    expected = [] if encoding == "siamese" else [("base_model.score.weight", hidden), ("base_model.score.bias", 1)]
    assert [(n.removeprefix("base_model.model."), k) for n, k in counts[3]] == \
        [(n.removeprefix("base_model.model."), k) for n, k in expected] == \
        [(n.removeprefix("base_model.model."), k) for n, k in counts[1]]


def test_siamese_scores_are_twenty_times_the_cosine_of_mean_pooled_texts(tiny_bert, tmp_path) -> None:
    """Against an independent computation with the plain BertModel: the task-prefixed query and each label word /
    choice encoded alone, mean-pooled, 20 * cosine; a pair task's two texts joined by [SEP]."""
    from transformers import AutoModel, AutoTokenizer

    run = build_run(_config(tiny_bert, tmp_path, "siamese"))
    run.model.eval()
    batch, features = _batch(run)
    with torch.no_grad(), run.model.disable_adapter():
        logits = run.model.base_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    plain, tok = AutoModel.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)

    def embed(text: str) -> torch.Tensor:
        enc = tok(text, truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            return plain(**enc).last_hidden_state[0].mean(0)

    for row, (t, ex) in zip(logits, features):
        spec = run.specs[t]
        if spec.kind == "multiple_choice":
            query, texts, gold = ex["query"], ex["choices"], ex["gold"]
        else:
            query = ex["text"] if "text_pair" not in ex else f"{ex['text']} [SEP] {ex['text_pair']}"
            texts, gold = [w.replace("_", " ") for w in spec.label_words], ex["label"]
        u = embed(f"{spec.name}: {query}")
        want = torch.stack([20 * F.cosine_similarity(u, embed(c), dim=0) for c in texts])
        torch.testing.assert_close(row[: len(texts)], want, atol=1e-4, rtol=1e-4)
        assert torch.isinf(row[len(texts):]).all()
        assert 0 <= gold < len(texts)


def test_cross_scores_are_one_shared_linear_over_each_query_choice_pair(tiny_bert, tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    run = build_run(_config(tiny_bert, tmp_path, "cross"))
    run.model.eval()
    batch, features = _batch(run)
    with torch.no_grad():
        logits = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits   # B = 0: the base's
    head = run.model.base_model.score
    plain, tok = AutoModel.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)
    for row, (t, ex) in zip(logits, features):
        spec = run.specs[t]
        query = ex.get("query") or (ex["text"] if "text_pair" not in ex else f"{ex['text']} [SEP] {ex['text_pair']}")
        texts = ex["choices"] if spec.kind == "multiple_choice" else [w.replace("_", " ") for w in spec.label_words]
        enc = tok([f"{spec.name}: {query}"] * len(texts), texts, truncation="only_first", max_length=48,
                  padding=True, return_tensors="pt")
        with torch.no_grad():
            h = plain(**enc).last_hidden_state
            pooled = (h * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
            want = head(pooled).squeeze(-1)
        torch.testing.assert_close(row[: len(texts)], want, atol=1e-4, rtol=1e-4)


def test_a_regression_task_or_a_class_without_words_is_refused(tiny_bert, tmp_path) -> None:
    cfg = _config(tiny_bert, tmp_path, "siamese", tasks=["sst2"])
    cfg.tasks, cfg.task_files = ["shared_scorer_regression"], {}
    from morelora.data import TaskSpec, register_task

    register_task(TaskSpec(name="shared_scorer_regression", kind="regression", metrics=[], num_labels=1,
                           loader=lambda: {"train": [], "validation": [], "test": []}), overwrite=True)
    with pytest.raises(ConfigError, match=r"model.scorer: task 'shared_scorer_regression' is regression: the shared "
                                          r"scorer .* classification and multiple-choice tasks only"):
        build_run(cfg, with_data=False)
    register_task(TaskSpec(name="shared_scorer_regression", kind="classification", metrics=[], num_labels=3,
                           label_words=["a", "b"], loader=lambda: {"train": [], "validation": [], "test": []}),
                  overwrite=True)
    with pytest.raises(ConfigError, match="needs one distinct label word per class"):
        build_run(cfg, with_data=False)


def test_sst2_flipped_is_sst2_with_every_label_swapped() -> None:
    a, b = get_task("sst2").load(), get_task("sst2_flipped").load()
    for split in ("train", "validation", "test"):
        assert len(a[split]) == len(b[split]) > 50
        assert [x["text"] for x in a[split]] == [x["text"] for x in b[split]]
        assert [1 - x["label"] for x in a[split]] == [x["label"] for x in b[split]]
    assert get_task("sst2_flipped").label_words == ["negative", "positive"]
    assert list_tasks("control") == ["sst2_flipped"] and "sst2_flipped" not in list_tasks("offline")


def test_a_trained_shared_run_exports_to_plain_peft_and_serves_its_offline_answers(tiny_bert, tmp_path) -> None:
    """Train 3 steps (siamese, MoRE); `morelora export` + the README's 'Exported heads' recipe with plain PEFT
    gives load_run's logits for a classification task scored among its label words; the server answers the
    offline predictions."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from morelora.cli import main

    run_dir = train(_config(tiny_bert, tmp_path / "run", "siamese", tasks=["sst2", "piqa"]))
    run = load_run(run_dir)
    assert main(["export", str(run_dir), "--task", "sst2", "--out", str(tmp_path / "exp")]) in (0, None)
    meta = json.loads((tmp_path / "exp" / "morelora_task.json").read_text())
    assert meta["scorer"] == "shared" and meta["choices"] == ["negative", "positive"]
    assert meta["task_prefix"] == "sst2: "
    head = load_file(str(tmp_path / "exp" / "task_head.safetensors"))
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(tmp_path / "exp")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "exp"))

    def embed(text: str) -> torch.Tensor:
        enc = tok(text, truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            return peft(**enc).last_hidden_state[0].mean(0)

    examples = run.data[0]["test"][:4]
    batch = make_collator(run)([(0, ex) for ex in examples])
    batch.pop("labels")
    run.model.eval()
    with torch.no_grad():
        want = run.model(**batch).logits
    for ex, row in zip(examples, want):
        u = embed(f"sst2: {ex['text']}")
        scores = []
        for choice in meta["choices"]:
            v = embed(choice)
            feats = torch.cat([u, v, (u - v).abs(), u * v, F.cosine_similarity(u, v, dim=0)[None]])
            scores.append(feats @ head["weight"][0] + head["bias"][0])
        torch.testing.assert_close(torch.stack(scores), row, atol=1e-4, rtol=1e-4)

    offline = json.loads((run_dir / "test_predictions.json").read_text())["tasks"]["sst2"]["predictions"]
    long = " ".join(["good"] * 46)   # 48 tokens: fits max_length alone, not after its "sst2: " prefix
    assert len(tok(long)["input_ids"]) == 48 < len(tok(f"sst2: {long}")["input_ids"])
    texts = [ex["text"] for ex in examples] + [long]
    with serving(run, ServeOptions(max_batch_size=8)) as url:
        r = httpx.post(url + "/v1/predict", json={"task": "sst2", "inputs": texts}, timeout=60)
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert [o["label"] for o in outputs[:4]] == offline[:4]
    assert [o["truncated"] for o in outputs] == [len(tok(f"sst2: {t}")["input_ids"]) > 48 for t in texts]
    assert outputs[-1]["truncated"]
