"""The command line: train / eval / export / merge, and one-line errors for bad input (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from morelora.cli import COMMANDS, main


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a bad-input error; returns the single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("morelora: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """(config file, run folder) of a 4-step run made with `morelora train`."""
    from conftest import tiny_run_config

    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_run_config(tiny_bert, tmp / "default_out", max_steps=4, save_steps=2)
    config = _write(tmp / "c.yaml", cfg)
    run_dir = tmp / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "train.seed=1"]) == 0
    return config, run_dir


def test_commands_registered_once() -> None:
    names = [c.name for c in COMMANDS]
    assert names[:4] == ["train", "eval", "export", "merge"] and len(set(names)) == len(names)


def test_train_writes_run_folder(cli_run, capsys) -> None:
    _, run_dir = cli_run
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == 1
    assert set(json.loads((run_dir / "eval.json").read_text())["tasks"]) == {"rte", "sst2", "arc_easy"}


def test_eval_command(cli_run, capsys) -> None:
    _, run_dir = cli_run
    before = json.loads((run_dir / "eval.json").read_text())
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "average" in out
    progress = [line for line in out.splitlines() if line.startswith("eval test ")]  # one line per task
    assert [line.split(" (")[0] for line in progress] == [
        f"eval test {i}/3 {t}: accuracy {before['tasks'][t]['score']:.4f}" for i, t in enumerate(before["tasks"], 1)]
    after = json.loads((run_dir / "eval.json").read_text())
    assert after["tasks"] == before["tasks"]
    assert main(["eval", str(run_dir), "--split", "validation"]) == 0
    assert json.loads((run_dir / "eval_validation.json").read_text())["split"] == "validation"


def test_eval_no_adapter(cli_run, tmp_path: Path, capsys) -> None:
    """`--no-adapter` scores the checkpoint's frozen base + trained task heads, beside (never over) the run's eval."""
    import shutil

    from safetensors.torch import load_file, save_file

    from morelora.training import checkpoint as ckpt
    from morelora.training import load_run
    from morelora.training.evaluate import evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[1], run_dir)
    # a large adapter (random lora_B), so that disabling it changes the predictions
    weights = ckpt.latest_checkpoint(run_dir) / ckpt.ADAPTER_DIR / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 3 if k.endswith(".lora_B") else v
             for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    (run_dir / "eval_validation.json").write_text("{}\n")   # what an earlier `eval --split validation` wrote
    kept = {n: (run_dir / n).read_bytes() for n in ("eval.json", "test_predictions.json", "eval_validation.json")}

    assert main(["eval", str(run_dir), "--split", "validation", "--no-adapter"]) == 0
    out = capsys.readouterr().out
    assert ("adapter disabled: the frozen base model with the run's trained task heads (morelora eval --no-adapter); "
            "compare with the run's own eval for what the adapter adds") in out.splitlines()
    path = run_dir / "eval_validation_no_adapter.json"
    got = json.loads(path.read_text())
    assert got["adapter"] == "disabled" and got["split"] == "validation" and f"-> {path}" in out

    def scores(run) -> dict:
        result = evaluate(run, "validation", 16)
        return {t: r["metrics"] for t, r in result["tasks"].items()}

    # independently: the same checkpoint with every lora_B zeroed (MoRE then adds nothing to any layer)
    run = load_run(run_dir)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if name.endswith(".lora_B"):
                p.zero_()
    want = scores(run)
    assert {t: r["metrics"] for t, r in got["tasks"].items()} == want
    assert scores(load_run(run_dir)) != want, "the adapter changes no score: the comparison is void"

    assert main(["eval", str(run_dir), "--no-adapter"]) == 0   # the test split
    assert json.loads((run_dir / "eval_no_adapter.json").read_text())["adapter"] == "disabled"
    assert {n: (run_dir / n).read_bytes() for n in kept} == kept   # the run's own evaluations untouched


def test_export_and_merge(cli_run, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from morelora.training import load_run

    _, run_dir = cli_run
    assert main(["export", str(run_dir), "--task", "sst2", "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    assert main(["merge", str(run_dir), "--task", "sst2", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    run = load_run(run_dir)
    run.model.eval()
    from morelora.training.evaluate import make_collator

    batch = make_collator(run)([(1, ex) for ex in run.data[1]["test"][:4]])
    with torch.no_grad():
        ours = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        theirs = merged(input_ids=batch["input_ids"][:, 0], attention_mask=batch["attention_mask"][:, 0],
                        token_type_ids=batch["token_type_ids"][:, 0]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("tasks=[sst2,nope]", "unknown task 'nope'; known tasks: sst2"),
    ("train.lrr=1", "unknown config key train.lrr; valid keys under train:"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("method.name=nope", "unknown method 'nope'"),
    ("method.rr=3", "unknown option(s) ['rr'] for MoREConfig"),
    ("task_files={mine: {path: /no/such.jsonl, kind: classification}}", "task file not found"),
])
def test_train_bad_input(cli_run, tmp_path: Path, capsys, override: str, message: str) -> None:
    config, _ = cli_run
    out = tmp_path / "new"
    line = _error(capsys, ["train", str(config), "--output-dir", str(out), override])
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_bad_task_file_is_one_line_exit_2(tmp_path: Path, capsys, suffix: str) -> None:
    from test_data import _WHERE, _write_rows

    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(8)]
    rows[5]["gold"] = 2
    data = _write_rows(tmp_path / f"mine{suffix}", rows)
    config = _write(tmp_path / "c.yaml", {"task_files": {"mine": {"path": str(data), "kind": "multiple_choice"}}})
    line = _error(capsys, ["train", str(config), "--output-dir", str(tmp_path / "run")])
    assert line == (f"morelora: error: {data}, {_WHERE[suffix](5)}: field 'gold' is 2, out of range for 2 choices "
                    "(0 to 1)")
    data.write_bytes(b"")
    assert _error(capsys, ["train", str(config), "--output-dir", str(tmp_path / "run")]).startswith(
        f"morelora: error: {data}: ")
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_not_overwritten(cli_run, capsys) -> None:
    config, run_dir = cli_run
    before = _snapshot(run_dir)
    line = _error(capsys, ["train", str(config), "--output-dir", str(run_dir)])
    assert "exists and is not empty; pass --resume" in line
    assert _snapshot(run_dir) == before


def test_resume_needs_a_checkpoint(cli_run, tmp_path: Path, capsys) -> None:
    config, _ = cli_run
    line = _error(capsys, ["train", str(config), "--output-dir", str(tmp_path / "none"), "--resume"])
    assert "nothing to resume" in line
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    assert "no complete checkpoint" in _error(capsys, ["train", str(config), "--output-dir",
                                                        str(tmp_path / "junk"), "--resume"])


def test_resume_with_another_config_is_refused(cli_run, capsys) -> None:
    config, run_dir = cli_run
    before = _snapshot(run_dir)
    line = _error(capsys, ["train", str(config), "--output-dir", str(run_dir), "--resume", "train.seed=1",
                           "train.lr=0.5", "train.max_steps=9"])
    assert line == (f"morelora: error: --resume with a config that differs from {run_dir / 'config.yaml'} in: "
                    "train.lr 0.001 -> 0.5; resume with the run's own values or train a new run into another "
                    "--output-dir")
    assert _snapshot(run_dir) == before


def test_resume_says_which_keys_it_applies(cli_run, tmp_path: Path, capsys) -> None:
    import shutil

    config, run_dir = cli_run
    run = shutil.copytree(run_dir, tmp_path / "run")
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "train.seed=1", "train.max_steps=6",
                 "train.logging_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resume: applying the changed train.logging_steps: 2 -> 3\n" in out
    assert ("resume: applying the changed train.max_steps: 4 -> 6 (the learning-rate schedule follows the new "
            "length)\n") in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    assert json.loads((run / "eval.json").read_text())["train"]["steps"] == 6


def test_finished_run_resumes_to_nothing(cli_run, capsys) -> None:
    config, run_dir = cli_run
    assert main(["train", str(config), "--output-dir", str(run_dir), "--resume", "train.seed=1"]) == 0


def test_missing_files_and_folders(cli_run, tmp_path: Path, capsys) -> None:
    _, run_dir = cli_run
    assert "config file not found" in _error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "not a run folder" in _error(capsys, ["eval", str(tmp_path)])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert "no complete checkpoint" in _error(capsys, ["eval", str(empty)])
    assert "no complete checkpoint" in _error(capsys, ["export", str(empty), "--task", "sst2", "--out",
                                                       str(tmp_path / "o")])


def test_a_run_folder_of_another_version_is_named_with_what_to_do(cli_run, tmp_path: Path, capsys) -> None:
    """A run folder whose config.yaml holds a key this version does not know (written by a newer morelora): eval,
    resume and compare's reuse check name the file, the key and what to do, instead of a bare unknown key."""
    import shutil

    from morelora.config import ConfigError, RunConfig
    from morelora.experiments.runs import PlannedRun, run_status

    config, run_dir = cli_run
    newer = shutil.copytree(run_dir, tmp_path / "newer")
    raw = yaml.safe_load((newer / "config.yaml").read_text())
    raw["train"]["lr_schedule"] = "cosine"
    (newer / "config.yaml").write_text(yaml.safe_dump(raw))
    want = (f"{newer / 'config.yaml'} cannot be read by this morelora (unknown config key train.lr_schedule; "
            "valid keys under train: output_dir, ")
    for argv in (["eval", str(newer)], ["train", str(config), "--output-dir", str(newer), "--resume", "train.seed=1"]):
        err = _error(capsys, argv)
        assert want in err and "was the run made by another version? Use that version (or update this one), " \
            "or remove the run folder" in err, argv
    train = {k: v for k, v in raw["train"].items() if k != "lr_schedule"}
    cfg = RunConfig.from_dict({**raw, "train": {**train, "output_dir": str(newer)}})
    with pytest.raises(ConfigError, match="cannot be read by this morelora"):
        run_status(PlannedRun("more", 1, cfg))


