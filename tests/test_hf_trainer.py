"""A morelora adapter (through PEFT) in transformers' Trainer with its defaults and stock collators, and in TRL's
SFTTrainer: task ids from a dataset column, eval_loss, adapter-only checkpoints, exact resume, auxiliary losses."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from morelora import MoREConfig
from morelora.hf_trainer import AuxLossCallback, task_adapter

TASKS = ["sentiment", "topic"]
TEXTS = ["good film", "bad plot", "sports news today", "the market fell", "great acting here",
         "a dull story", "election results", "new phone released"]


def lm_dataset(tokenizer) -> Dataset:
    enc = tokenizer(TEXTS, truncation=True, max_length=16)
    return Dataset.from_dict({**enc, "task_ids": [i % 2 for i in range(len(TEXTS))]})


def args(out, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    learning_rate=1e-2, max_steps=4, logging_steps=2, save_steps=2, report_to=[],
                    disable_tqdm=True, use_cpu=True, seed=0)
    return TrainingArguments(**{**defaults, **kw})


def more_model(path: str, **kw):
    base = AutoModelForCausalLM.from_pretrained(path)
    return peft.get_peft_model(base, MoREConfig(tasks=TASKS, task_type="CAUSAL_LM", **kw))


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task_adapter(model).adapter_state_dict().items()}


def test_trainer_defaults_causal_lm(tiny_llama, minilm_tokenizer, tmp_path):
    """Stock Trainer + DataCollatorForLanguageModeling: trains on both tasks, eval_loss, adapter-only checkpoints
    loadable by PEFT, the contrastive loss logged, processing_class accepted."""
    torch.manual_seed(0)
    model = more_model(tiny_llama)
    before = adapter_state(model)
    data = lm_dataset(minilm_tokenizer)
    seen = []
    adapter = task_adapter(model)
    forward = adapter.forward

    def spy(*a, task_ids=None, **k):   # the task ids each training / eval forward receives
        seen.append(task_ids.tolist())
        return forward(*a, task_ids=task_ids, **k)

    adapter.forward = spy
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(minilm_tokenizer, mlm=False),
                      processing_class=minilm_tokenizer, callbacks=[AuxLossCallback()])
    trainer.train()
    flat = [t for ids in seen for t in ids]   # 4 steps x 4 = every example twice: each task's 4 examples, twice
    assert len(seen) == 4 and flat.count(0) == 8 and flat.count(1) == 8
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)   # the adapter trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["contrastive"] > 0 and "task_loss" in h for h in logs)
    # the logged loss is the task loss plus 0.1 * contrastive (out.loss, as the Trainer backpropagates it)
    assert logs[0]["loss"] == pytest.approx(logs[0]["task_loss"] + 0.1 * logs[0]["contrastive"], rel=1e-3)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    ckpt = tmp_path / "checkpoint-4"
    files = sorted(p.name for p in ckpt.iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    state = load_file(ckpt / "adapter_model.safetensors")
    assert set(state) == {"base_model.model." + k for k in after}       # the adapter only
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "MORE"
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), ckpt)
    assert all(torch.equal(v, after[k]) for k, v in adapter_state(loaded).items())


def test_trainer_resume_is_exact(tiny_llama, minilm_tokenizer, tmp_path):
    """4 steps in one go == 2 steps, then resume_from_checkpoint for the last 2 (bit for bit)."""
    data = lm_dataset(minilm_tokenizer)
    collator = DataCollatorForLanguageModeling(minilm_tokenizer, mlm=False)

    class StopAt(TrainerCallback):   # an interruption after `steps` optimizer steps (checkpoint-2 is saved)
        def __init__(self, steps):
            self.steps = steps

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= self.steps

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = more_model(tiny_llama, lora_dropout=0.1)
        trainer = Trainer(model=model, args=args(out, max_steps=4), train_dataset=data, data_collator=collator,
                          callbacks=[StopAt(steps)])
        trainer.train(resume_from_checkpoint=resume)
        return adapter_state(model)

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume=str(tmp_path / "part" / "checkpoint-2"))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_trainer_defaults_sequence_classification(tiny_bert, minilm_tokenizer, tmp_path):
    """BERT + DataCollatorWithPadding: the task_ids column survives remove_unused_columns and eval_loss is reported."""
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = peft.get_peft_model(base, MoREConfig(tasks=TASKS, task_type="SEQ_CLS", target_modules=["query", "value"]))
    enc = minilm_tokenizer(TEXTS, truncation=True, max_length=16)
    data = Dataset.from_dict({**enc, "label": [i % 2 for i in range(8)], "task_ids": [i // 4 for i in range(8)],
                              "unused": ["x"] * 8})
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorWithPadding(minilm_tokenizer), processing_class=minilm_tokenizer,
                      callbacks=[AuxLossCallback()])
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    assert any("contrastive" in h for h in trainer.state.log_history)


def test_trl_sft_trainer_trains_more_with_contrastive_loss(tiny_llama, minilm_tokenizer, tmp_path):
    """TRL's SFTTrainer (TaskSFTTrainer): task ids reach the layers and the weighted contrastive loss is part of the
    loss it backpropagates (checked against the same step without it)."""
    trl = pytest.importorskip("trl")
    from morelora.hf_trainer import TaskSFTTrainer

    data = Dataset.from_dict({"text": TEXTS, "task_ids": [i % 2 for i in range(8)]})

    def train(weight):
        torch.manual_seed(0)
        model = more_model(tiny_llama, contrastive_weight=weight, lora_dropout=0.0)
        seen = []
        adapter = task_adapter(model)
        forward = adapter.forward
        adapter.forward = lambda *a, task_ids=None, **k: (seen.append(task_ids.tolist()), forward(
            *a, task_ids=task_ids, **k))[1]
        cfg = trl.SFTConfig(output_dir=str(tmp_path / str(weight)), per_device_train_batch_size=4, max_steps=2,
                            learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                            disable_tqdm=True, max_length=16, seed=0, eos_token="[SEP]")
        trainer = TaskSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=minilm_tokenizer)
        trainer.train()
        return trainer, seen, adapter_state(model)

    trainer, seen, with_aux = train(0.1)
    assert seen and {t for ids in seen for t in ids} == {0, 1}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["contrastive"] > 0 for h in logs)
    _, _, without = train(0.0)
    emb = [k for k in with_aux if "task_embedding" in k]
    # the task embeddings learn from the contrastive loss: they differ when its weight is 0
    assert emb and any(not torch.allclose(with_aux[k], without[k]) for k in emb)


def readme_examples() -> list[str]:
    """The python blocks of README.md's section "Using morelora from PEFT, transformers' Trainer and TRL"."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Using morelora from PEFT, transformers' Trainer and TRL", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = readme_examples()
    assert len(blocks) == 3   # PEFT, Trainer, TRL
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        torch.manual_seed(0)
        exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 2])" in printed
    assert (tmp_path / "peft_adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == "MORE"
