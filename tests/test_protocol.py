"""bench/protocol.py: the protocol's order, its learning-rate winners from validation alone, and run claims."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_protocol(out: Path, archive: Path, monkeypatch, name: str = "heads"):
    """bench/protocol.py loaded afresh for protocol ``name`` with its run folder and archive under tmp_path."""
    monkeypatch.setenv("MORELORA_PROTOCOL", name)
    monkeypatch.setenv("MORELORA_PROTOCOL_DIR", str(out))
    monkeypatch.setenv("MORELORA_PROTOCOL_ARCHIVE", str(archive))
    spec = importlib.util.spec_from_file_location(f"protocol_script_{name}", ROOT / "bench" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def protocol(tmp_path, monkeypatch):
    return _load_protocol(tmp_path / "p", tmp_path / "archive", monkeypatch)


def _finish(run_dir: Path, validation: float, steps: int = 10, test: float = 0.5) -> None:
    """A finished run as the trainer leaves it: eval.json (test), metrics.jsonl (validation curve), predictions."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps({"average": test, "train": {"steps": steps}}))
    rows = [{"step": steps // 2, "split": "validation", "eval_average": validation + 0.3},  # not the last step
            {"step": steps, "loss": 1.0},
            {"step": steps, "split": "validation", "eval_average": validation}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "test_predictions.json").write_text("{}")


def test_order_winner_by_final_validation_and_seeds(protocol):
    p = protocol
    rows = p.ordered_runs()
    sweep_more = [r.label for r, w in rows[:3]]
    assert sweep_more == ["more_lr3e-4", "more_lr1e-3", "more_lr3e-3"] and rows[3][0].label == "lora_lr3e-4"
    assert [w for r, w in rows if w][:2] == ["more", "lora"]          # seeds wait for the sweeps
    first = rows[0][0]
    assert first.cfg.train.lr == pytest.approx(3e-4) and first.cfg.method["name"] == "more"
    assert first.cfg.train.eval_steps > 0, "sweep runs log a validation curve"
    # test scores favour 3e-3, validation favours 1e-3: the winner follows the final validation average
    for lr, val, test in [("3e-4", 0.50, 0.60), ("1e-3", 0.58, 0.55), ("3e-3", 0.55, 0.90)]:
        _finish(p.OUT / f"more_lr{lr}" / "seed0", val, test=test)
    s = p.sweep("more")
    assert s["winner"] == "1e-3" and s["runs"]["3e-4"] == pytest.approx(0.50)
    rows = p.ordered_runs()
    seeds = [(r.label, r.seed) for r, w in rows if w is None and r.label.startswith("more_lr1e-3")]
    assert seeds == [("more_lr1e-3", 0), ("more_lr1e-3", 1), ("more_lr1e-3", 2), ("more_lr1e-3", 3),
                     ("more_lr1e-3", 4)]
    assert "more" not in [w for _, w in rows if w]


def test_status_names_a_finished_sweep_run_without_its_final_validation(protocol, capsys):
    """A sweep run that finished without the validation row of its last step (stopped between that checkpoint
    and its evaluation, before the trainer evaluated it on resume) blocks the choice: status says what to do."""
    p = protocol
    for r in [r for r, w in p.ordered_runs() if w is None and r.label.startswith("lora_lr")]:
        _finish(r.run_dir, 0.5)
        r.cfg.dump(r.run_dir / "config.yaml")
    run_dir = p.OUT / "lora_lr1e-3" / "seed0"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")   # the last step's validation row lost
    assert p.sweep("lora")["winner"] is None and p.final_validation(run_dir) is None
    capsys.readouterr()
    p.status()
    out = capsys.readouterr().out
    assert "sweep lora       lr 3e-4: 50.00, lr 1e-3: -, lr 3e-3: 50.00  -> winner (not yet)" in out
    assert (f"lora_lr1e-3 finished without the validation score of its last step, so this sweep cannot choose: "
            f"`morelora train {run_dir / 'config.yaml'} --resume` evaluates it") in out
    assert out.count("finished without the validation score") == 1
    assert "planned runs finished (+4 seed runs for each of the 6 methods whose sweep is not finished)" in out
    for r in [r for r, w in p.ordered_runs() if w is None and r.seed == 0 and "_lr" in r.label]:
        _finish(r.run_dir, 0.5)                             # every sweep finished: no seed run is left unplanned
        r.cfg.dump(r.run_dir / "config.yaml")
    _finish(run_dir, 0.5)
    assert not [w for _, w in p.ordered_runs() if w in p.PROTOCOL["methods"]]
    p.status()
    out = capsys.readouterr().out
    assert re.search(r"^protocol in .*: 18 of \d+ planned runs finished$", out, re.M), out.splitlines()[0]


def test_claims_exclude_live_workers_and_take_over_dead_ones(protocol):
    p = protocol
    run = p.ordered_runs()[0][0]
    assert p.claim(run) and not p.claim(run), "a claim is held until released"
    lock = p._lock(run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": p.socket.gethostname(), "boot": p._boot_id()}))
        assert not p.claim(run), "a live worker's claim is respected"
    finally:
        other.kill()
        other.wait()
    assert p.claim(run), "a dead worker's claim is taken over"
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    p.release(run)
    assert not lock.exists()


def test_ablations_are_more_at_its_winning_lr_plus_each_files_switch(protocol):
    """Each configs/ablations file differs from full.yaml in its switch alone; its protocol row differs from MoRE's
    winner in exactly those keys (and the bookkeeping of seed, folder and curve), and waits for MoRE's sweep."""
    from morelora.config import config_diff, load_config

    p = protocol
    assert p.ordered_runs()[-1] == (None, "more (the ablations)")
    for lr, val in [("3e-4", 0.50), ("1e-3", 0.52), ("3e-3", 0.58)]:
        _finish(p.OUT / f"more_lr{lr}" / "seed0", val)
    rows = [r for r, w in p.ordered_runs() if w is None and r.label.startswith("ablation_")]
    files = sorted(f.stem for f in (ROOT / "configs" / "ablations").glob("*.yaml") if f.stem != "full")
    assert len(files) == 10 and sorted({r.label for r in rows}) == [f"ablation_{f}" for f in files]
    assert sorted({r.seed for r in rows}) == [0, 1, 2, 3, 4] and len(rows) == 50
    more = {r.seed: r.cfg for r, w in p.ordered_runs() if w is None and r.label == "more_lr3e-3"}
    full = load_config(ROOT / "configs" / "ablations" / "full.yaml")
    bookkeeping = {"train.output_dir", "train.eval_steps"}
    for r in rows:
        switch = config_diff(full, load_config(ROOT / "configs" / "ablations" / f"{r.label[9:]}.yaml"))
        switch = [k for k in switch if k != "train.output_dir"]
        assert len(switch) == 1, (r.label, switch)
        got = [k for k in config_diff(more[r.seed], r.cfg) if k not in bookkeeping]
        assert got == switch, (r.label, got, switch)
        assert r.cfg.train.lr == pytest.approx(3e-3) and r.cfg.train.eval_steps == 0
    hard = next(r for r in rows if r.label == "ablation_no_ste")
    assert hard.cfg.method["routing"] == "hard" and hard.cfg.method["name"] == "more"


def _finish_with_predictions(run, correct: list[list[bool]]) -> None:
    """``run`` finished for real bookkeeping: its config, eval.json and test predictions (1 = right answer)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.cfg.dump(run.run_dir / "config.yaml")
    tasks = {}
    for t, right in zip(run.cfg.tasks, correct):
        refs = [i % 2 for i in range(len(right))]
        tasks[t] = {"main_metric": "accuracy", "num_labels": 2, "references": refs,
                    "predictions": [r if ok else 1 - r for r, ok in zip(refs, right)]}
    scores = {t: sum(c) / len(c) for t, c in zip(run.cfg.tasks, correct)}
    (run.run_dir / "eval.json").write_text(json.dumps({
        "average": sum(scores.values()) / len(scores), "train": {"steps": run.cfg.train.max_steps},
        "tasks": {t: {"score": s, "main_metric": "accuracy"} for t, s in scores.items()}}))
    (run.run_dir / "test_predictions.json").write_text(json.dumps({"split": "test", "tasks": tasks}))


def test_ablation_report_pairs_finished_rows_with_mores_seeds(protocol, capsys):
    import random

    p = protocol
    for (run, _), val in zip(p.ordered_runs()[:3], [0.50, 0.58, 0.52]):
        _finish(run.run_dir, val, steps=run.cfg.train.max_steps)
        run.cfg.dump(run.run_dir / "config.yaml")
    with pytest.raises(SystemExit, match="more's seeds are not all finished"):
        p.report(with_ablations=True)
    rng = random.Random(0)
    more = [r for r, w in p.ordered_runs() if w is None and r.label == "more_lr1e-3"]
    hard = [r for r, w in p.ordered_runs() if w is None and r.label == "ablation_no_ste"]
    n = 40
    for run in more:
        _finish_with_predictions(run, [[rng.random() < 0.7 for _ in range(n)] for _ in run.cfg.tasks])
    with pytest.raises(SystemExit, match="no ablation row has 2 finished seeds"):
        p.report(with_ablations=True, interim=True)
    # interim: the rows with >= 2 finished seeds, over the seeds they (and MoRE) share
    runs = [r for r, w in p.ordered_runs() if w is None]
    part = [r for r in runs if r.label == "ablation_no_rank_scaling" and r.seed in (0, 1, 3)]
    one = [r for r in runs if r.label == "ablation_no_contrastive" and r.seed == 0]
    for run in part + one:
        _finish_with_predictions(run, [[rng.random() < 0.6 for _ in range(n)] for _ in run.cfg.tasks])
    capsys.readouterr()
    p.report(with_ablations=True, interim=True)
    assert "interim: seeds 0, 1, 3 (of 5)" in capsys.readouterr().out
    saved = json.loads((p.OUT / "ablations_interim" / "results.json").read_text())
    assert list(saved["methods"]) == ["more_lr1e-3", "ablation_no_rank_scaling"] and saved["seeds"] == [0, 1, 3]
    avg = {lab: [json.loads((r.run_dir / "eval.json").read_text())["average"] for r in runs]
           for lab, runs in [("part", part), ("more", [more[s] for s in (0, 1, 3)])]}
    assert saved["tests"]["ablation_no_rank_scaling"]["diff_average"] == pytest.approx(
        sum(avg["part"]) / 3 - sum(avg["more"]) / 3)
    # the same rows and MoRE against LoRA's winner (its sweep and seeds finished)
    with pytest.raises(SystemExit, match="lora's seeds are not all finished"):
        p.report(with_ablations=True, interim=True, against_lora=True)
    for run, val in zip([r for r, w in p.ordered_runs() if w is None and r.label.startswith("lora_")][:3],
                        [0.50, 0.58, 0.52]):
        _finish(run.run_dir, val, steps=run.cfg.train.max_steps)
    lora = [r for r, w in p.ordered_runs() if w is None and r.label == "lora_lr1e-3"]
    for run in lora:
        _finish_with_predictions(run, [[rng.random() < 0.65 for _ in range(n)] for _ in run.cfg.tasks])
    p.report(with_ablations=True, interim=True, against_lora=True)
    saved = json.loads((p.OUT / "ablations_interim_vs_lora" / "results.json").read_text())
    assert list(saved["methods"]) == ["lora_lr1e-3", "more_lr1e-3", "ablation_no_rank_scaling"]
    assert saved["seeds"] == [0, 1, 3] and saved["tests"]["more_lr1e-3"]["baseline"] == "lora_lr1e-3"
    lora_avg = [json.loads((lora[s].run_dir / "eval.json").read_text())["average"] for s in (0, 1, 3)]
    assert saved["tests"]["ablation_no_rank_scaling"]["diff_average"] == pytest.approx(
        sum(avg["part"]) / 3 - sum(lora_avg) / 3)
    with pytest.raises(SystemExit, match="no ablation row has all its seeds finished"):
        p.report(with_ablations=True)
    for run in hard:
        _finish_with_predictions(run, [[rng.random() < 0.5 for _ in range(n)] for _ in run.cfg.tasks])
    capsys.readouterr()
    p.report(with_ablations=True)
    printed = capsys.readouterr().out
    saved = json.loads((p.OUT / "ablations" / "results.json").read_text())
    assert list(saved["methods"]) == ["more_lr1e-3", "ablation_no_ste"] and "ablation_no_ste" in printed
    want = sum(json.loads((r.run_dir / "eval.json").read_text())["average"] for r in hard) / 5 - sum(
        json.loads((r.run_dir / "eval.json").read_text())["average"] for r in more) / 5
    assert saved["tests"]["ablation_no_ste"]["diff_average"] == pytest.approx(want)
    assert saved["tests"]["ablation_no_ste"]["baseline"] == "more_lr1e-3"


def test_seeds_interleave_and_the_early_ablation_comes_before_the_other_rows(protocol):
    p = protocol
    for m in ("more", "lora"):
        for lr, val in [("3e-4", 0.50), ("1e-3", 0.58), ("3e-3", 0.52)]:
            _finish(p.OUT / f"{m}_lr{lr}" / "seed0", val)
    todo = [(r.label, r.seed) for r, w in p.ordered_runs() if w is None and not (r.run_dir / "eval.json").exists()]
    assert todo[:8] == [(lab, s) for s in (1, 2, 3, 4) for lab in ("more_lr1e-3", "lora_lr1e-3")]
    early = p.PROTOCOL["early_ablations"]
    assert todo[8:8 + 5 * len(early)] == [(lab, s) for lab in early for s in range(5)]
    assert early[0] == "ablation_prefix_mask_ste" and early != sorted(early)   # the listed order, not A-Z
    assert todo[8 + 5 * len(early)] == ("lora_r16_lr3e-4", 0)
    labels = [lab for lab, _ in todo]
    assert labels.count("ablation_no_rank_scaling") == 5 and len(labels) == len(set(todo)) == 8 + 4 * 3 + 50
    assert labels.index("ablation_no_ste") > labels.index("hydralora_lr3e-3")
    assert labels.index("ablation_no_rank_scaling") > labels.index("hydralora_lr3e-3")   # not in early_ablations
    # after the other rows: next_ablations first (all seeds), then the rest A-Z
    last = [lab for lab in dict.fromkeys(labels) if lab.startswith("ablation_") and lab not in early]
    assert last == ["ablation_router_lr10", "ablation_task_embedding_std1", "ablation_no_rank_scaling",
                    "ablation_no_ste", "ablation_no_task_embeddings", "ablation_official_frozen_routing",
                    "ablation_random_sampling", "ablation_subset_experts"]
    assert labels.index("ablation_router_lr10") > labels.index("hydralora_lr3e-3")


def test_interim_report_pairs_the_seeds_both_rows_have_finished(protocol, capsys):
    import random

    p = protocol
    with pytest.raises(SystemExit, match="lora's learning-rate sweep is not finished"):
        p.report(interim=True)
    for (run, _), val in zip(p.ordered_runs()[:6], [0.50, 0.58, 0.52, 0.50, 0.52, 0.58]):
        _finish(run.run_dir, val, steps=run.cfg.train.max_steps)
    rng = random.Random(1)
    winners = {"more": "more_lr1e-3", "lora": "lora_lr3e-3"}
    runs = {m: [r for r, w in p.ordered_runs() if w is None and r.label == lab] for m, lab in winners.items()}
    assert [r.seed for r in runs["more"]] == [0, 1, 2, 3, 4]
    for m, seeds, rate in [("more", [0, 1, 2], 0.7), ("lora", [0, 1, 3], 0.6)]:   # seeds 0 and 1 in common
        for s in seeds:
            run = runs[m][s]
            _finish_with_predictions(run, [[rng.random() < rate for _ in range(30)] for _ in run.cfg.tasks])
    capsys.readouterr()
    p.report(interim=True)
    printed = capsys.readouterr().out
    saved = json.loads((p.OUT / "interim" / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and list(saved["methods"]) == ["lora_lr3e-3", "more_lr1e-3"]
    assert "seeds 0, 1 (of 5)" in printed

    def avg(run):
        return json.loads((run.run_dir / "eval.json").read_text())["average"]
    want = sum(avg(runs["more"][s]) - avg(runs["lora"][s]) for s in (0, 1)) / 2
    assert saved["tests"]["more_lr1e-3"]["diff_average"] == pytest.approx(want)
    assert saved["tests"]["more_lr1e-3"]["combined"]["mde"] > 0
    # the same seeds against MoRE: its row first, the difference's sign turned, the same noise
    p.report(interim=True, baseline="more")
    vs_more = json.loads((p.OUT / "interim_vs_more" / "results.json").read_text())
    assert vs_more["seeds"] == [0, 1] and list(vs_more["methods"]) == ["more_lr1e-3", "lora_lr3e-3"]
    assert "against more_lr1e-3" in capsys.readouterr().out
    assert vs_more["tests"]["lora_lr3e-3"]["diff_average"] == pytest.approx(-want)
    assert vs_more["tests"]["lora_lr3e-3"]["combined"]["mde"] == pytest.approx(
        saved["tests"]["more_lr1e-3"]["combined"]["mde"])
    with pytest.raises(SystemExit, match="no row named 'mora'; the rows are more, lora, lora_r16"):
        p.report(interim=True, baseline="mora")
    with pytest.raises(SystemExit, match="--baseline applies to `report --interim`"):
        p.report(baseline="more")
    with pytest.raises(SystemExit, match="--baseline does not apply to --ablations"):
        p.report(baseline="more", with_ablations=True)


def test_diagnose_on_real_tiny_runs(protocol, tiny_bert, tmp_path, capsys):
    """`diagnose` on a trained MoRE and LoRA pair: the ranks of the checkpoint, the update norms' ratio, the test
    difference of the two eval.json files."""
    import yaml
    from conftest import tiny_run_config

    from morelora.analysis.updates import relative_update_norms, run_update_norms
    from morelora.experiments.runs import execute

    p = protocol
    cfg = tiny_run_config(tiny_bert, tmp_path / "unused", eval_steps=6, lr=5e-3)
    cfg["tasks"], cfg["data"] = ["rte", "sst2"], {"max_train_per_task": 16, "max_eval_per_task": 8}
    p.CONFIG = tmp_path / "tiny.yaml"
    p.CONFIG.write_text(yaml.safe_dump(cfg))
    for run, _ in p.ordered_runs()[:6]:
        if run.label in ("more_lr1e-3", "lora_lr1e-3"):
            execute([run])
        else:   # a losing sweep run: its validation score only
            _finish(run.run_dir, -1.0, steps=run.cfg.train.max_steps)
            run.cfg.dump(run.run_dir / "config.yaml")
            (run.run_dir / "test_predictions.json").unlink()
    ablation = next(r for r, _ in p.ordered_runs() if r is not None and r.label == "ablation_no_rank_scaling")
    execute([ablation])
    r16 = [r for r, _ in p.ordered_runs() if r is not None and r.label.startswith("lora_r16_") and r.seed == 0]
    for run in r16:   # another method's sweep: its 1e-3 run wins, its update is compared with LoRA's
        if run.label == "lora_r16_lr1e-3":
            execute([run])
        else:
            _finish(run.run_dir, -1.0, steps=run.cfg.train.max_steps)
            run.cfg.dump(run.run_dir / "config.yaml")
    capsys.readouterr()
    out = p.diagnose()
    printed = capsys.readouterr().out
    more, lora = p.OUT / "more_lr1e-3" / "seed0", p.OUT / "lora_lr1e-3" / "seed0"
    assert out["train_examples"] == {"rte": 16, "sst2": 16}
    assert [r["label"] for r in out["runs"]] == ["more_lr1e-3", "ablation_no_rank_scaling"]
    no_scaling = relative_update_norms(run_update_norms(ablation.run_dir), run_update_norms(lora))
    r16_rel = relative_update_norms(run_update_norms(p.OUT / "lora_r16_lr1e-3" / "seed0"), run_update_norms(lora))
    assert list(out["other_rows"]) == ["lora_r16_lr1e-3"] and out["other_rows"]["lora_r16_lr1e-3"]["seeds"] == [0]
    assert out["other_rows"]["lora_r16_lr1e-3"]["update_norm_vs_lora"] == pytest.approx(r16_rel)
    assert re.search(rf"^lora_r16_lr1e-3 +seeds 0: rte {r16_rel['rte']:.3f}, sst2 {r16_rel['sst2']:.3f}$", printed,
                     re.M)
    assert out["runs"][1]["tasks"]["rte"]["update_norm_vs_lora"] == pytest.approx(no_scaling["rte"])
    ckpt = sorted(more.glob("checkpoint-*"))[-1] / "adapter" / "adapter_config.json"
    ranks = json.loads(ckpt.read_text())["task_ranks"]
    rel = relative_update_norms(run_update_norms(more), run_update_norms(lora))
    tests = [json.loads((d / "eval.json").read_text())["tasks"] for d in (more, lora)]
    for t, d in out["runs"][0]["tasks"].items():
        assert d["mean_rank"] == pytest.approx(sum(ranks[t].values()) / len(ranks[t]))
        assert d["update_norm_vs_lora"] == pytest.approx(rel[t]) and 0 < d["update_norm_vs_lora"]
        assert d["test_minus_lora"] == pytest.approx(tests[0][t]["score"] - tests[1][t]["score"])
        assert 1 / 4 <= d["router_top_p"] <= 1 and 0 <= d["router_margin"] <= d["router_top_p"]
    assert "more_lr1e-3 s0" in printed and "|dW|/LoRA" in printed
    task = next(iter(out["runs"][1]["tasks"]))
    assert re.search(rf"^ablation_no_rank_scaling s0 +{task} ", printed, re.M), "a long label stays in its column"
    # the routing log over training, recomputed here from routing.jsonl: logs at steps 2, 4, 6 of 6 -> the pairs
    # (2, 4) and (4, 6) fall in the third and fourth quarters; the first two quarters have none
    logs = [r for r in map(json.loads, (more / "routing.jsonl").read_text().splitlines()) if r.get("task_ranks")]
    assert [r["step"] for r in logs] == [2, 4, 6]
    routing = out["runs"][0]["routing"]
    for t, layers in logs[-1]["task_ranks"].items():
        switched = [sum(a["task_ranks"][t][k] != b["task_ranks"][t][k] for k in layers) / len(layers)
                    for a, b in zip(logs, logs[1:])]
        assert routing["switch_by_quarter"][t][:2] == [None, None]
        assert routing["switch_by_quarter"][t][2:] == pytest.approx(switched)
        assert routing["first_mean_rank"][t] == pytest.approx(sum(logs[0]["task_ranks"][t].values()) / len(layers))
        assert routing["last_mean_rank"][t] == pytest.approx(sum(layers.values()) / len(layers))
    for key, log in (("first_distinct_ranks", logs[0]), ("last_distinct_ranks", logs[-1])):
        ranks = log["task_ranks"]
        per_layer = [len({ranks[t][m] for t in ranks}) for m in next(iter(ranks.values()))]
        assert routing[key] == pytest.approx(sum(per_layer) / len(per_layer)) and 1 <= routing[key] <= len(ranks)
    mean_q4 = 100 * sum(v[3] for v in routing["switch_by_quarter"].values()) / len(routing["switch_by_quarter"])
    assert re.search(rf"^more_lr1e-3 s0 +- / +- / +[\d.]+ / +{mean_q4:.1f} +distinct "
                     rf"{routing['first_distinct_ranks']:.2f}->{routing['last_distinct_ranks']:.2f}; {task} ",
                     printed, re.M)
    # one seed per row: the row's means are that run's figures, printed under the row's label
    assert out["rows"]["more_lr1e-3"]["seeds"] == [0]
    for t, d in out["runs"][0]["tasks"].items():
        assert out["rows"]["more_lr1e-3"]["tasks"][t] == pytest.approx(d)
    assert out["rows"]["more_lr1e-3"]["switch_by_quarter"][:2] == [None, None]
    d = out["runs"][0]["tasks"][task]
    figures = [f"{d['mean_rank']:.2f}", f"{d['router_top_p']:.3f}", f"{d['router_margin']:.3f}",
               f"{d['update_norm_vs_lora']:.3f}", f"{100 * d['test_minus_lora']:+.2f}"]
    assert re.search(rf"^ +{task}" + "".join(" +" + re.escape(f) for f in figures) + "$", printed, re.M)
    assert re.search(rf"^ +switching +- / +- / +[\d.]+ / +{mean_q4:.1f} +distinct", printed, re.M)
    # archived, the runs lose their weights (a fresh clone): diagnose reads the same from analysis.json
    for run in [ablation] + [r for r, _ in p.ordered_runs()[:6]]:
        if run.label not in ("more_lr1e-3", "lora_lr1e-3", ablation.label):
            (run.run_dir / "test_predictions.json").write_text("{}")   # the losing sweep runs: finished too
        assert p.archive_run(run) is not None
    shutil.rmtree(p.OUT)
    assert p.restore() == 7 and not list(p.OUT.glob("*/seed0/checkpoint-*"))
    assert p.diagnose()["runs"] == out["runs"]


def test_row_means_average_each_rows_seeds_by_hand(protocol):
    """`row_means`: per row, every task figure averaged over its seeds; the switching per quarter is the mean over
    the seeds of the mean over the tasks that have that quarter (None where no seed has it), and a seed without a
    routing log counts in the task figures only."""
    def run(label, seed, k, top, switch=None, first=1.0, last=2.0):
        r = {"label": label, "seed": seed, "tasks": {"a": {"mean_rank": k, "router_top_p": top},
                                                       "b": {"mean_rank": 2 * k, "router_top_p": top / 2}}}
        if switch is not None:
            r["routing"] = {"switch_by_quarter": switch, "first_distinct_ranks": first, "last_distinct_ranks": last}
        return r

    runs = [run("more", 0, 2.0, 0.4, {"a": [None, 0.2, 0.1, 0.0], "b": [None, 0.4, None, 0.2]}, 1.0, 3.0),
            run("ablation_x", 0, 5.0, 0.9),
            run("more", 1, 3.0, 0.6, {"a": [None, 0.6, 0.3, 0.1], "b": [None, 0.0, 0.5, 0.1]}, 2.0, 2.0),
            run("more", 2, 4.0, 0.8)]
    rows = protocol.row_means(runs)
    assert list(rows) == ["more", "ablation_x"] and rows["more"]["seeds"] == [0, 1, 2]
    assert rows["more"]["tasks"]["a"] == pytest.approx({"mean_rank": 3.0, "router_top_p": 0.6})
    assert rows["more"]["tasks"]["b"] == pytest.approx({"mean_rank": 6.0, "router_top_p": 0.3})
    # quarter 2: seed 0 (0.2 + 0.4) / 2 = 0.3, seed 1 (0.6 + 0.0) / 2 = 0.3; quarter 3: 0.1 and (0.3 + 0.5) / 2
    assert rows["more"]["switch_by_quarter"] == [None, pytest.approx(0.3), pytest.approx(0.25), pytest.approx(0.1)]
    assert (rows["more"]["first_distinct_ranks"], rows["more"]["last_distinct_ranks"]) == (1.5, 2.5)
    assert rows["ablation_x"]["tasks"]["b"]["mean_rank"] == 10.0 and "switch_by_quarter" not in rows["ablation_x"]


def test_protocol_set_overrides_every_run_of_the_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("MORELORA_PROTOCOL_DIR", str(tmp_path / "gpu"))
    monkeypatch.setenv("MORELORA_PROTOCOL_SET", "train.max_steps=4500 train.warmup_steps=225")
    spec = importlib.util.spec_from_file_location("protocol_set", ROOT / "bench" / "protocol.py")
    p = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(p)
    runs = [r for r, w in p.ordered_runs() if w is None]
    assert runs and all(r.cfg.train.max_steps == 4500 and r.cfg.train.warmup_steps == 225 for r in runs)
    assert all(str(r.run_dir).startswith(str(tmp_path / "gpu")) for r in runs)
    assert runs[0].cfg.train.lr == pytest.approx(3e-4), "the sweep's own keys still apply"


def test_power_splits_the_noise_and_projects_the_reported_mde(protocol, capsys):
    """`power` reads the winners' predictions of the seeds both finished; its components are those of the
    per-example differences built here, and its projection at those seeds is the interim report's MDE."""
    import random

    import numpy as np

    from morelora.experiments.statistics import combined_test, variance_components

    p = protocol
    for (run, _), val in zip(p.ordered_runs()[:6], [0.50, 0.58, 0.52, 0.50, 0.52, 0.58]):
        _finish(run.run_dir, val, steps=run.cfg.train.max_steps)
        run.cfg.dump(run.run_dir / "config.yaml")
    with pytest.raises(SystemExit, match="fewer than 2 finished seeds in common"):
        p.power()
    runs = {m: [r for r, w in p.ordered_runs() if w is None and r.label == lab]
            for m, lab in {"more": "more_lr1e-3", "lora": "lora_lr3e-3"}.items()}
    rng, correct = random.Random(2), {}
    for m, seeds, rate in [("more", [0, 1, 2], 0.7), ("lora", [0, 1, 2, 3], 0.6)]:
        for s in seeds:
            correct[m, s] = [[rng.random() < rate + (0.25 * (i % 3 - 1) if m == "more" else 0) for i in range(40)]
                             for _ in runs[m][s].cfg.tasks]   # MoRE's own easy and hard examples
            _finish_with_predictions(runs[m][s], correct[m, s])
    out = p.power()
    tasks = runs["more"][0].cfg.tasks
    want = variance_components({t: np.array([np.subtract(correct["more", s][j], correct["lora", s][j], dtype=float)
                                             for s in (0, 1, 2)]) for j, t in enumerate(tasks)})
    assert out["seeds"] == [0, 1, 2]
    for k in ("seeds", "examples_var", "seed_var", "interaction_var"):
        assert out["components"][k] == pytest.approx(want[k])
    p.report(interim=True)
    reported = json.loads((p.OUT / "interim" / "results.json").read_text())["tests"]["more_lr1e-3"]["combined"]
    # as reported = the combined test with the bootstrap's variance at infinitely many resamples (ddof 0 there:
    # n / (n - 1) apart), and with the report's 1000 resamples
    pooled = [np.mean([np.subtract(correct["more", s][j], correct["lora", s][j], dtype=float) for s in (0, 1, 2)], 0)
              for j in range(len(tasks))]
    boot_var = sum(np.var(c) / len(c) for c in pooled) / len(tasks) ** 2
    seed_diffs = [np.mean([np.mean(np.subtract(correct["more", s][j], correct["lora", s][j], dtype=float))
                           for j in range(len(tasks))]) for s in (0, 1, 2)]
    exact = combined_test(seed_diffs, boot_var)["mde"]
    assert out["projection"]["3"]["as_reported"]["mde"] == pytest.approx(exact, rel=0.02)
    assert out["projection"]["3"]["as_reported"]["mde"] == pytest.approx(reported["mde"], rel=0.1)
    assert out["projection"]["3"]["estimate"]["mde"] < reported["mde"]   # without the twice-counted part
    printed = capsys.readouterr().out
    assert "more_lr1e-3 - lora_lr3e-3, seeds 0, 1, 2" in printed and "MDE <= 1.00 (estimate)" in printed


def test_power_says_when_the_examples_floor_was_cut_at_zero(protocol, monkeypatch, capsys):
    """Seeds that disagree on every example and agree on the means (E's estimate < 0, cut): `power` says the
    floor is optimistic; differences with a clear example effect print no such note."""
    import numpy as np

    cut = {"a": np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])}
    kept = {"a": np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])}
    protocol.OUT.mkdir(parents=True)
    for diffs, warned in [(cut, True), (kept, False)]:
        monkeypatch.setattr(protocol, "_paired_diffs", lambda m, b, d=diffs: ({m: "x_lr1", b: "y_lr1"}, [0, 1, 2], d))
        out = protocol.power("x", "y")
        printed = capsys.readouterr().out
        assert (out["components"]["examples_var_estimate"] < 0) is warned
        assert ("note: E's estimate came out below 0" in printed) is warned
        if warned:
            assert "at 3 seeds the examples' part cannot be told from the seed-by-example part" in printed