def test_export_merge_bad_input(cli_run, tmp_path: Path, capsys) -> None:
    _, run_dir = cli_run
    for cmd in ("export", "merge"):
        line = _error(capsys, [cmd, str(run_dir), "--task", "nope", "--out", str(tmp_path / cmd)])
        assert "unknown task 'nope'; this run has tasks: rte, sst2, arc_easy" in line
        assert not (tmp_path / cmd).exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    line = _error(capsys, ["export", str(run_dir), "--task", "sst2", "--out", str(full)])
    assert "exists and is not empty" in line
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "x", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_console_error_has_no_traceback(tmp_path: Path) -> None:
    """The real entry point (`python -m morelora`), as a user sees it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MORELORA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "morelora", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"morelora: error: config file not found: {tmp_path}/missing.yaml"]


# ------------------------------------------------------------------------- exports of non-BertFor* heads


def _readme_head_recipe() -> dict:
    """The README's 'Exported heads' code (its first Python block), executed: the functions a user copies."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Exported heads", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    return namespace


@pytest.fixture(scope="module")
def siamese_run(tmp_path_factory, tiny_bert) -> Path:
    from conftest import tiny_run_config

    tmp = tmp_path_factory.mktemp("siamese")
    cfg = tiny_run_config(tiny_bert, tmp / "run", max_steps=3, save_steps=3)
    cfg["model"].update(pooling="mean", encoding="siamese", max_length=128)
    assert main(["train", str(_write(tmp / "c.yaml", cfg))]) == 0
    return tmp / "run"


