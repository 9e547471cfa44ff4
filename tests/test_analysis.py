"""`morelora plot / fewshot / sweep` and the ablation configs, on a tiny random BERT (2 tasks, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from morelora.analysis import mean_ci, short_layer_name
from morelora.analysis.plots import (
    distinct_ranks,
    evenly_spaced,
    plot_rank_heatmap,
    plot_rank_history,
    plot_run,
    rank_matrix,
    rank_switches,
    read_checkpoint,
    read_routing,
)
from morelora.cli import main as cli_main
from morelora.config import RunConfig, load_config
from morelora.experiments.sweep import parse_values
from morelora.training import train
from morelora.training.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert) -> Path:
    """A finished 2-task MoRE run with two checkpoints and validation rows in metrics.jsonl."""
    from conftest import tiny_run_config

    out = tmp_path_factory.mktemp("analysis") / "run"
    cfg = tiny_run_config(tiny_bert, out, eval_steps=3, lr=5e-3)
    cfg["tasks"] = ["rte", "sst2"]
    cfg["data"] = {"max_train_per_task": 16, "max_eval_per_task": 8}
    return train(RunConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """A generic JSONL classification task with string labels (24 rows, no split column)."""
    path = tmp_path_factory.mktemp("fewshot") / "opinions.jsonl"
    words = [("a wonderful, moving film", "good"), ("dull and far too long", "bad")]
    path.write_text("".join(json.dumps({"text": f"{words[i % 2][0]} #{i}", "label": words[i % 2][1]}) + "\n"
                            for i in range(24)))
    return path


# ------------------------------------------------------------------------------------------------- plot


def test_plot_run_writes_pngs_and_the_rank_heatmap_matches_the_model(tiny_run: Path, tmp_path: Path) -> None:
    from morelora.analysis import load_trained_model

    assert cli_main(["plot", str(tiny_run)]) == 0
    expected = {"task_embeddings_pca", "task_similarity", "ranks", "rank_history", "rank_history_panels",
                "rank_switches", "training_curves"}
    for name in expected:
        path = tiny_run / "plots" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:4] == b"\x89PNG"

    ckpts = list_checkpoints(tiny_run)
    assert [s for s, _ in ckpts] == [3, 6]
    model = load_trained_model(tiny_run).model
    truth = model.task_ranks()
    k = plot_rank_heatmap(read_checkpoint(ckpts[-1][1])["task_ranks"], tmp_path / "ranks.png", r=4)
    tasks, modules, k_truth = rank_matrix(truth)
    assert tasks == ["rte", "sst2"] and modules == list(model.adapted_names)
    assert k.tolist() == k_truth.tolist() == [[truth[t][m] for m in modules] for t in tasks]
    assert ((k >= 1) & (k <= 4)).all()

    written = plot_run(tiny_run, out_dir=tmp_path / "again")  # same data, another folder
    assert set(written) == expected
    # the rank history is the routing log's (one entry per logging step), which ends at the final ranks
    history = read_routing(tiny_run)
    assert [s for s, _ in history] == [2, 4, 6] and history[-1][1] == truth


def test_rank_history_falls_back_to_the_checkpoints_without_a_routing_log(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = shutil.copytree(tiny_run, tmp_path / "old", ignore=shutil.ignore_patterns("plots"))
    (run_dir / "routing.jsonl").unlink()       # a run trained before the trainer wrote it
    written = plot_run(run_dir)
    assert {"rank_history", "rank_history_panels"} <= set(written) and "rank_switches" not in written


#: a hand-written routing.jsonl: task a changes 2 of its 4 layers at step 20, task b 1 of 4 at step 30
_ROUTING = [(10, {"a": [1, 2, 3, 4], "b": [4, 4, 4, 4]}),
            (20, {"a": [1, 2, 4, 1], "b": [4, 4, 4, 4]}),
            (30, {"a": [1, 2, 4, 1], "b": [1, 4, 4, 4]})]


def test_rank_history_and_switches_from_a_routing_log(tmp_path: Path) -> None:
    modules = [f"encoder.layer.{i // 2}.attention.self.{('query', 'value')[i % 2]}" for i in range(4)]
    rows = [{"step": s, "task_ranks": {t: dict(zip(modules, k)) for t, k in ranks.items()}} for s, ranks in _ROUTING]
    (tmp_path / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "ta')
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                    for s, _ in _ROUTING))
    history = read_routing(tmp_path)               # the row cut by a kill is skipped
    assert history == [(r["step"], r["task_ranks"]) for r in rows]

    steps, fractions = rank_switches(history)
    assert steps == [20, 30]
    assert {t: f.tolist() for t, f in fractions.items()} == {"a": [0.5, 0.0], "b": [0.0, 0.25]}
    # different ranks among the tasks per layer: (2 + 2 + 2 + 1) / 4, (2 + 2 + 1 + 2) / 4, (1 + 2 + 1 + 2) / 4
    assert [distinct_ranks(ranks) for _, ranks in history] == [1.75, 1.75, 1.5]
    partial = {"a": history[0][1]["a"], "b": {modules[3]: 4, "other": 2}}   # only the layers both tasks have count
    assert distinct_ranks(partial) == 1.0 and math.isnan(distinct_ranks({}))
    means = plot_rank_history(history, tmp_path / "h.png")
    assert means.tolist() == [[2.5, 4.0], [2.0, 4.0], [2.0, 3.25]]

    written = plot_run(tmp_path)                   # no checkpoint: the routing log and the metrics only
    assert set(written) == {"rank_history", "rank_history_panels", "rank_switches", "training_curves"}
    for path in written.values():
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000, path


def test_evenly_spaced_keeps_the_last() -> None:
    assert evenly_spaced(list(range(100)), 6) == [0, 20, 40, 59, 79, 99]
    assert evenly_spaced(list(range(4)), 6) == [0, 1, 2, 3]
    assert evenly_spaced(list(range(7)), 1) == [6]


def test_small_helpers() -> None:
    assert short_layer_name("backbone.encoder.layer.3.attention.self.query") == "L3.query"
    assert short_layer_name("decoder.block.1.layer.1.EncDecAttention.v") == "dec.L1.cross.v"
    assert mean_ci([1.0])["ci95"] is None
    stat = mean_ci([0.5, 0.7, 0.6])
    assert stat["mean"] == pytest.approx(0.6) and stat["ci95"] == pytest.approx(0.2484, abs=1e-3)
    assert parse_values("tasks", "sst2,rte;sst2,rte,boolq") == [["sst2", "rte"], ["sst2", "rte", "boolq"]]
    assert parse_values("method.r", "4,8") == [4, 8]
    assert parse_values("method.target_modules", "[query];[query,value]") == [["query"], ["query", "value"]]


# ------------------------------------------------------------------------------------------ update norms


def test_update_norms_of_a_more_run_equal_its_merged_weights_and_the_equation(tiny_run: Path) -> None:
    from safetensors.torch import load_file

    from morelora.analysis import load_trained_model
    from morelora.analysis.updates import run_update_norms

    norms = run_update_norms(tiny_run)
    model = load_trained_model(tiny_run).model
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapter_layers()}
    for task in model.tasks:   # independent: what merging the task puts into the base weights
        model.merge_task(task)
        for n, layer in model.adapter_layers():
            assert norms[task][n] == pytest.approx(float((layer.base_layer.weight - w0[n]).norm()), rel=1e-4)
        model.unmerge()
    # and from the saved tensors by METHOD.md's equation: (alpha / r) B[:, :k] diag(s)^2 A[:k], s_i = i / r
    ckpt = list_checkpoints(tiny_run)[-1][1] / "adapter"
    state = load_file(str(ckpt / "adapter_model.safetensors"))
    ranks = json.loads((ckpt / "adapter_config.json").read_text())["task_ranks"]
    name = model.adapted_names[0]
    s = torch.arange(1, 5) / 4
    for task in model.tasks:
        k = ranks[task][name]
        dw = 2.0 * (state[f"{name}.lora_B"][:, :k] * s[:k] ** 2) @ state[f"{name}.lora_A"][:k]
        assert norms[task][name] == pytest.approx(float(dw.norm()), rel=1e-5)
    assert all(v > 0 for per in norms.values() for v in per.values())


def test_update_norms_of_peft_lora_relative_norms_and_token_routed_methods() -> None:
    from _tiny import tiny_bert

    import morelora
    from morelora.analysis.updates import relative_update_norms, task_update_norms

    tasks = ["a", "b"]
    lora = morelora.build_method("lora", tiny_bert(), tasks, r=4, lora_alpha=8, init_lora_weights=False)
    norms = task_update_norms(lora)
    before = {n: m.weight.detach().clone() for n, m in tiny_bert().named_modules() if hasattr(m, "weight")}
    merged = dict(lora.merge_and_unload("a").named_modules())   # PEFT's merge
    for name, value in norms["a"].items():
        assert value == pytest.approx(float((merged[name].weight - before[name]).norm()), rel=1e-4)
    assert norms["a"] == norms["b"]   # one adapter for every task

    half = {t: {m: v / 2 for m, v in per.items()} for t, per in norms.items()}
    assert relative_update_norms(half, norms) == pytest.approx({"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="no module in common"):
        relative_update_norms({"a": {"x": 1.0}}, {"a": {"y": 1.0}})
    molora = morelora.build_method("molora", tiny_bert(), tasks)
    with pytest.raises(morelora.MoreLoraError, match="routed per token"):
        task_update_norms(molora)


# ---------------------------------------------------------------------------------------------- fewshot


def test_fewshot_trains_only_the_new_task(tiny_run: Path, task_file: Path) -> None:
    from morelora.analysis import load_trained_model
    from morelora.analysis.fewshot import more_transfer
    from morelora.data import TaskSpec

    trained = load_trained_model(tiny_run)
    before = {k: v.clone() for k, v in trained.model.adapter_state_dict().items()}
    spec = TaskSpec.from_file("opinions", task_file, "classification")
    data = spec.load()
    shots, evals = data["train"][:4], data["validation"] + data["test"]
    opts = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "eval_batch_size": 16}
    out = more_transfer(trained, spec, shots, evals, seed=0, opts=opts)

    assert out["nearest"] in ("rte", "sst2")
    assert set(out["nearest_scores"]["contrastive_loss"]) == {"rte", "sst2"}
    model = out["model"]
    assert model.tasks == ["rte", "sst2", "opinions"]
    src = trained.task_names.index(out["nearest"])
    after = model.adapter_state_dict()
    assert set(after) == set(before) | {"heads.2.weight", "heads.2.bias"}
    assert after["heads.2.weight"].shape == (2, 32)
    moved = 0
    for key, old in before.items():
        if key.endswith(".task_embedding"):
            assert after[key].shape == (3, old.shape[1])
            assert torch.equal(after[key][:2], old)  # learned tasks' rows: untouched
            moved += not torch.allclose(after[key][2], old[src])  # new row: started from the nearest, trained
        else:  # A, B, gates, old heads
            assert torch.equal(after[key], old), key
    assert moved > 0
    assert all(torch.equal(v, before[k]) for k, v in trained.model.adapter_state_dict().items())  # a copy
    # the new task runs, and the learned tasks give the same outputs as before
    n_rows = sum(before[k].shape[1] for k in before if k.endswith(".task_embedding")) + 2 * 32 + 2
    assert out["trainable_parameters"] == n_rows
    assert 0.0 <= out["score"] <= 1.0 and len(out["losses"]) == 3


def test_fewshot_command_writes_json(tiny_run: Path, task_file: Path) -> None:
    rc = cli_main(["fewshot", str(tiny_run), "--task-file", str(task_file), "--task-name", "opinions",
                   "--shots", "4", "--seeds", "2", "--epochs", "1", "--max-eval", "8"])
    assert rc == 0
    result = json.loads((tiny_run / "fewshot-opinions.json").read_text())
    assert result["kind"] == "classification" and result["shots"] == 4 and result["seeds"] == [0, 1]
    assert set(result["variants"]) == {"more_transfer", "lora_scratch", "more_scratch"}
    for v in result["variants"].values():
        assert len(v["scores"]) == 2 and all(0.0 <= s <= 1.0 for s in v["scores"])
        assert v["mean"] == pytest.approx(sum(v["scores"]) / 2) and v["ci95"] is not None
        assert v["trainable_parameters"] > 0
    assert result["variants"]["more_transfer"]["trainable_parameters"] < \
        result["variants"]["lora_scratch"]["trainable_parameters"]
    assert [n["seed"] for n in result["nearest"]] == [0, 1] and result["num_eval_examples"] == [8, 8]
    # a name the run already has is refused with one error line
    assert cli_main(["fewshot", str(tiny_run), "--task-file", str(task_file), "--task-name", "rte",
                     "--shots", "4"]) == 2


# ------------------------------------------------------------------------------------------------ sweep


def test_sweep_rank_values_and_skip_on_rerun(tmp_path: Path, tiny_bert: str) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": tiny_bert, "max_length": 32},
        "tasks": ["rte", "sst2"],
        "data": {"max_train_per_task": 8, "max_eval_per_task": 4},
        "method": {"name": "more", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "unused"), "batch_size": 4, "eval_batch_size": 8, "max_steps": 2,
                  "logging_steps": 1, "save_steps": 2},
    }))
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "--param", "method.r", "--values", "2,4", "--output-dir", str(out)]
    assert cli_main(args) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["status"] == ["trained", "trained"]
    rows = result["rows"]
    assert [r["value"] for r in rows] == [2, 4] and [r["r"] for r in rows] == [2, 4]
    assert all(len(r["scores"]) == 1 and 0.0 <= r["score"]["mean"] <= 1.0 for r in rows)
    assert rows[0]["params_per_task"] < rows[1]["params_per_task"]
    assert all(1.0 <= r["mean_rank"] <= r["r"] for r in rows)
    assert (out / "method.r=2" / "seed0" / "eval.json").is_file()
    assert "| 2 |" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 5000

    stamp = (out / "method.r=4" / "seed0" / "eval.json").stat().st_mtime_ns
    assert cli_main(args) == 0  # everything is finished: nothing trains again
    again = json.loads((out / "sweep.json").read_text())
    assert again["status"] == ["skipped", "skipped"] and again["rows"] == rows
    assert (out / "method.r=4" / "seed0" / "eval.json").stat().st_mtime_ns == stamp
    # a finished run trained with another config is not silently reused
    assert cli_main([*args, "train.lr=0.5"]) == 2


# --------------------------------------------------------------------------------------- ablation configs


ABLATIONS = {
    "full": {},
    "no_rank_scaling": {"method.rank_scaling": "none"},
    "no_task_embeddings": {"method.use_task_embeddings": False},
    "no_contrastive": {"method.contrastive_weight": 0},
    "no_ste": {"method.routing": "hard"},
    "subset_experts": {"method.expert_structure": "subset"},
    "random_sampling": {"data.sampling": "uniform"},
    "official_frozen_routing": {"method.routing": "frozen"},
    "prefix_mask_ste": {"method.ste_estimator": "prefix_mask"},
    "router_lr10": {"train.lr_ratios": {r"\.(task_embedding|gate\.(weight|bias)|router_logits)$": 10.0}},
    "task_embedding_std1": {"method.task_embedding_std": 1.0},
}


def test_ablation_configs_are_the_comparison_setup_plus_one_switch() -> None:
    from morelora.config import BOOKKEEPING_TRAIN_KEYS, config_diff
    from morelora.methods import get_method

    files = sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml"))
    assert files == sorted(ABLATIONS)
    reference = load_config(REPO / "configs" / "compare_offline.yaml")
    ignore = {f"train.{k}" for k in BOOKKEEPING_TRAIN_KEYS}
    for name, switch in ABLATIONS.items():
        cfg = load_config(REPO / "configs" / "ablations" / f"{name}.yaml")
        assert config_diff(reference, cfg, ignore=ignore) == sorted(switch), name
        for key, value in switch.items():
            block, option = key.split(".")
            assert cfg.to_dict()[block][option] == value, name
        assert cfg.train.output_dir == f"runs/ablations/{name}"
        get_method(cfg.method_name).model_class.config_class.from_dict({**cfg.method_options, "tasks": cfg.tasks})
