"""Run config: defaults, YAML round trip, dotted overrides and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morelora.config import ConfigError, RunConfig, apply_overrides, bundled_minilm_path, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    cfg = RunConfig()
    assert cfg.model.name_or_path == bundled_minilm_path()
    assert Path(cfg.model.name_or_path, "config.json").is_file()
    assert cfg.tasks == ["sst2", "mrpc", "rte", "boolq", "piqa", "openbookqa", "arc_easy", "arc_challenge"]
    assert cfg.method == {"name": "more"}
    assert cfg.train.weight_decay == 0.01
    assert cfg.data.sampling == "exp"


@pytest.mark.parametrize("alias", ["minilm", ""])
def test_minilm_alias(alias: str) -> None:
    assert load_config(None, [f"model.name_or_path={alias}"]).model.name_or_path == bundled_minilm_path()


def test_overrides_parse_values() -> None:
    cfg = load_config(None, [
        "tasks=[sst2,rte]", "method.r=16", "train.lr=1e-3", "train.max_steps=1e3", "data.mixed_batches=true",
        "data.max_train_per_task=null", "method.target_modules=[query,value]", "train.max_grad_norm=none",
        "method.name=more",
    ])
    assert cfg.tasks == ["sst2", "rte"]
    assert cfg.method == {"name": "more", "r": 16, "target_modules": ["query", "value"]}
    assert cfg.method_options == {"r": 16, "target_modules": ["query", "value"]}
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.mixed_batches is True
    assert cfg.data.max_train_per_task is None and cfg.train.max_grad_norm is None
    assert load_config(None, ["tasks=sst2,rte"]).tasks == ["sst2", "rte"]


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["tasks=[rte]", "method.r=4", "train.seed=3"])
    cfg.dump(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["method"] == {"name": "more", "r": 4}


def test_overrides_apply_on_top_of_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("tasks: [sst2]\ntrain: {lr: 0.1, batch_size: 4}\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.lr=0.5"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.tasks) == (0.5, 4, ["sst2"])
    raw = {"train": {"lr": 1}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1}}  # the input is not modified


def test_task_files(tmp_path: Path) -> None:
    cfg = RunConfig.from_dict({"task_files": {"mine": {"path": "x.jsonl", "kind": "classification"}}})
    assert cfg.tasks == ["mine"]
    cfg = RunConfig.from_dict({"tasks": ["sst2"], "task_files": {"mine": {"path": "x.jsonl", "kind": "text2text"}}})
    assert cfg.tasks == ["sst2", "mine"]
    with pytest.raises(ConfigError, match="task_files.mine.kind: expected one of"):
        RunConfig.from_dict({"task_files": {"mine": {"path": "x.jsonl", "kind": "nope"}}})
    with pytest.raises(ConfigError, match="missing config key task_files.mine.kind"):
        RunConfig.from_dict({"task_files": {"mine": {"path": "x.jsonl"}}})


@pytest.mark.parametrize(("override", "message"), [
    ("train.lrr=1", r"unknown config key train\.lrr; valid keys under train: output_dir, seed, lr"),
    ("foo=1", r"unknown config key foo; valid keys: model, tasks, task_files, data, method, train"),
    ("model.size=3", r"unknown config key model\.size; valid keys under model: name_or_path"),
    ("train.lr=fast", r"train\.lr: expected float, got 'fast'"),
    ("train.max_steps=2.5", r"train\.max_steps: expected int, got 2\.5"),
    ("train.batch_size=true", r"train\.batch_size: expected int, got True"),
    ("data.mixed_batches=3", r"data\.mixed_batches: expected bool, got 3"),
    ("data.sampling=random", r"data\.sampling: expected one of exp, proportional, uniform, temperature"),
    ("train.mixed_precision=fp8", r"train\.mixed_precision: expected one of no, fp16, bf16, got 'fp8'"),
    ("train.batch_size=0", r"train\.batch_size: expected a value >= 1, got 0"),
    ("train.logging_steps=0", r"train\.logging_steps: expected a value >= 1, got 0"),
    ("train.lr=-1e-3", r"train\.lr: expected a value >= 0, got -0\.001"),
    ("model=3", r"model: expected a mapping, got 3"),
    ("tasks=[]", r"tasks: at least one task"),
    ("tasks=[a,a]", r"tasks: duplicate task names"),
    ("train", r"bad override 'train': expected key=value"),
    ("train.lr.x=1", r"train\.lr: expected float, got \{.x.: 1\}"),
])
def test_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "tab.yaml").write_text("model:\n  max_length: 64\ntrain:\n  lr: 1e-3\n   seed: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "tab.yaml")
    assert str(err.value) == (f"{tmp_path / 'tab.yaml'}, line 5, column 8: invalid YAML (mapping values are not "
                              "allowed here)")


@pytest.mark.parametrize("name", ["demo.yaml", "paper_t5_glue.yaml", "paper_llama2_commonsense.yaml",
                                  "paper_llama2_commonsense_4bit.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.tasks and cfg.method_name == "more"


def test_dotted_keys_create_mappings_and_name_the_non_mapping_prefix():
    from morelora.config import set_dotted

    raw = {"train": {"lr": 0.1}}
    set_dotted(raw, "model.pooling", "mean")
    assert raw == {"train": {"lr": 0.1}, "model": {"pooling": "mean"}}
    with pytest.raises(ValueError, match=r"^train\.lr$"):
        set_dotted(raw, "train.lr.x", 1)
    with pytest.raises(ConfigError, match=r"bad override 'train.lr.x=1': train.lr is not a mapping"):
        apply_overrides(raw, ["train.lr.x=1"])


# ------------------------------------------------------------------------------------------------ base: key


def test_base_key_deep_merges_the_child_over_its_base_chain(tmp_path: Path) -> None:
    from morelora.config import read_config_file

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "root.yaml").write_text(
        "tasks: [sst2, rte]\nmethod: {name: more, r: 8, target_modules: [query, value]}\n"
        "train: {lr: 1.0e-3, max_steps: 100, output_dir: runs/root}\n")
    (tmp_path / "common" / "mid.yaml").write_text(
        "base: root.yaml\nmethod: {r: 4}\ntrain: {max_steps: 50}\n")
    (tmp_path / "child.yaml").write_text(
        "base: common/mid.yaml\nmethod: {routing: hard, target_modules: [query]}\ntrain: {output_dir: runs/child}\n")
    expected = {
        "tasks": ["sst2", "rte"],
        "method": {"name": "more", "r": 4, "target_modules": ["query"], "routing": "hard"},
        "train": {"lr": 1.0e-3, "max_steps": 50, "output_dir": "runs/child"},
    }
    assert read_config_file(tmp_path / "child.yaml") == expected
    cfg = load_config(tmp_path / "child.yaml", ["train.max_steps=7"])
    assert cfg.method == expected["method"] and cfg.train.max_steps == 7 and cfg.train.lr == 1.0e-3
    assert "base" not in yaml.safe_load(yaml.safe_dump(cfg.to_dict()))


def test_base_key_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base config not found: .*missing\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntasks: [sst2]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base configs form a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base: expected the path of a config file"):
        load_config(tmp_path / "d.yaml")


def test_ablation_variants_are_their_base_plus_one_switch() -> None:
    """Each ablation file holds its base, its switch and its run folder: nothing else can drift."""
    folder = REPO / "configs" / "ablations"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if path.stem == "full":
            assert raw["base"] == "../compare_offline.yaml"
            continue
        assert raw["base"] == "full.yaml" and raw["train"].pop("output_dir") == f"runs/ablations/{path.stem}"
        switch = {k: v for k, v in raw.items() if k != "base" and v}   # a train switch: train.lr_ratios
        assert len(switch) == 1 and len(next(iter(switch.values()))) == 1, path.name