def _short(examples: list[dict], tokenizer, n: int = 4) -> list[dict]:
    """``n`` examples whose texts all fit well below the run's max_length (so no truncation differs)."""
    def fits(ex):
        texts = [ex.get("text"), ex.get("text_pair"), ex.get("query"), *ex.get("choices", [])]
        return all(len(tokenizer(t)["input_ids"]) < 100 for t in texts if t)
    return [ex for ex in examples if fits(ex)][:n]


@pytest.mark.parametrize("task", ["sst2", "rte", "arc_easy"])
def test_export_of_siamese_mean_run_loads_in_plain_peft(siamese_run, tmp_path: Path, capsys, task: str) -> None:
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from morelora.training import load_run
    from morelora.training.evaluate import make_collator

    out = tmp_path / "export"
    assert main(["export", str(siamese_run), "--task", task, "--out", str(out)]) == 0
    tiny = yaml.safe_load((siamese_run / "config.yaml").read_text())["model"]["name_or_path"]
    assert capsys.readouterr().out.strip() == (
        f"exported task {task!r} as a PEFT LoRA adapter for {tiny} ({tiny} is a plain AutoModel), plus its "
        f"mean-pooling siamese head in task_head.safetensors (README, 'Exported heads': model outputs -> logits) "
        f"-> {out}")
    meta = json.loads((out / "morelora_task.json").read_text())
    assert (meta["auto_class"], meta["pooling"], meta["encoding"]) == ("AutoModel", "mean", "siamese")

    run = load_run(siamese_run)
    run.model.eval()
    t = run.task_names.index(task)
    # short examples; multiple choice: four choices each (the recipe takes one number of choices per call)
    examples = [ex for ex in _short(run.data[t]["test"], run.tokenizer, n=50) if len(ex.get("choices", "abcd")) == 4]
    examples = examples[:4]
    assert len(examples) == 4
    batch = make_collator(run)([(t, ex) for ex in examples])
    batch.pop("labels")
    seen = []
    hook = run.model.base_model.backbone.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
    with torch.no_grad():
        ours = run.model(**batch).logits
    hook.remove()

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny), out).eval()
    rows = batch["input_ids"].flatten(0, 1)
    with torch.no_grad():  # the adapter's backbone outputs equal the MoRE model's for this task
        theirs = peft_model(input_ids=rows, attention_mask=batch["attention_mask"].flatten(0, 1)).last_hidden_state
    keep = batch["attention_mask"].flatten(0, 1).bool()
    torch.testing.assert_close(theirs[keep], seen[0][keep], rtol=1e-4, atol=1e-5)

    recipe = _readme_head_recipe()
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [ex.get("text", ex.get("query")) for ex in examples]
    seconds = ([ex["choices"] for ex in examples] if "choices" in examples[0]
               else [ex["text_pair"] for ex in examples] if "text_pair" in examples[0] else None)
    with torch.no_grad():
        logits = recipe["task_logits"](peft_model, tokenizer, str(out), texts, seconds)
    torch.testing.assert_close(logits, ours[:, : logits.shape[1]], rtol=1e-4, atol=1e-5)
    assert ours[:, logits.shape[1]:].isinf().all()


