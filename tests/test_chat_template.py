"""model.chat_template (issue 37, item 4): causal prompts as a user turn of the tokenizer's chat template; the plain
prompt stays the default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from morelora.config import ConfigError, RunConfig
from morelora.data import get_task
from morelora.data.collate import IGNORE_INDEX, Text2TextCollator, to_text2text
from morelora.training import load_run, train
from morelora.training.evaluate import make_collator

#: a minimal template in the ChatML style (the MiniLM tokenizer has none)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_llama(tiny_llama: str, tmp_path_factory) -> str:
    """The tiny LLaMA with a chat template on its tokenizer."""
    from transformers import AutoTokenizer

    path = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("chat") / "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def test_chat_prompts_are_the_template_around_the_plain_prompt(chat_llama: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    specs = [get_task("sst2"), get_task("arc_easy")]
    features = [(0, specs[0].load()["test"][0]), (1, specs[1].load()["test"][0])]
    chat = Text2TextCollator(tokenizer, specs, max_length=200, max_target_length=4, causal=True, chat=True)
    plain = Text2TextCollator(tokenizer, specs, max_length=200, max_target_length=4, causal=True)
    batch, targets = chat.generation_inputs(features)
    for row, (t, ex) in enumerate(features):
        prompt, target = to_text2text(specs[t], ex)
        text = f"<|user|> {prompt} <|end|> <|assistant|>"   # TEMPLATE by hand
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]   # the template's tokens only: no [CLS]
        assert batch["input_ids"][row, -len(ids):].tolist() == ids
        assert batch["attention_mask"][row].sum() == len(ids)
        assert plain.texts((t, ex)) == (prompt + " answer:", target)   # the default is unchanged
        assert targets[row] == target
    train_batch = chat(features)
    for row, (t, ex) in enumerate(features):
        _, target = to_text2text(specs[t], ex)
        answer = tokenizer(target, add_special_tokens=False)["input_ids"][:4] + [chat.eos_token_id]
        labels = [x for x in train_batch["labels"][row].tolist() if x != IGNORE_INDEX]
        assert labels == answer   # no space before the answer: it follows the template's generation prompt
    with pytest.raises(ValueError, match="no chat template"):
        Text2TextCollator(_without_template(tokenizer), specs, causal=True, chat=True)


def _without_template(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = None
    return other


def test_a_run_trains_and_reloads_with_chat_prompts(chat_llama: str, tiny_llama: str, tiny_bert: str,
                                                    tmp_path: Path, run_config) -> None:
    cfg = run_config(chat_llama, tmp_path / "r", max_steps=2, save_steps=0)
    cfg["tasks"], cfg["data"]["max_eval_per_task"] = ["sst2"], 4
    cfg["model"].update(chat_template=True, max_length=96)
    cfg["method"]["target_modules"] = ["q_proj", "v_proj"]
    run_dir = train(RunConfig.from_dict(cfg))
    assert json.loads((run_dir / "eval.json").read_text())["tasks"]["sst2"]["num_examples"] == 4
    run = load_run(run_dir)
    assert make_collator(run, train=False).chat   # the run's config says how its prompts look
    for path, message in ((tiny_llama, "has no chat template; set model.chat_template: false"),
                          (tiny_bert, "model.chat_template applies to causal models")):
        bad = {**cfg, "model": {**cfg["model"], "name_or_path": path}, "train": {**cfg["train"],
                                                                                  "output_dir": str(tmp_path / "x")}}
        with pytest.raises(ConfigError, match=message):
            train(RunConfig.from_dict(bad))