def test_power_takes_an_ablation_row_on_either_side_from_the_cli(protocol):
    """`power --method no_ste --baseline more`: the ablation row (MoRE's winner plus its switch) against MoRE's
    winner over the seeds both finished; its components are those of the differences built here. A row that does
    not exist is named, with the rows there are."""
    import random

    import numpy as np

    from morelora.experiments.statistics import variance_components

    p = protocol
    for (run, _), val in zip(p.ordered_runs()[:3], [0.50, 0.58, 0.52]):   # MoRE's sweep: 1e-3 wins
        _finish(run.run_dir, val, steps=run.cfg.train.max_steps)
        run.cfg.dump(run.run_dir / "config.yaml")
    runs = [r for r, w in p.ordered_runs() if w is None]
    rows = {k: [r for r in runs if r.label == k] for k in ("more_lr1e-3", "ablation_no_ste")}
    assert len(rows["ablation_no_ste"]) == 5 and rows["ablation_no_ste"][0].cfg.method["name"] == "more"
    rng, correct = random.Random(5), {}
    for k, seeds, rate in [("more_lr1e-3", [0, 1, 2, 3], 0.7), ("ablation_no_ste", [0, 1, 2], 0.6)]:
        for s in seeds:
            correct[k, s] = [[rng.random() < rate + (0.2 * (i % 2) if k == "more_lr1e-3" else 0) for i in range(30)]
                             for _ in rows[k][s].cfg.tasks]
            _finish_with_predictions(rows[k][s], correct[k, s])
    tasks = rows["more_lr1e-3"][0].cfg.tasks
    diff = {t: np.array([np.subtract(correct["ablation_no_ste", s][j], correct["more_lr1e-3", s][j], dtype=float)
                         for s in (0, 1, 2)]) for j, t in enumerate(tasks)}
    want = variance_components(diff)
    out = p.power("ablation_no_ste", "more")
    assert (out["method"], out["baseline"], out["seeds"]) == ("ablation_no_ste", "more_lr1e-3", [0, 1, 2])
    for k in ("examples_var", "seed_var", "interaction_var"):
        assert out["components"][k] == pytest.approx(want[k])
    flipped = p.power("more", "no_ste")   # either side, with or without the prefix: the same noise
    assert flipped["baseline"] == "ablation_no_ste" and flipped["components"]["seed_var"] == pytest.approx(
        want["seed_var"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}   # the fixture's MORELORA_PROTOCOL_DIR / _ARCHIVE included
    cli = [sys.executable, str(ROOT / "bench" / "protocol.py"), "power"]
    res = subprocess.run([*cli, "--method", "no_ste", "--baseline", "more", "--target", "0.5"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ablation_no_ste - more_lr1e-3, seeds 0, 1, 2: noise of the test average" in res.stdout
    assert "MDE <= 0.50 (estimate): " in res.stdout
    assert json.loads((p.OUT / "power.json").read_text())["target_mde"] == pytest.approx(0.005)
    res = subprocess.run([*cli, "--method", "no_such_row"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "protocol: no row named 'no_such_row'; the rows are the methods more, lora" in res.stderr
    assert "and the ablations ablation_no_contrastive" in res.stderr


def test_archive_keeps_finished_runs_and_restores_them_into_a_fresh_folder(protocol, capsys):
    """A finished run's small files go to the archive (an unfinished one's do not); a fresh run folder gets them
    back, the run counts as finished again and is not trained twice; a finished run there is left alone."""
    import random
    p = protocol
    done, partial = [r for r, _ in p.ordered_runs()[:2]]
    rng = random.Random(2)
    _finish_with_predictions(done, [[rng.random() < 0.6 for _ in range(20)] for _ in done.cfg.tasks])
    (done.run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (done.run_dir / "analysis.json").write_text('{"update_norms": null, "task_ranks": null, "router": null}')
    (done.run_dir / "checkpoint-10").mkdir()          # weights: not archived
    partial.run_dir.mkdir(parents=True)
    partial.cfg.dump(partial.run_dir / "config.yaml")   # started, not finished
    assert p.archive_run(partial) is None
    p.status()
    assert f"not archived yet ({p.ARCHIVE}): {done.label} seed 0 --" in capsys.readouterr().out
    dest = p.archive_run(done)
    assert dest == p.ARCHIVE / done.label / "seed0"
    assert sorted(f.name for f in dest.iterdir()) == sorted(
        f"{n}.gz" for n in ["config.yaml", "eval.json", "test_predictions.json", "metrics.jsonl", "analysis.json"])
    archived = {f.name: f.read_bytes() for f in dest.iterdir()}
    assert p.archive_run(done) == dest and {f.name: f.read_bytes() for f in dest.iterdir()} == archived, \
        "archiving again changes no byte (no time stamp in the gzip files)"
    assert not (p.ARCHIVE / partial.label).exists()
    p.status()
    assert "not archived yet" not in capsys.readouterr().out
    before = {f.name: f.read_bytes() for f in done.run_dir.iterdir() if f.is_file()}
    shutil.rmtree(p.OUT)
    assert not p._finished(done)
    assert p.restore() == 1 and p._finished(done)
    assert {f.name: f.read_bytes() for f in done.run_dir.iterdir()} == before
    assert p.restore() == 0, "a finished run in the run folder is not copied again"
    from morelora.experiments.runs import execute

    assert execute([done]) == ["skipped"]


def test_a_recorded_sweep_decides_and_only_its_winners_run_is_trained_again(protocol):
    """sweeps.json (runs lost before the archive): the winner is the record's best validation score, whatever
    the re-run scores; the losing learning rates are not trained again; the seeds follow the winner."""
    p = protocol
    p.ARCHIVE.mkdir(parents=True)
    (p.ARCHIVE / "sweeps.json").write_text(json.dumps({"source": "test", "sweeps": {
        "more": {"runs": {"3e-4": 0.52, "1e-3": 0.53, "3e-3": 0.51}}}}))
    s = p.sweep("more")
    assert s == {"runs": {"3e-4": 0.52, "1e-3": 0.53, "3e-3": 0.51}, "winner": "1e-3", "recorded": True}
    assert p.sweep("lora")["recorded"] is False and p.sweep("lora")["winner"] is None
    rows = p.ordered_runs()
    more = [(r.label, r.seed) for r, w in rows if w is None and r.label.startswith("more_")]
    assert more == [("more_lr1e-3", s) for s in range(5)]
    first = next(r for r, w in rows if w is None and r.label == "more_lr1e-3")
    assert first.cfg.train.eval_steps > 0, "the winner's re-run logs its validation curve, to set beside the record"
    assert rows[1][0].label == "lora_lr3e-4"
    _finish(first.run_dir, 0.40, steps=first.cfg.train.max_steps)   # the re-run scores lower: the choice stands
    assert p.sweep("more")["winner"] == "1e-3"


def test_the_cli_says_what_it_restored(protocol):
    """`bench/protocol.py status` on a fresh run folder: the archived run is restored, and the user is told."""
    p = protocol
    archive, out = p.ARCHIVE, p.OUT
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}   # the fixture's MORELORA_PROTOCOL_DIR / _ARCHIVE included
    run = p.ordered_runs()[0][0]
    _finish_with_predictions(run, [[True, False] for _ in run.cfg.tasks])
    result = json.loads((run.run_dir / "eval.json").read_text())
    (run.run_dir / "eval.json").write_text(json.dumps({**result, "train": {**result["train"], "train_time_s": 1800.0}}))
    (run.run_dir / "metrics.jsonl").write_text(json.dumps(
        {"step": run.cfg.train.max_steps, "split": "validation", "eval_average": 0.5}) + "\n")
    p.archive_run(run)
    rows = p.ordered_runs()
    no_winner = [m for m in p.PROTOCOL["methods"] if p.sweep(m)["winner"] is None]   # their seed runs: not planned yet
    left = sum(1 for r, w in rows if w is None) - 1 + (p.PROTOCOL["seeds"] - 1) * len(no_winner)
    shutil.rmtree(out)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "protocol.py"), "status"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"protocol: 1 finished run(s) restored from {archive}" in res.stdout
    assert re.search(r"^  more_lr3e-4 +seed 0: done$", res.stdout, re.M)
    steps = run.cfg.train.max_steps   # every run of this grid: 1800 s per 1500 steps -> 1.2 s per step, 30 min a run
    assert steps == 1500
    assert (f"  left: {left} runs, {left * steps} steps, ~{left / 2:.1f} h of training at the finished runs' seconds "
            f"per step on the same tasks (1.20 s per step on the grid's tasks (1500 steps finished); one core; test "
            f"evaluation not counted), ~{left / 4:.1f} h with two workers") in res.stdout


def test_the_time_left_counts_each_run_at_its_own_task_sets_speed(protocol, tmp_path):
    """A run's steps cost what the finished runs on the same tasks cost (a two-task control steps faster than the
    grid); a task set with no finished run takes the mean of all finished runs. Hand computation."""
    from types import SimpleNamespace as NS

    from morelora.config import load_config

    p = protocol
    grid = load_config(p.CONFIG, p.SET).tasks

    def run(name, tasks, steps, seconds=None):
        d = tmp_path / name
        d.mkdir()
        if seconds is not None:
            (d / "eval.json").write_text(json.dumps({"train": {"train_time_s": seconds, "steps": steps}}))
        return NS(run_dir=d, cfg=NS(tasks=tasks, train=NS(max_steps=steps)))

    control = run("control", ["sst2", "sst2_flipped"], 600, 240.0)         # 0.4 s per step
    swept = run("swept", grid, 1500, 1800.0)                               # 1.2 s per step
    todo = [run("c2", ["sst2", "sst2_flipped"], 600), *(run(f"g{i}", grid, 1500) for i in range(3)),
            run("alone", ["piqa"], 452)]
    mean = 2040 / 2100                                                     # piqa alone: every finished run's rate
    hours = (600 * 0.4 + 3 * 1500 * 1.2 + 452 * mean) / 3600
    line = p._time_left([(r, None) for r in [control, swept, *todo]], [control, swept])
    assert line == (f"  left: 5 runs, 5552 steps, ~{hours:.1f} h of training at the finished runs' seconds per step "
                    f"on the same tasks (1.20 s per step on the grid's tasks (1500 steps finished); one core; test "
                    f"evaluation not counted), ~{hours / 2:.1f} h with two workers")
    assert f"~{hours:.1f} h" != f"~{5552 * mean / 3600:.1f} h", "one rate for every run gives another figure"


def test_a_parked_run_resumes_on_a_fresh_machine_where_it_stopped(protocol, tiny_bert, tmp_path, capsys):
    """`park` puts a run in training's newest checkpoint (config, logs up to its step) in the archive; on a fresh
    run folder `unpark` unpacks it, the run resumes at that step and ends as the run that was never stopped did;
    archiving the finished run drops the parked file. A run a live worker here trains is never unpacked over."""
    import yaml
    from conftest import tiny_run_config
    from safetensors.torch import load_file

    from morelora.experiments.runs import execute

    p = protocol
    p.CONFIG = tmp_path / "tiny.yaml"
    p.CONFIG.write_text(yaml.safe_dump(tiny_run_config(tiny_bert, tmp_path / "unused", eval_steps=0)))
    run = p.ordered_runs()[0][0]
    assert execute([run]) == ["trained"]
    straight_adapter = load_file(str(run.run_dir / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    straight_eval = json.loads((run.run_dir / "eval.json").read_text())
    straight_rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the same run as a worker killed after step 4 leaves it: checkpoint-3 the newest, logs past it, no results
    shutil.rmtree(run.run_dir / "checkpoint-6")
    for name in ("eval.json", "test_predictions.json"):
        (run.run_dir / name).unlink()
    assert p.park() == 1 and p.park() == 0, "a run parked at its newest step is not parked again"
    parked = p.ARCHIVE / run.label / "seed0" / p.PARKED
    assert p._parked_step(parked) == 3
    with tarfile.open(parked) as tar:
        assert tar.next().name == "checkpoint-3", "the checkpoint comes first: its step is read from the first block"
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        tar.add(run.run_dir / "config.yaml", arcname="config.yaml")
    with pytest.raises(ValueError, match="holds no checkpoint folder: park the run again"):
        p._parked_step(broken)
    p.status()
    printed = capsys.readouterr().out
    assert f"parked in the archive (resumed from there on a new machine): {run.label}/seed0 at step 3" in printed
    assert re.search(rf"^  {run.label} +seed 0: partial \(step 6 of 6, checkpoint 3\)$", printed, re.M), \
        "logged to 6, saved at 3"

    shutil.rmtree(p.OUT)                                   # a fresh machine: nothing but the repository
    (p.OUT / ".claims").mkdir(parents=True)
    lock = p.OUT / ".claims" / f"{run.label}-seed0.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": p.socket.gethostname(), "boot": p._boot_id()}))
    assert p.unpark() == [] and not run.run_dir.exists(), "a run a live worker trains here is left alone"
    lock.unlink()
    assert p.unpark() == [(f"{run.label}/seed0", 3)]
    assert sorted(f.name for f in run.run_dir.iterdir()) == ["checkpoint-3", "config.yaml", "metrics.jsonl",
                                                             "provenance.jsonl", "routing.jsonl"]
    unpacked_rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert unpacked_rows == [r for r in straight_rows if r["step"] <= 3], "the logs cut back to the parked step"
    assert p.unpark() == [], "unpacked once: the run folder now has that checkpoint"

    assert execute([run]) == ["resumed"]
    events = [json.loads(x) for x in (run.run_dir / "provenance.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 3)]
    resumed = load_file(str(run.run_dir / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == straight_adapter.keys()
    for k in resumed:
        torch_close(resumed[k], straight_adapter[k], k)
    assert json.loads((run.run_dir / "eval.json").read_text())["average"] == pytest.approx(straight_eval["average"])
    rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in straight_rows]
    assert p.archive_run(run) is not None and not parked.exists(), "a finished run's parked checkpoint is dropped"


def torch_close(a, b, name: str) -> None:
    import torch

    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_pool_joins_an_earlier_reports_seeds_with_this_folders(protocol, capsys):
    """`pool`: the earlier draw's per-seed task-average differences (from its results.json alone) and this folder's
    (from the predictions) form one sample; the test examples' variance E + W / S comes from this folder's
    predictions; the seed-only t-test and Welch's test of the two draws agree with scipy on the same numbers."""
    import random

    import numpy as np
    from scipy import stats

    from morelora.experiments.statistics import variance_components

    p = protocol
    p.ARCHIVE.mkdir(parents=True)
    (p.ARCHIVE / "sweeps.json").write_text(json.dumps({"source": "test", "sweeps": {
        m: {"runs": {"3e-4": 0.50, "1e-3": 0.53, "3e-3": 0.51}} for m in ("more", "lora")}}))
    rows = [r for r, w in p.ordered_runs() if w is None and r.label in ("more_lr1e-3", "lora_lr1e-3") and r.seed < 3]
    rng = random.Random(5)
    tasks = rows[0].cfg.tasks
    n = 40
    correct = {}
    for run in rows:
        bias = 0.1 if run.label.startswith("lora") else 0.0
        correct[(run.label, run.seed)] = [[rng.random() < 0.5 + bias for _ in range(n)] for _ in tasks]
        _finish_with_predictions(run, correct[(run.label, run.seed)])
    diffs = {t: np.array([np.array(correct[("more_lr1e-3", s)][i], float) - np.array(correct[("lora_lr1e-3", s)][i])
                          for s in range(3)]) for i, t in enumerate(tasks)}
    d_now = np.mean([d.mean(1) for d in diffs.values()], axis=0)
    prev_scores = {lab: {t: [rng.uniform(0.4, 0.6) for _ in range(4)] for t in tasks}
                   for lab in ("more_lr1e-3", "lora_lr1e-3")}
    reported = {"diff": -0.01, "se": 0.005, "df": 30.0, "ci_low": -0.02, "ci_high": 0.0, "p": 0.05, "mde": 0.014}
    prev = {"seeds": [0, 1, 2, 3], "tasks": tasks, "num_examples": {t: n for t in tasks},
            "methods": {lab: {"tasks": {t: {"scores": v} for t, v in sc.items()}} for lab, sc in prev_scores.items()},
            "tests": {"more_lr1e-3": {"baseline": "lora_lr1e-3", "combined": reported}}}
    path = p.OUT / "earlier" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(prev))
    capsys.readouterr()
    out = p.pool(path)
    d_before = np.array([np.mean([prev_scores["more_lr1e-3"][t][s] - prev_scores["lora_lr1e-3"][t][s] for t in tasks])
                         for s in range(4)])
    both = np.concatenate([d_before, d_now])
    # seeds 0-2 ran in both draws: one cluster each (the mean of its two runs); seed 3 only in the earlier one
    clusters = np.array([(d_before[0] + d_now[0]) / 2, (d_before[1] + d_now[1]) / 2, (d_before[2] + d_now[2]) / 2,
                         d_before[3]])
    comp = variance_components(diffs)
    assert out["seed_diffs"]["now"] == pytest.approx(d_now.tolist())
    assert out["seed_diffs"]["previous"] == pytest.approx(d_before.tolist())
    assert out["cluster_diffs"] == pytest.approx(clusters.tolist())
    assert out["pooled"]["diff"] == pytest.approx(clusters.mean())
    se2 = clusters.var(ddof=1) / 4 + comp["examples_var"] + comp["interaction_var"] / 7
    assert out["pooled"]["se"] == pytest.approx(np.sqrt(se2))
    assert out["pooled_unclustered"]["diff"] == pytest.approx(both.mean())   # the runs as if independent
    se2_runs = both.var(ddof=1) / 7 + comp["examples_var"] + comp["interaction_var"] / 7
    assert out["pooled_unclustered"]["se"] == pytest.approx(np.sqrt(se2_runs))
    assert out["same_seed_correlation"] == pytest.approx(np.corrcoef(d_before[:3], d_now)[0, 1])
    assert out["previous"] == reported, "the earlier draw as its own report gave it"
    for t in tasks:   # per task: the same clustering with that task's own examples' variance
        d_t = np.concatenate([np.subtract(prev_scores["more_lr1e-3"][t], prev_scores["lora_lr1e-3"][t]),
                              diffs[t].mean(1)])
        c_t = np.array([(d_t[0] + d_t[4]) / 2, (d_t[1] + d_t[5]) / 2, (d_t[2] + d_t[6]) / 2, d_t[3]])
        c = comp["tasks"][t]
        assert out["tasks"][t]["diff"] == pytest.approx(c_t.mean())
        se2_t = c_t.var(ddof=1) / 4 + max(0.0, c["sigma2_e"] + c["sigma2_w"] / 7) / n   # unbiased: may be < 0
        assert out["tasks"][t]["se"] == pytest.approx(np.sqrt(se2_t))
    assert out["seed_only_ttest"]["p"] == pytest.approx(stats.ttest_1samp(clusters, 0).pvalue)
    assert out["draws_differ"]["p"] == pytest.approx(stats.ttest_ind(d_before, d_now, equal_var=False).pvalue)
    printed = capsys.readouterr().out
    pooled = out["pooled"]
    assert (f"pooled, seeds as clusters{4:>15}{100 * pooled['diff']:>8.2f}   {100 * pooled['ci_low']:>6.2f} to "
            f"{100 * pooled['ci_high']:>5.2f}") in printed
    assert json.loads((p.OUT / "pooled.json").read_text())["pooled"]["diff"] == pytest.approx(clusters.mean())
    assert (p.OUT / "pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    prev["tasks"] = tasks[:-1]
    path.write_text(json.dumps(prev))
    with pytest.raises(SystemExit, match="was not made on this protocol's tasks and test sets"):
        p.pool(path)
    del prev["methods"]["lora_lr1e-3"]
    path.write_text(json.dumps(prev))
    with pytest.raises(SystemExit, match="has no row lora_lr1e-3"):
        p.pool(path)


@pytest.fixture()
def shared_protocol(tmp_path, monkeypatch):
    return _load_protocol(tmp_path / "s", tmp_path / "archive", monkeypatch, "shared")


def test_shared_protocol_pilot_then_control_then_the_grid_with_the_headroom(shared_protocol):
    """The pilot first (its two chosen forms, then the reported one) and nothing else until it has a winner;
    the winner's encoding then reaches every later run: the control (sst2 against sst2_flipped, seed by seed,
    with and without the task's name), the grid's sweeps, and after LoRA's sweep the single-task runs whose
    steps are train.max_steps x each task's exp-sampling probability."""
    import numpy as np

    from morelora.data import get_task

    p = shared_protocol
    rows = p.ordered_runs()
    assert [r.label for r, _ in rows[:3]] == ["pilot_siamese_prefix", "pilot_cross_prefix", "pilot_siamese"]
    assert rows[3] == (None, "the pilot (the scorer's form)") and len(rows) == 4
    first = rows[0][0].cfg
    assert (first.model.scorer, first.model.encoding, first.model.task_prefix, first.method["name"],
            first.train.max_steps, first.train.eval_steps) == ("shared", "siamese", True, "lora", 500, 250)
    assert rows[2][0].cfg.model.task_prefix is False
    # the reported run does not take part in the choice, however it scores
    _finish(p.OUT / "pilot_siamese" / "seed0", 0.90, steps=500)
    _finish(p.OUT / "pilot_siamese_prefix" / "seed0", 0.50, steps=500)
    assert p.pilot()["winner"] is None
    _finish(p.OUT / "pilot_cross_prefix" / "seed0", 0.55, steps=500)
    assert p.pilot()["winner"] == "pilot_cross_prefix"
    rows = p.ordered_runs()
    control = [r for r, _ in rows if r is not None and r.label.startswith("control_")]
    assert [(r.label, r.seed) for r in control[:7]] == [
        ("control_lora", 0), ("control_multilora", 0), ("control_more", 0), ("control_lora_prefix", 0),
        ("control_multilora_prefix", 0), ("control_more_prefix", 0), ("control_lora", 1)]
    assert len(control) == 18 and all(r.cfg.tasks == ["sst2", "sst2_flipped"] for r in control)
    assert all(r.cfg.model.encoding == "cross" and r.cfg.train.lr == pytest.approx(1e-3) for r in control)
    assert [r.cfg.model.task_prefix for r in control[:6]] == [False] * 3 + [True] * 3
    assert control[0].run_dir == p.OUT / "control" / "control_lora" / "seed0"
    grid = [r for r, _ in rows if r is not None and r.label.startswith("lora_lr")]
    assert grid and all(r.cfg.model.encoding == "cross" and r.cfg.model.task_prefix for r in grid)
    assert (None, "lora (the headroom)") in rows and not any(r and r.label.startswith("alone_") for r, _ in rows)
    for lr, val in [("3e-4", 0.5), ("1e-3", 0.6), ("3e-3", 0.55)]:
        _finish(p.OUT / f"lora_lr{lr}" / "seed0", val, steps=1500)
    alone = [r for r, _ in p.ordered_runs() if r is not None and r.label.startswith("alone_")]
    tasks = ["sst2", "piqa", "openbookqa", "arc_easy", "arc_challenge"]
    sizes = np.array([len(get_task(t).load()["train"]) for t in tasks], dtype=float)
    probs = np.exp(sizes / sizes.sum()) / np.exp(sizes / sizes.sum()).sum()   # the paper's exp(n_t / N)
    assert [(r.label, r.seed) for r in alone[:5]] == [(f"alone_{t}", 0) for t in tasks] and len(alone) == 15
    assert [r.cfg.train.max_steps for r in alone[:5]] == [round(1500 * q) for q in probs]
    assert all(r.cfg.tasks == [r.label.removeprefix("alone_")] and r.cfg.train.lr == pytest.approx(1e-3)
               and r.cfg.model.encoding == "cross" and r.cfg.method["name"] == "lora" for r in alone)
    assert p.ablations() == {}


def _fake_run(run, scores: dict[str, list[int]], refs: dict[str, list[int]], validation: float = 0.5) -> None:
    """A finished run whose test predictions are ``scores[t]`` (predicted classes) against ``refs[t]``."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.cfg.dump(run.run_dir / "config.yaml")
    acc = {t: sum(int(a == b) for a, b in zip(scores[t], refs[t])) / len(refs[t]) for t in scores}
    (run.run_dir / "eval.json").write_text(json.dumps({
        "average": sum(acc.values()) / len(acc), "train": {"steps": run.cfg.train.max_steps},
        "tasks": {t: {"score": a, "main_metric": "accuracy", "num_examples": len(refs[t])} for t, a in acc.items()}}))
    (run.run_dir / "test_predictions.json").write_text(json.dumps({"tasks": {
        t: {"predictions": scores[t], "references": refs[t], "main_metric": "accuracy", "num_labels": 2}
        for t in scores}}))
    rows = [{"step": run.cfg.train.max_steps, "split": "validation", "eval_average": validation}]
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shared_protocol_headroom_report_pairs_each_task_alone_with_the_multi_task_lora(shared_protocol, capsys):
    """`report --study headroom`: per task, LoRA alone minus the multi-task LoRA of the same seed, averaged over
    the seeds (a hand computation), with the combined test's CI / p / MDE, as JSON and a markdown table."""
    import numpy as np

    p = shared_protocol
    for label in p.PROTOCOL["pilot"]:
        (p.OUT / label / "seed0").mkdir(parents=True)
    _finish(p.OUT / "pilot_siamese_prefix" / "seed0", 0.6, steps=500)
    _finish(p.OUT / "pilot_cross_prefix" / "seed0", 0.5, steps=500)
    for lr, val in [("3e-4", 0.5), ("1e-3", 0.6), ("3e-3", 0.55)]:
        _finish(p.OUT / f"lora_lr{lr}" / "seed0", val, steps=1500)
    (p.OUT / "lora_lr1e-3" / "seed0" / "eval.json").unlink()   # the winner's seed 0 is rewritten below
    tasks = p.grid_tasks()
    rng = np.random.default_rng(0)
    refs = {t: rng.integers(0, 2, 40).tolist() for t in tasks}

    def guesses(right: float) -> dict[str, list[int]]:
        return {t: [r if rng.random() < right else 1 - r for r in refs[t]] for t in tasks}

    multi = {s: guesses(0.6) for s in range(3)}
    alone = {s: guesses(0.8) for s in range(3)}
    lora = {r.seed: r for r in p._runs(["lora_lr1e-3"], 3)}
    for s in range(3):
        _fake_run(lora[s], multi[s], refs, validation=0.6)   # seed 0 is the sweep's winning run
    for r in p._headroom_runs("1e-3"):
        task = r.label.removeprefix("alone_")
        _fake_run(r, {task: alone[r.seed][task]}, {task: refs[task]})
    capsys.readouterr()
    rows = p.report_study("headroom")
    printed = capsys.readouterr().out
    for t in tasks:
        acc = [[np.mean(np.equal(g[s][t], refs[t])) for s in range(3)] for g in (alone, multi)]
        assert rows[t]["diff"] == pytest.approx(np.mean(acc[0]) - np.mean(acc[1]))
        assert rows[t]["alone"] == pytest.approx(np.mean(acc[0])) and rows[t]["seeds"] == [0, 1, 2]
        assert rows[t]["ci_low"] < rows[t]["diff"] < rows[t]["ci_high"] and rows[t]["mde"] > 0
        assert f"| {t} | {100 * np.mean(acc[0]):.2f} | {100 * np.mean(acc[1]):.2f} | " in printed
    # the task average: per seed the mean of the tasks' differences; its SE² = the seeds' term + Σ var_t / T², each
    # task's example variance var_t read back from its own row (SE_t² minus its seeds' term)
    acc = {t: [np.array([np.mean(np.equal(g[s][t], refs[t])) for s in range(3)]) for g in (alone, multi)]
           for t in tasks}
    d = np.mean([acc[t][0] - acc[t][1] for t in tasks], axis=0)
    var_t = [rows[t]["se"] ** 2 - np.var(acc[t][0] - acc[t][1], ddof=1) / 3 for t in tasks]
    avg = rows["average"]
    assert avg["diff"] == pytest.approx(d.mean()) and avg["seeds"] == [0, 1, 2]
    assert avg["alone"] == pytest.approx(np.mean([acc[t][0] for t in tasks]))
    assert avg["se"] == pytest.approx(np.sqrt(np.var(d, ddof=1) / 3 + sum(var_t) / len(tasks) ** 2))
    assert avg["ci_low"] < avg["diff"] < avg["ci_high"]
    assert (f"| **average** | {100 * avg['alone']:.2f} | {100 * avg['multi_task']:.2f} | {100 * d.mean():+.2f} ("
            in printed)
    assert json.loads((p.OUT / "headroom" / "results.json").read_text()).keys() == {*tasks, "average"}
    with pytest.raises(SystemExit) as err:
        p.report_study("learnability")
    assert str(err.value) == ("protocol: the shared protocol has no learnability study; its studies: pilot, control, "
                              "headroom (learnability is MORELORA_PROTOCOL=commonsense's)")


def test_the_heads_protocol_names_the_protocol_of_a_study_it_does_not_run(protocol):
    with pytest.raises(SystemExit) as err:
        protocol.report_study("headroom")
    assert str(err.value) == ("protocol: the heads protocol has no headroom study "
                              "(headroom is MORELORA_PROTOCOL=shared's)")


def test_pooling_seed_clusters_holds_its_false_positive_rate_where_runs_as_independent_do_not(protocol):
    """A simulation of `pool`'s setting with no true difference: 5 seeds, each trained in two draws whose
    differences share the seed's effect (same-seed correlation 0.8, as measured: 0.82). Treating the 10 runs as
    independent rejects far more than 5 % of the time; the seed clusters stay at the nominal 5 %."""
    import numpy as np

    from morelora.experiments.statistics import combined_test

    rng = np.random.default_rng(0)
    ids = [0, 1, 2, 3, 4] * 2
    reps, hits = 4000, {"clusters": 0, "runs": 0}
    for _ in range(reps):
        seed_effect = rng.normal(0, 1.0, 5)
        runs = np.concatenate([seed_effect + rng.normal(0, 0.5, 5), seed_effect + rng.normal(0, 0.5, 5)])
        hits["clusters"] += combined_test(protocol.cluster_means(runs, ids), 0.0)["p"] < 0.05
        hits["runs"] += combined_test(runs, 0.0)["p"] < 0.05
    rate = {k: v / reps for k, v in hits.items()}
    assert 0.035 < rate["clusters"] < 0.065, rate   # binomial SD at 4000 draws: 0.0034
    assert rate["runs"] > 0.12, rate


# ------------------------------------------------------------------------------------ the commonsense protocol
COMMONSENSE_TASKS = ["boolq", "piqa", "openbookqa", "arc_easy", "arc_challenge", "csqa", "socialiqa", "winogrande"]
# the learnability pilot's final validation results, per run and task: (score - reference, one-sided p)
PILOT_GAPS = {
    "pilot_lora": {"boolq": (0.02, 0.20), "piqa": (0.05, 0.001), "openbookqa": (0.20, 0.001),
                   "arc_easy": (0.25, 0.001), "arc_challenge": (0.04, 0.030), "csqa": (0.10, 0.001),
                   "socialiqa": (0.06, 0.002), "winogrande": (0.0, 0.50)},
    "pilot_more": {"boolq": (0.05, 0.010), "piqa": (0.04, 0.004), "openbookqa": (0.22, 0.001),
                   "arc_easy": (0.02, 0.050), "arc_challenge": (0.05, 0.049), "csqa": (0.12, 0.001),
                   "socialiqa": (-0.01, 0.80), "winogrande": (0.01, 0.30)},
}
# by hand: kept where BOTH runs have score > reference and p < 0.05. boolq fails for LoRA only (p 0.20), socialiqa
# for MoRE only (below its reference), arc_easy for MoRE at p = 0.050 (not < 0.05), winogrande for both
PILOT_KEPT = ["piqa", "openbookqa", "arc_challenge", "csqa"]
PILOT_STEPS = [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]
# the kept tasks' validation average by step. By hand, plateau (the first step after which no later average is more
# than 1 point above it): LoRA 2000 (0.52; later at most 0.528 <= 0.53; at 1500, 0.50 + 0.01 < 0.528), MoRE 3000
# (0.52; later at most 0.525; at 2500, 0.505 + 0.01 < 0.525). Budget: the later, 3000
PILOT_KEPT_AVERAGE = {"pilot_lora": [0.40, 0.45, 0.50, 0.52, 0.525, 0.528, 0.526, 0.527],
                      "pilot_more": [0.42, 0.47, 0.49, 0.50, 0.505, 0.52, 0.525, 0.522]}
PILOT_PLATEAU, PILOT_BUDGET = {"pilot_lora": 2000, "pilot_more": 3000}, 3000


def _pilot_curves(label: str) -> dict[str, list[tuple[int, float]]]:
    """Per task validation curves whose kept tasks average to PILOT_KEPT_AVERAGE (offsets that cancel) and whose
    dropped tasks still rise 3 points per evaluation to the end (so the 8-task average has a later plateau)."""
    offsets = dict(zip(PILOT_KEPT, [0.02, -0.02, 0.01, -0.01]))
    curves = {}
    for t in COMMONSENSE_TASKS:
        if t in offsets:
            curves[t] = [(s, v + offsets[t]) for s, v in zip(PILOT_STEPS, PILOT_KEPT_AVERAGE[label])]
        else:
            curves[t] = [(s, 0.3 + 0.03 * i) for i, s in enumerate(PILOT_STEPS)]
    return curves


def _finish_pilot(run, validation_eval: bool = True) -> None:
    """A learnability pilot run as the worker leaves it: config, eval.json (test), test predictions, its validation
    curve in metrics.jsonl (PILOT_STEPS) and, with ``validation_eval``, eval_validation.json (PILOT_GAPS)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.cfg.dump(run.run_dir / "config.yaml")
    steps = run.cfg.train.max_steps
    assert steps == PILOT_STEPS[-1]
    (run.run_dir / "eval.json").write_text(json.dumps({"average": 0.5, "train": {
        "steps": steps, "train_time_s": 2.0 * steps}}))
    (run.run_dir / "test_predictions.json").write_text("{}")
    curves = _pilot_curves(run.label)
    rows = []
    for i, s in enumerate(PILOT_STEPS):
        scores = {t: curves[t][i][1] for t in COMMONSENSE_TASKS}
        rows += [{"step": s, "loss": 1.0}, {"step": s, "split": "validation",
                                            "eval_average": sum(scores.values()) / len(scores),
                                            **{f"eval_{t}": v for t, v in scores.items()}}]
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if validation_eval:
        tasks = {t: {"score": curves[t][-1][1], "reference_score": curves[t][-1][1] - diff, "main_metric": "accuracy",
                     "vs_reference": {"diff": diff, "low": diff - 0.05, "high": diff + 0.05, "p": p},
                     "num_examples": 500} for t, (diff, p) in PILOT_GAPS[run.label].items()}
        (run.run_dir / "eval_validation.json").write_text(json.dumps({"split": "validation", "tasks": tasks}))


@pytest.fixture()
def commonsense_protocol(tmp_path, monkeypatch):
    return _load_protocol(tmp_path / "c", tmp_path / "archive", monkeypatch, "commonsense")


def test_commonsense_pilot_comes_first_and_the_grid_waits_for_its_decision(commonsense_protocol):
    """The learnability pilot (LoRA and MoRE at 1e-3, seed 0, 8 tasks at max_length 128 with the shared siamese
    scorer and the task's name, 4000 steps, a validation point every 500) and nothing else until both runs are
    trained AND evaluated on validation."""
    p = commonsense_protocol
    rows = p.ordered_runs()
    assert [(r.label, r.seed) for r, _ in rows[:2]] == [("pilot_lora", 0), ("pilot_more", 0)]
    assert rows[2:] == [(None, "the learnability pilot (tasks and budget)")]
    for (run, _), name in zip(rows[:2], ("lora", "more")):
        c = run.cfg
        assert (c.method["name"], c.train.lr, c.train.seed, c.tasks, c.model.max_length) == (
            name, pytest.approx(1e-3), 0, COMMONSENSE_TASKS, 128)
        assert (c.model.scorer, c.model.encoding, c.model.task_prefix) == ("shared", "siamese", True)
        assert (c.train.max_steps, c.train.eval_steps, c.train.warmup_steps) == (4000, 500, 200)
        assert run.run_dir == p.OUT / run.label / "seed0"
    assert p.PROTOCOLS["commonsense"] == ("commonsense.yaml", "protocol-commonsense") and p.ablations() == {}
    _finish_pilot(rows[0][0])
    _finish_pilot(rows[1][0], validation_eval=False)   # trained, not yet evaluated on validation
    assert p.ordered_runs()[2:] == [(None, "the learnability pilot (tasks and budget)")]
    assert p._finished(rows[0][0]) and not p._finished(rows[1][0]), "a pilot run is finished with its validation eval"
    assert p.learnability()["kept"] is None and p.pilot_overrides() == []
    _finish_pilot(rows[1][0])
    rows = p.ordered_runs()
    assert rows[2][0].label == "lora_lr3e-4" and (None, "lora") in rows


def test_commonsense_kept_tasks_and_budget_against_a_hand_computation(commonsense_protocol):
    """The pilot's rules on synthetic validation results: a task is kept only if both runs are above their reference
    with p < 0.05 (one method failing drops it); the budget is the later of the two runs' plateau steps of the
    KEPT tasks' validation average (PILOT_* above, computed by hand)."""
    p = commonsense_protocol
    for run, _ in p.ordered_runs()[:2]:
        _finish_pilot(run)
    d = p.learnability()
    assert d["kept"] == PILOT_KEPT
    assert d["dropped"] == ["boolq", "arc_easy", "socialiqa", "winogrande"]
    assert {lab: {t: (g["diff"], g["p"]) for t, g in gaps.items()} for lab, gaps in d["runs"].items()} == PILOT_GAPS
    for label in PILOT_PLATEAU:
        kept_average = p.average_curve(d["curves"][label], PILOT_KEPT)
        assert [s for s, _ in kept_average] == PILOT_STEPS
        assert [v for _, v in kept_average] == pytest.approx(PILOT_KEPT_AVERAGE[label])
    assert d["plateau"] == PILOT_PLATEAU and d["budget"] == PILOT_BUDGET
    # the 8-task average (the dropped tasks still rising) would give another budget: the rule reads the kept ones
    assert p.decide_budget(d["curves"], COMMONSENSE_TASKS, 0.01)[1] == 4000
    # the pure rules on their own
    assert p.kept_tasks({"a": {"x": {"diff": 0.1, "p": 0.01}, "y": {"diff": 0.1, "p": 0.01}},
                         "b": {"x": {"diff": 0.1, "p": 0.04}, "y": {"diff": 0.1, "p": 0.06}}}, 0.05) == ["x"]
    assert p.decide_budget({"a": {"x": [(1, 0.5)]}}, [], 0.01) == ({"a": None}, None), "no kept task: no budget"


def test_commonsense_grid_runs_carry_the_kept_tasks_the_length_and_the_budget(commonsense_protocol, capsys):
    """After the pilot, every grid run (the sweeps, then the winners' other seeds) trains the kept tasks at
    max_length 128 for the decided budget (warm-up 5 % of it, the sweep's curve every quarter); `report` compares
    the winners' 3 seeds with those settings."""
    import random

    p = commonsense_protocol
    for run, _ in p.ordered_runs()[:2]:
        _finish_pilot(run)
    rows = p.ordered_runs()
    grid = [r for r, w in rows[2:] if w is None]
    assert [r.label for r in grid] == [f"{m}_lr{lr}" for m in ("lora", "more") for lr in ("3e-4", "1e-3", "3e-3")]
    assert [w for _, w in rows if w] == ["lora", "more"]
    for r in grid:
        c = r.cfg
        assert (c.tasks, c.model.max_length, c.train.max_steps) == (PILOT_KEPT, 128, PILOT_BUDGET)
        assert (c.train.warmup_steps, c.train.eval_steps, c.train.seed) == (150, 750, 0)
        assert (c.model.scorer, c.model.encoding, c.model.task_prefix) == ("shared", "siamese", True)
    assert p.grid_tasks() == PILOT_KEPT
    rng = random.Random(3)
    for (run, _), val in zip([(r, None) for r in grid], [0.50, 0.58, 0.52, 0.50, 0.52, 0.58]):
        _finish(run.run_dir, val, steps=PILOT_BUDGET)
    rows = p.ordered_runs()
    seeds = [r for r, w in rows if w is None and r.seed > 0]
    assert [(r.label, r.seed) for r in seeds] == [("lora_lr1e-3", 1), ("more_lr3e-3", 1), ("lora_lr1e-3", 2),
                                                   ("more_lr3e-3", 2)]
    assert all(r.cfg.tasks == PILOT_KEPT and r.cfg.train.max_steps == PILOT_BUDGET and r.cfg.model.max_length == 128
               and r.cfg.train.eval_steps == 0 for r in seeds)
    for r in [r for r, w in rows if w is None and r.label in ("lora_lr1e-3", "more_lr3e-3")]:
        _finish_with_predictions(r, [[rng.random() < 0.6 for _ in range(30)] for _ in r.cfg.tasks])
    capsys.readouterr()
    p.report()   # compare re-plans the rows: with the pilot's keys, so the finished runs match their configs
    saved = json.loads((p.OUT / "results.json").read_text())
    assert list(saved["methods"]) == ["lora_lr1e-3", "more_lr3e-3"] and saved["seeds"] == [0, 1, 2]
    assert saved["tasks"] == PILOT_KEPT


def test_commonsense_status_and_learnability_report(commonsense_protocol, capsys):
    """`status`: the pilot's decision (each task's p for both runs, kept or dropped, the budget) and the hours left,
    by hand from the measured rates; `report --study learnability`: the per-task table and the plateau."""
    p = commonsense_protocol
    m = p.PROTOCOL["measured"]
    val, test = sum(m["validation_s"].values()), sum(m["test_s"].values())

    def hours(method, steps, evals, tasks=None):   # one run from its start
        tasks = tasks or COMMONSENSE_TASKS
        v, t = (sum(m[k][x] for x in tasks) for k in ("validation_s", "test_s"))
        return (steps * m["step_s"][method] + evals * v + t) / 3600

    p.status()
    out = capsys.readouterr().out
    assert "learnability pilot: not decided yet (pilot_lora, pilot_more: trained, then evaluated on validation)" in out
    pilot = sum(hours(x, 4000, 8 + 1) for x in ("lora", "more"))
    grid = sum(3 * hours(x, 4000, 4) + 2 * hours(x, 4000, 0) for x in ("lora", "more"))
    assert (f"  left: pilot 2 run(s), ~{pilot:.1f} h; grid 10 run(s) (at most: all 8 tasks, 4000 steps, until the "
            f"pilot decides), ~{grid:.1f} h; ~{pilot + grid:.1f} h of one worker, ~{(pilot + grid) / 2:.1f} h with two "
            "workers") in out
    assert val > 0 and test > 0
    for run, _ in p.ordered_runs()[:2]:
        _finish_pilot(run)
    p.status()
    out = capsys.readouterr().out
    assert ("learnability pilot: 4 of 8 tasks kept (both runs above the reference on validation, one-sided bootstrap "
            "p < 0.05): piqa, openbookqa, arc_challenge, csqa; dropped: boolq, arc_easy, socialiqa, winogrande") in out
    assert re.search(r"^  boolq +pilot_lora [\d.]+ \(reference [\d.]+, p 0\.200\)  pilot_more [\d.]+ \(reference "
                     r"[\d.]+, p 0\.010\)  dropped$", out, re.M)
    assert re.search(r"^  csqa .*p 0\.001\)  kept$", out, re.M)
    assert ("budget: 3000 steps, the later plateau of the kept tasks' validation average (no later gain over 1 "
            "point): pilot_lora step 2000, pilot_more step 3000") in out
    # the pilot's own s per step now (2.0 in _finish_pilot), the grid at the budget on the kept tasks
    rate = {"lora": 2.0, "more": 2.0}
    grid = sum((3 * (PILOT_BUDGET * rate[x] + 4 * sum(m["validation_s"][t] for t in PILOT_KEPT))
                + 5 * sum(m["test_s"][t] for t in PILOT_KEPT) + 2 * PILOT_BUDGET * rate[x]) / 3600
               for x in ("lora", "more"))
    assert f"  left: pilot 0 run(s), ~0.0 h; grid 10 run(s), ~{grid:.1f} h; ~{grid:.1f} h of one worker" in out
    assert "s per step: lora 2.00 (1 finished run(s)), more 2.00 (1 finished run(s))" in out
    saved = p.report_study("learnability")
    out = capsys.readouterr().out
    lora, more = (_pilot_curves(x) for x in ("pilot_lora", "pilot_more"))
    ref = lora["boolq"][-1][1] - 0.02
    assert (f"| boolq (500) | {100 * ref:.1f} | {100 * lora['boolq'][-1][1]:.1f} | 0.200 | "
            f"{100 * more['boolq'][-1][1]:.1f} | 0.010 | no |") in out
    assert "| csqa (500) |" in out and re.search(r"^\| csqa .* \| yes \|$", out, re.M)
    assert "| pilot_lora | 40.00 | 45.00 | 50.00 | 52.00 | 52.50 | 52.80 | 52.60 | 52.70 |" in out
    assert ("plateau (the first step after which the kept tasks' average never rises more than 1 point): pilot_lora "
            "step 2000, pilot_more step 3000; budget (the later): 3000 steps") in out
    assert saved["kept"] == PILOT_KEPT and saved["budget"] == PILOT_BUDGET
    assert json.loads((p.OUT / "learnability.json").read_text())["plateau"] == PILOT_PLATEAU
    assert (p.OUT / "learnability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as err:
        p.report_study("control")
    assert str(err.value) == ("protocol: the commonsense protocol has no control study; its studies: learnability "
                              "(control is MORELORA_PROTOCOL=shared's)")


def test_commonsense_pilot_runs_are_archived_with_their_validation_eval(commonsense_protocol, capsys):
    """A pilot run is archived only with its validation evaluation (which the decision reads), and a fresh run folder
    restored from the archive reaches the same decision."""
    p = commonsense_protocol
    lora, more = [r for r, _ in p.ordered_runs()[:2]]
    _finish_pilot(lora)
    _finish_pilot(more, validation_eval=False)
    assert p.archive_run(more) is None, "trained but not evaluated on validation: not finished"
    p.status()
    assert re.search(r"^  pilot_more +seed 0: trained; its validation evaluation left$", capsys.readouterr().out, re.M)
    _finish_pilot(more)
    for run in (lora, more):
        assert "eval_validation.json.gz" in {f.name for f in p.archive_run(run).iterdir()}
    before = p.learnability()
    shutil.rmtree(p.OUT)
    assert p.learnability()["kept"] is None
    assert p.restore() == 2
    after = p.learnability()
    assert after["kept"] == before["kept"] == PILOT_KEPT and after["budget"] == before["budget"] == PILOT_BUDGET


def test_commonsense_worker_evaluates_a_real_pilot_run_on_validation(commonsense_protocol, tiny_bert, tmp_path):
    """`complete` on real tiny pilot runs: trained, its last checkpoint evaluated on validation (eval_validation.json
    with `reference_gap`), archived; the decision follows the rule on those files. A pilot run parked (its
    validation evaluation not made before its machine went) is unparked on a fresh folder and completed there."""
    import yaml
    from conftest import tiny_run_config

    p = commonsense_protocol
    cfg = tiny_run_config(tiny_bert, tmp_path / "unused", eval_steps=3)
    p.CONFIG = tmp_path / "tiny.yaml"
    p.CONFIG.write_text(yaml.safe_dump(cfg))
    lora, more = [r for r, _ in p.ordered_runs()[:2]]
    p.complete(lora)
    saved = json.loads((lora.run_dir / "eval_validation.json").read_text())
    assert saved["split"] == "validation" and saved["train"]["steps"] == 6
    assert set(saved["tasks"]) == set(cfg["tasks"]) and all("p" in r["vs_reference"] for r in saved["tasks"].values())
    assert p._finished(lora) and (p.ARCHIVE / "pilot_lora" / "seed0" / "eval_validation.json.gz").is_file()
    # pilot_more trained but not yet evaluated on validation when its machine goes: `park` keeps its checkpoint
    from morelora.experiments.runs import execute

    execute([more])
    assert not p._finished(more) and p.archive_run(more) is None
    assert p.park() == 1, "a trained pilot run without its validation evaluation is parked"
    shutil.rmtree(p.OUT)
    assert p.restore() == 1 and p.unpark() == [("pilot_more/seed0", 6)]
    p.complete(more)   # resumed at its last step: its test pass again, then the validation evaluation
    assert p._finished(more) and p._finished(lora)
    gaps = {r.label: json.loads((r.run_dir / "eval_validation.json").read_text())["tasks"] for r in (lora, more)}
    want = [t for t in cfg["tasks"] if all(g[t]["vs_reference"]["diff"] > 0 and g[t]["vs_reference"]["p"] < 0.05
                                           for g in gaps.values())]
    d = p.learnability()
    assert d["kept"] == want
    if want:
        assert d["budget"] == p.decide_budget(d["curves"], want, 0.01)[1]
    else:   # a random tiny model learns nothing, as a rule: no grid to run
        assert p.ordered_runs()[2:] == [(None, "a task both pilot runs learn (none: no grid)")]