def test_merge_of_siamese_run_and_export_base_model(siamese_run, tmp_path: Path, capsys) -> None:
    from transformers import AutoModel, AutoTokenizer

    from morelora.training import load_run
    from morelora.training.evaluate import make_collator

    assert main(["merge", str(siamese_run), "--task", "rte", "--out", str(tmp_path / "m")]) == 0
    assert "merged task 'rte' into the base model (the merged model is a plain AutoModel), plus its mean-pooling " \
           "siamese head in task_head.safetensors" in capsys.readouterr().out
    run = load_run(siamese_run)
    run.model.eval()
    examples = _short(run.data[0]["test"], run.tokenizer)
    batch = make_collator(run)([(0, ex) for ex in examples])
    batch.pop("labels")
    with torch.no_grad():
        ours = run.model(**batch).logits
        merged = AutoModel.from_pretrained(tmp_path / "m").eval()
        logits = _readme_head_recipe()["task_logits"](merged, AutoTokenizer.from_pretrained(tmp_path / "m"),
                                                      str(tmp_path / "m"), [ex["text"] for ex in examples],
                                                      [ex["text_pair"] for ex in examples])
    torch.testing.assert_close(logits, ours, rtol=1e-4, atol=1e-5)

    out = tmp_path / "named"
    assert main(["export", str(siamese_run), "--task", "rte", "--out", str(out), "--base-model", "me/my-bert"]) == 0
    assert "as a PEFT LoRA adapter for me/my-bert (" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/my-bert"


def test_export_names_the_bundled_model_by_its_hub_id() -> None:
    from morelora.config import bundled_minilm_path
    from morelora.tuners.base import hub_id

    assert hub_id(bundled_minilm_path()) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("/data/models/my-bert") == "/data/models/my-bert"
    assert hub_id("bert-base-uncased") == "bert-base-uncased"


def test_help_is_fast_and_subcommand_help_is_complete(capsys) -> None:
    """`morelora --help` imports no torch / transformers / peft; each subcommand's -h lists its options."""
    code = ("import sys\nfrom morelora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sweep" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit) as e:
            main([command, "-h"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    assert "--suite {default,full,quick}" in help_of("bench") and "--threads THREADS" in help_of("bench")
    assert "--task TASK the run's task to merge into the base model" in help_of("merge")
    assert "--split {test,validation,train} split to score" in help_of("eval")
    assert "--no-adapter score with the adapter disabled: what the frozen base model plus the run's trained " \
        "task heads achieve without it" in help_of("eval")
    assert "--checkpoint DIR continue from this checkpoint folder of the run" in help_of("train")


def test_busy_machine_gets_fewer_threads(monkeypatch, capsys) -> None:
    from morelora import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 2.0, 1.0))
    monkeypatch.setattr(cli, "_other_runnable", lambda: 3)
    cli._fit_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    assert capsys.readouterr().out == ("morelora: the machine is busy (load average 2.6 on 4 CPUs, 3 other "
                                       "process(es) running): using 1 torch thread(s); set OMP_NUM_THREADS to choose\n")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cli, "_other_runnable", lambda: 0)   # the average still counts work that has ended
    cli._fit_threads()
    assert "OMP_NUM_THREADS" not in os.environ and capsys.readouterr().out == ""
    monkeypatch.setattr(cli, "_other_runnable", lambda: 1)   # one other process now: busy = min(2.6, 1)
    cli._fit_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3" and "using 3 torch thread(s)" in capsys.readouterr().out
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cli, "_other_runnable", lambda: None)   # no /proc/loadavg: the average alone
    cli._fit_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1" and capsys.readouterr().out == (
        "morelora: the machine is busy (load average 2.6 on 4 CPUs): using 1 torch thread(s); set OMP_NUM_THREADS "
        "to choose\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    cli._fit_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3" and capsys.readouterr().out == ""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))  # idle: torch's default stays
    cli._fit_threads()
    assert "OMP_NUM_THREADS" not in os.environ and capsys.readouterr().out == ""


def test_runnable_count_is_read_from_the_proc_loadavg_format() -> None:
    from morelora.cli import parse_runnable

    assert parse_runnable("4.13 4.16 4.60 5/97 6271\n") == 4
    assert parse_runnable("0.00 0.01 0.05 1/80 12") == 0


def test_summary_says_which_tasks_are_below_their_reference(tmp_path: Path, capsys) -> None:
    from morelora.cli import _print_summary

    def task(score: float, ref: float) -> dict:
        return {"main_metric": "accuracy", "score": score, "reference_score": ref, "vs_reference": None}

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"tasks": {"sst2": task(0.8, 0.5), "rte": task(0.47, 0.53)}, "average": 0.635,
                                "train": {"steps": 300}}))
    _print_summary(path)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(reference 0.5000)") and out[1].endswith("(reference 0.5300)  below the reference")
    assert out[-1].startswith("1 task(s) below their majority-class / chance reference (rte): expected of a short "
                              "run (300 steps) such as the demo's")
