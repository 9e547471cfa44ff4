"""The comparison protocol's long runs (docs/RESULTS.md, "The protocol"): learning-rate sweep, then seeds.

    python bench/protocol.py run      # one worker; start two (OMP_NUM_THREADS=1 each) to use two cores
    python bench/protocol.py status   # what is done, running and left; each method's sweep and its winner
    python bench/protocol.py report   # the table: `morelora compare` over every finished winner's seeds
    python bench/protocol.py report --ablations   # each ablation of MoRE against MoRE (results in OUT/ablations)
    python bench/protocol.py report --interim     # while it runs: the seeds finished so far (OUT/interim)
    python bench/protocol.py report --interim --baseline more   # the same rows against MoRE (OUT/interim_vs_more)
    python bench/protocol.py report --ablations --interim [--against-lora]   # the ablations' seeds so far
    python bench/protocol.py params   # adapter parameters of every row on the protocol's model
    python bench/protocol.py diagnose # MoRE against LoRA per task: ranks, router margins, update norms (per run,
                                      # then per row: the means over its seeds)
    python bench/protocol.py power    # MoRE - LoRA's noise split; the MDE more seeds would reach
    python bench/protocol.py power --method no_ste --baseline more --target 1.0   # any two rows
    python bench/protocol.py pool     # MoRE - LoRA over an earlier report's seeds and this folder's, pooled
    python bench/protocol.py archive  # copy every finished run's small files to the repository (ARCHIVE)
    python bench/protocol.py park     # before a machine goes: each run in training's newest checkpoint to ARCHIVE
    MORELORA_PROTOCOL=shared python bench/protocol.py report --study pilot|control|headroom
    MORELORA_PROTOCOL=commonsense python bench/protocol.py status   # with the learnability pilot's decision
    MORELORA_PROTOCOL=commonsense python bench/protocol.py report --study learnability   # its per-task table

``MORELORA_PROTOCOL`` picks the protocol: ``heads`` (the default: ``configs/protocol/protocol.yaml`` and the
``PROTOCOL`` block below), ``shared`` (``shared.yaml``, ``SHARED``: one shared scorer, with a pilot, a positive
control and single-task headroom runs before the grid; ``report --study pilot|control|headroom``) or ``commonsense``
(``commonsense.yaml``, ``COMMONSENSE``: the shared scorer on the 8-task commonsense suite; a learnability pilot
decides the tasks and the budget of every later run, ``report --study learnability``; ``status`` shows its
decision). Each has its own run folder (``runs/protocol``, ``runs/protocol-shared``, ``runs/protocol-commonsense``)
and archive. Everything is defined by the protocol's run config (shared by every run) and its block (methods,
learning rates, seeds, order). For every method:

1. sweep: one run (seed ``first``) per learning rate in ``lrs``, label ``<method>_lr<lr>``; each run logs its
   validation curve (``train.eval_steps``), ending with an evaluation at the last step;
2. winner: the learning rate with the best final *validation* average (test is never read for a choice);
3. seeds: the winner's label trained with the other seeds, so that the winner's sweep run is its first seed
   (without the validation curve: ``train.eval_steps`` is bookkeeping, so the runs still form one comparison).

After the rows: the paper's ablations under the protocol (those in ``early_ablations`` right after MoRE's and
LoRA's seeds). Each file of ``configs/ablations/`` but ``full.yaml``
is the comparison setup plus one switch; here that switch is applied to ``more`` at *its* winning learning rate
(label ``ablation_<file>``, the same seeds, no validation curve), and ``report --ablations`` compares each
against ``more``'s own seeds (the ``full`` row).

Runs are ordinary ``morelora compare`` runs in ``runs/protocol/<label>/seed<s>`` (resumable: an unfinished run
continues from its newest checkpoint; a finished one is reused). A finished run is also archived in the repository
(``docs/protocol/archive/<folder name>/<label>/seed<s>``: its config, logs, eval.json, test predictions and
``analysis.json``, the adapter's per-task update norms and router choices, gzipped; no weights), and every command
first restores archived runs missing from the run folder: a fresh clone on another machine carries on the grid
instead of starting it again. ``park`` puts the newest checkpoint of each run still in training there too
(``inflight.tar.gz``: checkpoint, config and logs up to its step; 4-7 MB on the protocol model), so that the next
machine resumes it from that step (`unpark`, also at every command) instead of training it again; the run's
``provenance.jsonl`` then records the second machine's commit and host from the resumed step. A sweep whose runs
were lost before the archive existed is decided by the record of their validation scores in ``sweeps.json`` there.
Workers take runs in the protocol's order and claim each one with a lock file holding their pid and the machine's
boot id, so two workers never train the same run and a claim left by a killed worker (dead pid, or another boot) is
taken over. Every run folder records the commit it trained with (``provenance.jsonl``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import socket
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = ROOT / "configs" / "ablations"
# which protocol: "heads" (protocol.yaml: a trainable head per task), "shared" (shared.yaml: one shared scorer,
# with its pilot, positive control and single-task headroom before the grid; see SHARED below) or "commonsense"
# (commonsense.yaml: the shared scorer on the 8-task commonsense suite, after a learnability pilot; COMMONSENSE)
NAME = os.environ.get("MORELORA_PROTOCOL", "heads")
PROTOCOLS = {"heads": ("protocol.yaml", "protocol"), "shared": ("shared.yaml", "protocol-shared"),
             "commonsense": ("commonsense.yaml", "protocol-commonsense")}   # name -> (config, run folder)
if NAME not in PROTOCOLS:
    raise SystemExit(f"protocol: MORELORA_PROTOCOL={NAME!r}; use heads (the default), shared or commonsense")
CONFIG = ROOT / "configs" / "protocol" / PROTOCOLS[NAME][0]
OUT = Path(os.environ.get("MORELORA_PROTOCOL_DIR", ROOT / "runs" / PROTOCOLS[NAME][1]))
# config overrides for every run of the grid, e.g. the same protocol at a longer budget on a GPU, in its own folder:
#   MORELORA_PROTOCOL_DIR=runs/protocol-gpu MORELORA_PROTOCOL_SET="train.max_steps=4500 train.warmup_steps=225
#   train.eval_steps=1125 train.mixed_precision=bf16" python bench/protocol.py run
SET = shlex.split(os.environ.get("MORELORA_PROTOCOL_SET", ""))
# finished runs, kept in the repository (small files only): see the module docstring
ARCHIVE = Path(os.environ.get("MORELORA_PROTOCOL_ARCHIVE", ROOT / "docs" / "protocol" / "archive" / OUT.name))
ARCHIVED = ("config.yaml", "provenance.jsonl", "metrics.jsonl", "routing.jsonl", "eval.json", "test_predictions.json",
            "analysis.json", "eval_validation.json")
# `morelora eval --split validation` of a run's last checkpoint: the learnability pilot's per-task reference gaps
VALIDATION_EVAL = "eval_validation.json"
# a run in training at `park`: its newest checkpoint with its config and logs, in ARCHIVE/<label>/seed<s>
PARKED = "inflight.tar.gz"

PROTOCOL: dict[str, Any] = {
    # method label -> method options (the shared ``method:`` block of protocol.yaml fills in the rest)
    "methods": {
        "more": {"name": "more"},
        "lora": {"name": "lora"},
        "lora_r16": {"name": "lora", "r": 16, "lora_alpha": 32},   # LoRA at MoRE's adapter parameters (1.10x)
        "multilora": {"name": "multilora"},
        "moelora": {"name": "moelora"},
        "hydralora": {"name": "hydralora"},
    },
    # the order runs are taken in: MoRE against LoRA first (the verdict), then the other rows
    "groups": [["more", "lora"], ["lora_r16", "multilora", "moelora", "hydralora"]],
    "lrs": ["3e-4", "1e-3", "3e-3"],
    "seeds": 5,
    # ablation rows run right after the first group's seeds, before the other rows: the diagnosis of MoRE against
    # LoRA (`diagnose`; docs/RESULTS.md) found MoRE's task updates a fraction of LoRA's in norm (the rank scaling
    # s_i^2 is 1/64 on rank 1) and in rank (3-4 of 8, also on the largest task, where MoRE loses most; the
    # one-hot STE only reinforces the chosen expert, the prefix-mask STE also scores the higher ranks), and the
    # routing keeps switching (the contrastive loss, 1.4 -> 0.7 over a run, moves the task embeddings the gate reads).
    # no_rank_scaling was the first of them; its 4 seeds (lost with their machine, report kept in docs/RESULTS.md)
    # did not repair MoRE (+0.40, p 0.57), so it now waits with the other ablations behind the untested two
    "early_ablations": ["ablation_prefix_mask_ste", "ablation_no_contrastive"],
    # after the other rows, these ablations first (in this order), then the rest A-Z: the router's learning rate
    # and its initialisation, the two diagnoses not yet tried (routers barely decided at the end, top probability
    # 0.16-0.36 of 8; at the default init the tasks start on the same ranks in most layers)
    "next_ablations": ["ablation_router_lr10", "ablation_task_embedding_std1"],
}


#: The shared-scorer protocol (configs/protocol/shared.yaml; docs/RESULTS.md, "Shared scorer"): no trainable
#: task-specific parameter outside the adapter method's own. Before the grid, in this order:
#:   pilot     the scorer's form on validation: LoRA at 1e-3, 500 steps, siamese (fixed cosine) against cross (one
#:             trained head), both with the task's name in the input; the winner (best final validation average)
#:             is the encoding of every later run. ``pilot_siamese`` (no task name) is reported, not chosen from.
#:   control   configs/protocol/control.yaml (sst2 against sst2_flipped, in conflict by construction): LoRA,
#:             MultiLoRA and MoRE at 1e-3, with and without the task's name, ``control_seeds`` seeds.
#:   headroom  LoRA on each task alone at LoRA's winning rate, for the steps that task gets in the multi-task run
#:             (train.max_steps x its sampling probability), seeds 0..``headroom_seeds``-1, against LoRA's
#:             multi-task seeds: the interference a router could remove. Runs right after LoRA's sweep.
SHARED: dict[str, Any] = {
    "methods": {"lora": {"name": "lora"}, "more": {"name": "more"}, "moelora": {"name": "moelora"},
                "multilora": {"name": "multilora"}},
    "groups": [["lora", "more"], ["moelora", "multilora"]],
    "lrs": ["3e-4", "1e-3", "3e-3"],
    "seeds": 5,
    "early_ablations": [],
    "next_ablations": [],
    "pilot": {"pilot_siamese_prefix": {"model.encoding": "siamese"},
              "pilot_cross_prefix": {"model.encoding": "cross"}},
    "pilot_info": {"pilot_siamese": {"model.encoding": "siamese", "model.task_prefix": False}},
    "pilot_run": {"name": "lora", "train.lr": 1e-3, "train.max_steps": 500, "train.warmup_steps": 25,
                  "train.eval_steps": 250},
    "control": ["lora", "multilora", "more"],
    "control_seeds": 3,
    "headroom_seeds": 3,
}

#: The 8-task commonsense suite (configs/protocol/commonsense.yaml; issue 36, "Beyond"): the shared-scorer setup (the
#: siamese fixed 20 * cos(u, v) its pilot chose, the task's name in the input, no trainable task-specific parameter
#: outside the adapter) on BoolQ, PIQA, OpenBookQA, ARC-Easy, ARC-Challenge, CommonsenseQA, Social IQa and
#: WinoGrande at max_length 128; LoRA against MoRE. Before the grid:
#:   learnability  LoRA and MoRE at 1e-3, seed 0, the config's own schedule (4000 steps, validation every 500:
#:                 the curve), each followed by `morelora eval --split validation` of its last checkpoint
#:                 (``eval_validation.json``: per task its score, reference and `morelora.metrics.reference_gap`).
#:                 From these alone (`learnability`; the rules of the heads protocol's pilot, docs/RESULTS.md):
#:                   tasks   kept where BOTH runs end above their reference with one-sided bootstrap p < ``alpha``
#:                           (`kept_tasks`)
#:                   budget  the later of the two runs' plateau steps (`morelora.analysis.curves.plateau_step`,
#:                           ``tolerance``) on the validation average of the kept tasks (`decide_budget`)
#:                 Every later run takes both (`pilot_overrides`): ``tasks``, ``train.max_steps`` = the budget, the
#:                 config's warm-up fraction of it, a validation curve of ``curve_points`` points for the sweep.
#: Then the grid: each method's sweep over ``lrs`` on validation, its winner to ``seeds`` seeds.
COMMONSENSE: dict[str, Any] = {
    "methods": {"lora": {"name": "lora"}, "more": {"name": "more"}},
    "groups": [["lora", "more"]],
    "lrs": ["3e-4", "1e-3", "3e-3"],
    "seeds": 3,
    "early_ablations": [],
    "next_ablations": [],
    "learnability": {"pilot_lora": {"name": "lora", "train.lr": 1e-3},
                     "pilot_more": {"name": "more", "train.lr": 1e-3}},
    "alpha": 0.05,
    "tolerance": 0.01,
    "curve_points": 4,
    # `status`'s estimate, in seconds of one worker while two share this 2-core machine: training per step until a
    # run of the method has finished (then its runs' own), and one pass of each task's full validation / test set.
    # Measured on 2026-12-07 (commit f6d4438, OMP_NUM_THREADS=1, beside the two shared-grid workers) in CPU seconds of
    # the measuring process: 30 steps after 2 of `time_steps` (LoRA 0.980, MoRE 0.977), a real validation pass of
    # the untrained LoRA (267 s for the 3,869 examples), the test pass extrapolated from it per example and task
    # (1,033 s for 13,598); times 1.53, the ratio of the shared grid's LoRA runs' 1.29 s per step (their
    # train_time_s, two workers) to the 0.844 CPU seconds its config measures the same way
    "measured": {"step_s": {"lora": 1.50, "more": 1.50},
                 "validation_s": {"boolq": 67, "piqa": 62, "openbookqa": 42, "arc_easy": 94, "arc_challenge": 51,
                                  "csqa": 39, "socialiqa": 36, "winogrande": 18},
                 "test_s": {"boolq": 441, "piqa": 228, "openbookqa": 42, "arc_easy": 392, "arc_challenge": 199,
                            "csqa": 96, "socialiqa": 139, "winogrande": 46},
                 # before evaluation batched by length (0841fa5: the shared grid's test pass 1.70x faster, BENCHMARKS):
                 # the validation / test seconds are an upper bound
                 "source": "on 2026-12-07 (COMMONSENSE's comment)"},
}
PROTOCOL = {"heads": PROTOCOL, "shared": SHARED, "commonsense": COMMONSENSE}[NAME]


def _label(method: str, lr: str) -> str:
    return f"{method}_lr{lr}"


def method_config() -> dict[str, dict[str, Any]]:
    """``{label: options}`` for ``morelora compare --method-config``: every (method, learning rate) pair."""
    return {_label(m, lr): {**opts, "train.lr": float(lr)}
            for m, opts in PROTOCOL["methods"].items() for lr in PROTOCOL["lrs"]}


def ablations() -> dict[str, dict[str, Any]]:
    """``{"ablation_<file>": switch}`` for every file of configs/ablations but full.yaml: its ``method:`` keys as
    method options, any other block's keys dotted (``data.sampling``, ``train.lr_ratios``); ``base:`` and the
    bookkeeping train keys (the run folder) are the comparison setup's, not the switch."""
    import yaml

    from morelora.config import BOOKKEEPING_TRAIN_KEYS

    out = {}
    if NAME != "heads":   # the paper's ablations belong to the per-task-heads protocol
        return out
    for path in sorted(ABLATIONS.glob("*.yaml")):
        if path.stem == "full":
            continue
        switch: dict[str, Any] = {}
        for block, values in (yaml.safe_load(path.read_text()) or {}).items():
            if block == "base":
                continue
            if block == "method":
                switch.update(values)
            else:
                switch.update({f"{block}.{k}": v for k, v in values.items()
                               if not (block == "train" and k in BOOKKEEPING_TRAIN_KEYS)})
        out[f"ablation_{path.stem}"] = switch
    return out


def ablation_config(lr: str) -> dict[str, dict[str, Any]]:
    """``{label: options}`` of the ablation rows: MoRE at learning rate ``lr`` plus each file's switch."""
    return {label: {"name": "more", **switch, "train.lr": float(lr)} for label, switch in ablations().items()}


def _runs(labels: list[str], seeds: int, extra: dict[str, dict[str, Any]] | None = None,
          config: Path | None = None, out: Path | None = None, overrides: list[str] | None = None) -> list[Any]:
    """The planned runs of ``labels`` (``seeds`` each) in ``out``/<label>/seed<s>; the shared protocol's runs after
    its pilot take the pilot's encoding (``overrides`` None: the grid's, see `pilot_overrides`)."""
    from morelora.experiments.compare import plan_runs

    if overrides is None:
        overrides = pilot_overrides()
    return plan_runs(config or CONFIG, labels, seeds, out or OUT, overrides=[*SET, *overrides],
                     method_config={**method_config(), **(extra or {})}, verbose=False)


# ------------------------------------------------------------------------------- the shared protocol's studies
def pilot_config() -> dict[str, dict[str, Any]]:
    """``{label: options}`` of the shared protocol's pilot runs (the chosen ones first, then the reported one)."""
    return {label: {**PROTOCOL["pilot_run"], **opts} for label, opts in {**PROTOCOL["pilot"],
                                                                         **PROTOCOL["pilot_info"]}.items()}


def _pilot_runs() -> list[Any]:
    extra = pilot_config()
    return _runs(list(extra), 1, extra, overrides=[])


def pilot() -> dict[str, Any]:
    """``{"runs": {label: final validation average or None}, "winner": label or None}``: the scorer's form."""
    runs = {r.label: final_validation(r.run_dir) for r in _pilot_runs()}
    chosen = {k: v for k, v in runs.items() if k in PROTOCOL["pilot"]}
    done = all(v is not None for v in chosen.values())
    return {"runs": runs, "winner": max(chosen, key=lambda k: chosen[k]) if done else None}


def pilot_overrides() -> list[str]:
    """The config keys the pilot sets for every later run: the shared pilot's winner's encoding, the commonsense
    learnability pilot's tasks and budget ([] in the heads protocol, and while the pilot runs: its decision is
    unknown and the studies wait, ``ordered_runs``)."""
    if "learnability" in PROTOCOL:
        return learnability()["overrides"]
    if "pilot" not in PROTOCOL:
        return []
    winner = pilot()["winner"]
    return [] if winner is None else [f"{k}={json.dumps(v)}" for k, v in PROTOCOL["pilot"][winner].items()]


# ------------------------------------------------------------------ the commonsense protocol's learnability pilot
def _learnability_runs() -> list[Any]:
    """LoRA's and MoRE's pilot runs (seed 0, the config's own schedule and tasks: no pilot override)."""
    extra = PROTOCOL["learnability"]
    return _runs(list(extra), 1, extra, overrides=[])


def _needs_validation_eval(run: Any) -> bool:
    """A learnability pilot run: finished once its last checkpoint is also evaluated on validation."""
    return run.label in PROTOCOL.get("learnability", {})


def validation_gaps(run_dir: Path) -> dict[str, dict[str, float]] | None:
    """``{task: {"score", "reference", "diff", "p", "n"}}`` from the run's ``eval_validation.json`` (its last
    checkpoint on validation, `morelora.metrics.reference_gap`: ``diff`` = score - reference, ``p`` the one-sided
    bootstrap p of "no better than the reference"); None until that evaluation exists."""
    path = run_dir / VALIDATION_EVAL
    if not path.is_file():
        return None
    tasks = json.loads(path.read_text())["tasks"]
    return {t: {"score": r["score"], "reference": r["reference_score"], "diff": r["vs_reference"]["diff"],
                "p": r["vs_reference"]["p"], "n": r["num_examples"]} for t, r in tasks.items()}


def kept_tasks(gaps: dict[str, dict[str, dict[str, float]]], alpha: float) -> list[str]:
    """The tasks (in the first run's order) on which EVERY run of ``gaps`` (``{label: validation_gaps}``) ends
    above its reference with one-sided p < ``alpha``: the heads protocol's pilot rule."""
    first = next(iter(gaps.values()))
    return [t for t in first if all(g[t]["diff"] > 0 and g[t]["p"] < alpha for g in gaps.values())]


def average_curve(curves: dict[str, list[tuple[int, float]]], tasks: list[str]) -> list[tuple[int, float]]:
    """``[(step, mean validation score of tasks)]`` at every step where each of ``tasks`` has a score (``curves``:
    `morelora.analysis.curves.read_curves` of a run)."""
    by_step = [dict(curves.get(t, [])) for t in tasks]
    steps = sorted(set.intersection(*(set(d) for d in by_step))) if by_step else []
    return [(s, sum(d[s] for d in by_step) / len(by_step)) for s in steps]


def decide_budget(curves: dict[str, dict[str, list[tuple[int, float]]]], tasks: list[str],
                  tolerance: float) -> tuple[dict[str, int | None], int | None]:
    """``({label: plateau step}, budget)``: each run's `plateau_step` of the ``tasks``' validation average, and
    the later of them (None when a run has no such curve)."""
    from morelora.analysis.curves import plateau_step

    plateau = {label: plateau_step(average_curve(c, tasks), tolerance) for label, c in curves.items()}
    done = bool(tasks) and all(v is not None for v in plateau.values())
    return plateau, (max(plateau.values()) if done else None)


def learnability() -> dict[str, Any]:
    """The learnability pilot's decision, from its runs' validation results alone: ``{"runs": {label:
    validation_gaps or None}, "curves": {label: read_curves}, "kept", "dropped": [task] (None until both runs are
    evaluated), "plateau": {label: step}, "budget": steps or None, "overrides": the grid's config keys ([] until
    decided)}``."""
    from morelora.analysis.curves import read_curves

    runs = _learnability_runs()
    gaps = {r.label: validation_gaps(r.run_dir) for r in runs}
    out: dict[str, Any] = {"runs": gaps, "curves": {}, "kept": None, "dropped": None, "plateau": {}, "budget": None,
                           "overrides": []}
    if any(g is None for g in gaps.values()):
        return out
    out["kept"] = kept_tasks(gaps, PROTOCOL["alpha"])
    out["dropped"] = [t for t in runs[0].cfg.tasks if t not in out["kept"]]
    out["curves"] = {r.label: read_curves(r.run_dir) for r in runs}
    out["plateau"], out["budget"] = decide_budget(out["curves"], out["kept"], PROTOCOL["tolerance"])
    if out["budget"] is not None:
        out["overrides"] = grid_overrides(out["kept"], out["budget"], runs[0].cfg)
    return out


def grid_overrides(tasks: list[str], budget: int, pilot_cfg: Any) -> list[str]:
    """The config keys of every run after the learnability pilot (whose config is ``pilot_cfg``): its kept
    ``tasks``, ``budget`` steps, the pilot's warm-up fraction of them, ``curve_points`` validation points."""
    tc = pilot_cfg.train
    return [f"tasks={json.dumps(tasks)}", f"train.max_steps={budget}",
            f"train.warmup_steps={round(tc.warmup_steps * budget / tc.max_steps)}",
            f"train.eval_steps={max(1, round(budget / PROTOCOL['curve_points']))}"]


def control_config() -> dict[str, dict[str, Any]]:
    """``{label: options}`` of the positive control: each method at 1e-3, with (``_prefix``) and without the
    task's name in the input."""
    return {f"control_{m}{'_prefix' if prefix else ''}": {"name": m, "train.lr": 1e-3, "model.task_prefix": prefix}
            for prefix in (False, True) for m in PROTOCOL["control"]}


def _control_runs() -> list[Any]:
    extra = control_config()
    runs = _runs(list(extra), PROTOCOL["control_seeds"], extra, config=CONFIG.parent / "control.yaml",
                 out=OUT / "control")
    order = list(extra)   # seed by seed, so that the comparison grows one complete seed at a time
    return sorted(runs, key=lambda r: (r.seed, order.index(r.label)))


def headroom_steps(cfg: Any) -> dict[str, int]:
    """``{task: steps}``: the optimizer steps task gets in the grid's multi-task run (config ``cfg``),
    train.max_steps x its sampling probability (data.sampling over the tasks' training sizes)."""
    from morelora.data.sampling import task_probabilities
    from morelora.training.build import build_tasks, load_data

    sizes = [len(d["train"]) for d in load_data(cfg, build_tasks(cfg))]
    probs = task_probabilities(sizes, cfg.data.sampling, cfg.data.temperature)
    return {t: max(1, round(cfg.train.max_steps * p)) for t, p in zip(cfg.tasks, probs)}


def _headroom_runs(lr: str) -> list[Any]:
    """LoRA alone on each task at ``lr`` (LoRA's winner), ``headroom_seeds`` seeds, warm-up scaled with the steps."""
    from morelora.config import load_config

    cfg, chosen = load_config(CONFIG, SET), pilot_overrides()
    runs = []
    for task, steps in headroom_steps(cfg).items():
        label = f"alone_{task}"
        extra = {label: {"name": "lora", "train.lr": float(lr)}}
        keys = [f"tasks=[{task}]", f"train.max_steps={steps}", "train.eval_steps=0",
                f"train.warmup_steps={round(cfg.train.warmup_steps * steps / cfg.train.max_steps)}",
                f"train.save_steps={min(cfg.train.save_steps, steps)}"]
        runs += _runs([label], PROTOCOL["headroom_seeds"], extra, out=OUT / "headroom",
                      overrides=[*chosen, *keys])
    return sorted(runs, key=lambda r: r.seed)


def studies() -> list[tuple[Any, str | None]]:
    """The runs before the grid: the shared protocol's pilot, then (once it has a winner) its control; the
    commonsense protocol's learnability pilot (nothing follows it until it has decided)."""
    if "learnability" in PROTOCOL:
        out: list[tuple[Any, str | None]] = [(r, None) for r in _learnability_runs()]
        decision = learnability()
        if decision["kept"] == []:
            return out + [(None, "a task both pilot runs learn (none: no grid)")]
        return out + ([] if decision["budget"] else [(None, "the learnability pilot (tasks and budget)")])
    out = [(r, None) for r in _pilot_runs()]
    if pilot()["winner"] is None:
        return out + [(None, "the pilot (the scorer's form)")]
    return out + [(r, None) for r in _control_runs()]


def final_validation(run_dir: Path) -> float | None:
    """The validation average at the run's last step (None until the run has finished)."""
    if not (run_dir / "eval.json").is_file():
        return None
    steps = json.loads((run_dir / "eval.json").read_text())["train"]["steps"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "validation" and r["step"] == steps]
    return last[-1]["eval_average"] if last else None


def _sweep_dir(method: str, lr: str) -> Path:
    """The folder of ``method``'s sweep run at ``lr`` (its first seed)."""
    return _runs([_label(method, lr)], 1)[0].run_dir


def recorded_sweeps() -> dict[str, dict[str, Any]]:
    """``{method: {"runs": {lr: final validation average}, "source": text}}``: sweeps decided by runs whose folders
    were lost (``ARCHIVE/sweeps.json``); their choice stands, and only the winner's run is trained again."""
    path = ARCHIVE / "sweeps.json"
    return json.loads(path.read_text())["sweeps"] if path.is_file() else {}


def sweep(method: str) -> dict[str, Any]:
    """``{"runs": {lr: final validation average or None}, "winner": lr or None, "recorded": bool}`` (winner once
    all are done; from ``recorded_sweeps()`` where the sweep is recorded there)."""
    record = recorded_sweeps().get(method)
    if record is not None:
        scores = {lr: record["runs"][lr] for lr in PROTOCOL["lrs"]}
        return {"runs": scores, "winner": max(scores, key=lambda lr: scores[lr]), "recorded": True}
    scores = {lr: final_validation(_sweep_dir(method, lr)) for lr in PROTOCOL["lrs"]}
    done = all(v is not None for v in scores.values())
    return {"runs": scores, "winner": max(scores, key=lambda lr: scores[lr]) if done else None, "recorded": False}


def _winner_runs(method: str) -> list[Any]:
    """Every seed's run of ``method`` at its winning learning rate ([] while its sweep has no winner)."""
    winner = sweep(method)["winner"]
    return _runs([_label(method, winner)], PROTOCOL["seeds"]) if winner else []


def ordered_runs() -> list[tuple[Any, str | None]]:
    """Every run of the protocol in order, with the method whose sweep must finish first (None: no wait).

    Per group: the sweeps, then the winners' seeds interleaved (seed 1 of every method, then seed 2, ...), so
    that the paired comparison grows one complete seed at a time; after the first group, the ablations named in
    ``early_ablations`` in their listed order (all seeds of one, then the next); the other ablations last, those in
    ``next_ablations`` first."""
    out: list[tuple[Any, str | None]] = []
    if "pilot" in PROTOCOL or "learnability" in PROTOCOL:
        out = studies()
        if out[-1][0] is None:   # every later run takes the pilot's decision
            return out
    for i, group in enumerate(PROTOCOL["groups"]):
        seeded, waiting = [], []
        for m in group:
            s = sweep(m)
            winner = s["winner"]
            lrs = [winner] if s["recorded"] else PROTOCOL["lrs"]   # a recorded sweep: its winner's run only
            out += [(r, None) for r in _runs([_label(m, lr) for lr in lrs], 1)]
            if winner is None:
                waiting.append((None, m))   # its seeds: known once the sweep has a winner
                continue
            runs = _runs([_label(m, winner)], PROTOCOL["seeds"])[1:]
            for r in runs:
                r.cfg.train.eval_steps = 0   # the curve was for the choice: the other seeds skip it
            seeded.append([(r, None) for r in runs])
        if i == 0 and "headroom_seeds" in PROTOCOL:   # right after LoRA's sweep, before the seeds
            winner = sweep("lora")["winner"]
            out += ([(r, None) for r in _headroom_runs(winner)] if winner else [(None, "lora (the headroom)")])
        out += [run for same_seed in zip(*seeded) for run in same_seed] + waiting
        if i == 0:
            out += ablation_runs(PROTOCOL["early_ablations"], wait_line=False)
    rest = [a for a in ablations() if a not in PROTOCOL["early_ablations"] + PROTOCOL["next_ablations"]]
    return out + ablation_runs(PROTOCOL["next_ablations"] + rest)


def ablation_runs(labels: list[str], wait_line: bool = True) -> list[tuple[Any, str | None]]:
    """The runs (all seeds) of the ablation rows ``labels``, or one entry waiting for MoRE's sweep."""
    if not labels:
        return []
    winner = sweep("more")["winner"]
    if winner is None:
        return [(None, "more (the ablations)")] if wait_line else []
    rows = ablation_config(winner)
    extra = {label: rows[label] for label in labels}   # in the order given: the likeliest cause first
    runs = _runs(list(extra), PROTOCOL["seeds"], extra) if extra else []
    for r in runs:
        r.cfg.train.eval_steps = 0   # the learning rate is MoRE's: no choice to make on validation
    return [(r, None) for r in runs]


# ------------------------------------------------------------------------------------------------ claims
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(run: Any) -> Path:
    return _claim_file(run.run_dir.relative_to(OUT))


def _claim_file(rel: Path) -> Path:
    """The claim (lock file) of the run in ``OUT / rel`` (``<label>/seed<s>``)."""
    return OUT / ".claims" / f"{rel.parent}-{rel.name}.lock"


def claim(run: Any) -> bool:
    """Take ``run`` for this process (False: another live worker has it)."""
    path = _lock(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held(path):
                return False
            path.unlink(missing_ok=True)   # a claim left by a killed worker
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def _held(lock: Path) -> bool:
    """The claim ``lock`` belongs to a live process of this machine (a worker at work on the run)."""
    try:
        other = json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (other.get("boot") == _boot_id() and other.get("host") == socket.gethostname()
            and _alive(int(other.get("pid", 0))))


def release(run: Any) -> None:
    _lock(run).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ archive
def run_analysis(run_dir: Path) -> dict[str, Any]:
    """What `diagnose` reads of a trained run, from its final checkpoint: ``{"update_norms": {task: {module:
    ||dW_t||}}, "task_ranks": {task: {module: k}}, "router": {task: {"top_p", "margin"}}}`` (None where the
    method has no such thing). Cached in ``run_dir/analysis.json`` (archived with the run; no weights are)."""
    path = run_dir / "analysis.json"
    if path.is_file():
        return json.loads(path.read_text())
    import numpy as np

    from morelora.analysis import load_trained_model
    from morelora.analysis.updates import task_update_norms
    from morelora.errors import MoreLoraError

    model = load_trained_model(run_dir).model
    out: dict[str, Any] = {"update_norms": None, "task_ranks": None, "router": None}
    try:
        out["update_norms"] = task_update_norms(model)
    except MoreLoraError:   # experts routed per token: no one weight change per task
        pass
    layers = [(name, layer) for name, layer in model.adapter_layers() if hasattr(layer, "router_probs")]
    if layers and hasattr(model, "task_ranks"):
        out["task_ranks"] = model.task_ranks()
        top2 = [layer.router_probs().detach().topk(2, -1).values for _, layer in layers]
        out["router"] = {t: {"top_p": float(np.mean([v[i, 0] for v in top2])),
                             "margin": float(np.mean([v[i, 0] - v[i, 1] for v in top2]))}
                         for i, t in enumerate(model.tasks)}
    path.write_text(json.dumps(out, indent=1))
    return out


def _analysable(run_dir: Path) -> bool:
    """`run_analysis` can answer: analysis.json is there, or a checkpoint to compute it from."""
    from morelora.training.checkpoint import list_checkpoints

    return (run_dir / "analysis.json").is_file() or bool(list_checkpoints(run_dir))


def _archive_dir(run: Any) -> Path:
    return ARCHIVE / run.run_dir.relative_to(OUT)


def archive_run(run: Any) -> Path | None:
    """Copy a finished run's small files (``ARCHIVED``, with its `run_analysis`), gzipped, to
    ``ARCHIVE/<label>/seed<s>``; None while the run is unfinished."""
    if not _finished(run):
        return None
    if _analysable(run.run_dir):
        run_analysis(run.run_dir)
    dest = _archive_dir(run)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        if (run.run_dir / name).is_file():   # gzip without a time stamp: archiving again changes no byte
            (dest / f"{name}.gz").write_bytes(gzip.compress((run.run_dir / name).read_bytes(), mtime=0))
    (dest / PARKED).unlink(missing_ok=True)   # its parked checkpoint, if it was resumed from one
    return dest


def _archived(run: Any) -> bool:
    return (_archive_dir(run) / "eval.json.gz").is_file()


def archive() -> None:
    """Archive every finished run of the grid (workers do it as each run finishes)."""
    done = [r for r, w in ordered_runs() if w is None and _finished(r)]
    for r in done:
        archive_run(r)
    print(f"protocol: {len(done)} finished run(s) archived in {ARCHIVE}")


def restore() -> int:
    """Copy every archived run that the run folder lacks (or holds unfinished) into it; returns how many."""
    n = 0
    for src in sorted(ARCHIVE.glob("**/seed*")):   # <label>/seed<s>, and <study>/<label>/seed<s>
        dest = OUT / src.relative_to(ARCHIVE)
        if (src / "eval.json.gz").is_file() and not (dest / "eval.json").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.glob("*.gz"):
                (dest / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
            n += 1
    return n


def _parked_step(path: Path) -> int:
    """The step of the checkpoint in a parked run's ``inflight.tar.gz`` (its first member: only the first block of
    the 4-7 MB file is read)."""
    from morelora.training.checkpoint import checkpoint_step

    with tarfile.open(path) as tar:
        for member in tar:
            if (step := checkpoint_step(member.name)) is not None:
                return step
    raise ValueError(f"{path} holds no checkpoint folder: park the run again, or delete the file to train it anew")


def _step(checkpoint: Path | None) -> int:
    from morelora.training.checkpoint import checkpoint_step

    return -1 if checkpoint is None else checkpoint_step(checkpoint.name)


def _park_run(run_dir: Path, checkpoint: Path, dest: Path) -> None:
    """Write ``dest`` (a gzipped tar, without time stamps or owners): ``checkpoint`` and the run's config and logs
    cut back to its step (the rows after it are written again when the run resumes)."""
    from morelora.training.checkpoint import LOG_FILES, truncate_metrics

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    step = _step(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for name in ("config.yaml", "provenance.jsonl", *LOG_FILES):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staged / name)
                if name in LOG_FILES:
                    truncate_metrics(staged / name, step)
        shutil.copytree(checkpoint, staged / checkpoint.name)   # FileNotFoundError if the worker prunes it now
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with open(part, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tar:
            for item in sorted(staged.iterdir(), key=lambda p: p.name != checkpoint.name):   # checkpoint first
                tar.add(item, arcname=item.name, filter=plain)
        os.replace(part, dest)


def _has_results(run_dir: Path) -> bool:
    """The run in ``run_dir`` (``<label>/seed<s>``) has its results: eval.json, and a learnability pilot run also its
    validation evaluation (until then its last checkpoint is needed: `park` keeps it)."""
    return (run_dir / "eval.json").is_file() and (run_dir.parent.name not in PROTOCOL.get("learnability", {})
                                                  or (run_dir / VALIDATION_EVAL).is_file())


def park() -> int:
    """Put the newest checkpoint of every run still in training into the archive (`PARKED`), so that a clone on
    another machine resumes it (`unpark`) instead of training it again; returns how many were parked."""
    from morelora.training.checkpoint import latest_checkpoint

    n = 0
    for run_dir in sorted(d for d in OUT.glob("**/seed*") if d.is_dir() and not _has_results(d)):
        dest = ARCHIVE / run_dir.relative_to(OUT) / PARKED
        for _ in range(3):   # the worker may replace its checkpoint while it is copied: take the new one
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is None or (dest.is_file() and _parked_step(dest) == _step(checkpoint)):
                break
            try:
                _park_run(run_dir, checkpoint, dest)
            except FileNotFoundError:
                continue
            n += 1
            print(f"protocol: parked {run_dir.relative_to(OUT)} at step {_step(checkpoint)} -> {dest}", flush=True)
            break
    return n


def unpark() -> list[tuple[str, int]]:
    """Unpack every parked run whose run folder has no newer checkpoint (and that no live worker here is
    training) into its run folder, where the next worker resumes it; returns ``[(run, step)]`` unpacked."""
    from morelora.training.checkpoint import latest_checkpoint

    out = []
    for path in sorted(ARCHIVE.glob(f"**/seed*/{PARKED}")):
        rel = path.parent.relative_to(ARCHIVE)
        dest = OUT / rel
        step = _parked_step(path)
        if (_has_results(dest) or _held(_claim_file(rel))
                or _step(latest_checkpoint(dest)) >= step):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
        out.append((str(rel), step))
    return out


# ------------------------------------------------------------------------------------------------ commands
def _finished(run: Any) -> bool:
    """Trained, evaluated and its test predictions written (compare's own status of a run); a learnability pilot
    run also evaluated on validation (``eval_validation.json``)."""
    from morelora.experiments.runs import is_complete, run_status

    return bool(is_complete(run_status(run))) and _has_results(run.run_dir)


def complete(run: Any) -> None:
    """Train (or resume) ``run`` to its end; a learnability pilot run then has its last checkpoint evaluated on
    validation (`morelora eval --split validation`); then archive it."""
    from morelora.experiments.runs import execute
    from morelora.training.trainer import evaluate_run

    execute([run])
    if not _has_results(run.run_dir):   # trained and tested: a learnability pilot run's validation evaluation left
        evaluate_run(run.run_dir, split="validation")
    archive_run(run)


def run_worker(poll_s: float = 60.0) -> None:
    """Train the protocol's runs in order until none is left; wait while the next ones are claimed elsewhere."""
    while True:
        todo = [(r, wait) for r, wait in ordered_runs() if wait is not None or not _finished(r)]
        if not todo:
            print("protocol: every run is finished", flush=True)
            return
        started = False
        for run, _ in ((r, w) for r, w in todo if w is None):
            if claim(run):
                try:
                    complete(run)
                finally:
                    release(run)
                started = True
                break
        if not started:
            waiting = sorted({w for _, w in todo if w is not None})
            print(f"protocol: nothing to take now (claimed elsewhere, or waiting for the sweeps of "
                  f"{', '.join(waiting) or '-'}); checking again in {poll_s:.0f} s", flush=True)
            time.sleep(poll_s)


def _train_time(run: Any) -> tuple[float, int] | None:
    """``(seconds, steps)`` of a finished run's training (its eval.json), None when it recorded no time."""
    e = json.loads((run.run_dir / "eval.json").read_text()).get("train", {})
    return (e["train_time_s"], e["steps"]) if e.get("train_time_s") else None


def _time_left(rows: list[tuple[Any, str | None]], finished: list[Any]) -> str:
    """A line: the runs left (the seed runs of sweeps in progress included) and the training time they need: each
    run's steps at the mean seconds per step of the ``finished`` runs on the same tasks (a step's cost follows the
    task set: the shared protocol's control (two SST-2 tasks) steps faster than its grid), else of all finished runs;
    test evaluation is not counted."""
    from morelora.config import load_config

    rates: dict[tuple[str, ...], list[float]] = {}   # task set -> [seconds, steps] of its finished runs
    for r in finished:
        if (timed := _train_time(r)) is not None:
            for key in (tuple(r.cfg.tasks), ()):   # () gathers every finished run: the fallback
                acc = rates.setdefault(key, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + timed[0], acc[1] + timed[1]
    waiting = sum(1 for _, w in rows if w in PROTOCOL["methods"])
    todo = [r for r, w in rows if w is None and r not in finished]
    left = len(todo) + (PROTOCOL["seeds"] - 1) * waiting   # a sweep's seeds
    if () not in rates:
        return f"  left: {left} runs (no finished run with a training time yet: no estimate)"

    def per_step(tasks: list[str]) -> float:
        seconds, steps = rates.get(tuple(tasks), rates[()])
        return seconds / steps

    grid = load_config(CONFIG, SET)
    grid_tasks = grid.tasks
    seeds_left = (PROTOCOL["seeds"] - 1) * waiting
    steps = sum(r.cfg.train.max_steps for r in todo) + seeds_left * grid.train.max_steps
    hours = (sum(r.cfg.train.max_steps * per_step(r.cfg.tasks) for r in todo)
             + seeds_left * grid.train.max_steps * per_step(grid_tasks)) / 3600
    own = tuple(grid_tasks) in rates
    basis = (f"{per_step(grid_tasks):.2f} s per step on the grid's tasks ({rates[tuple(grid_tasks)][1]:.0f} steps "
             f"finished)" if own else f"{per_step(grid_tasks):.2f} s per step of the finished runs (none on the "
             f"grid's tasks yet)")
    return (f"  left: {left} runs, {steps} steps, ~{hours:.1f} h of training at the finished runs' seconds per step on "
            f"the same tasks ({basis}; one core; test evaluation not counted), ~{hours / 2:.1f} h with two workers")


def _estimate(rows: list[tuple[Any, str | None]], finished: list[Any]) -> list[str]:
    """The commonsense protocol's time estimate (lines): the hours of one worker that the pilot's and the grid's runs
    still need (training at each method's seconds per step: its finished runs' own, else ``measured``; the
    validation curve's passes, the pilot's validation evaluation and the test pass at ``measured``'s per-task
    seconds), the grid's runs not planned yet included: while the pilot decides, at its upper bound (all tasks,
    the pilot's steps); while a sweep runs, its winner's other seeds."""
    import copy

    from morelora.experiments.runs import run_status
    from morelora.training.trainer import _eval_due

    measured = PROTOCOL["measured"]
    rates = {}
    for name in sorted({r.cfg.method["name"] for r, w in rows if w is None} | {"lora", "more"}):
        done = [t for r in finished if r.cfg.method["name"] == name and (t := _train_time(r)) is not None]
        rates[name] = ((sum(t for t, _ in done) / sum(n for _, n in done), f"{len(done)} finished run(s)") if done
                       else (measured["step_s"][name], "measured"))

    def hours(cfg: Any, step: int = 0, pilot: bool = False) -> float:   # from ``step`` to the run's end
        tc = cfg.train
        evals = sum(_eval_due(tc, k) for k in range(step + 1, tc.max_steps + 1)) + pilot   # + its validation eval
        return ((tc.max_steps - step) * rates[cfg.method["name"]][0]
                + evals * sum(measured["validation_s"][t] for t in cfg.tasks)
                + (step < tc.max_steps) * sum(measured["test_s"][t] for t in cfg.tasks)) / 3600

    def with_eval_steps(cfg: Any, eval_steps: int) -> Any:
        cfg = copy.deepcopy(cfg)
        cfg.train.eval_steps = eval_steps
        return cfg

    todo = [r for r, w in rows if w is None and not _finished(r)]
    pilot = [r for r in todo if _needs_validation_eval(r)]
    planned = [r for r in todo if not _needs_validation_eval(r)]
    later = []   # the configs of the grid's runs not planned yet
    bound = ""
    if any(w == "the learnability pilot (tasks and budget)" for _, w in rows):
        first = _learnability_runs()[0].cfg
        keys = grid_overrides(first.tasks, first.train.max_steps, first)
        for m in PROTOCOL["methods"]:
            cfg = _runs([_label(m, PROTOCOL["lrs"][0])], 1, overrides=keys)[0].cfg
            later += [cfg] * len(PROTOCOL["lrs"]) + [with_eval_steps(cfg, 0)] * (PROTOCOL["seeds"] - 1)
        bound = f" (at most: all {len(first.tasks)} tasks, {first.train.max_steps} steps, until the pilot decides)"
    for m in [w for _, w in rows if w in PROTOCOL["methods"]]:   # a sweep in progress: its winner's other seeds
        later += [with_eval_steps(_runs([_label(m, PROTOCOL["lrs"][0])], 1)[0].cfg, 0)] * (PROTOCOL["seeds"] - 1)
    h_pilot = sum(hours(r.cfg, run_status(r)["step"], pilot=True) for r in pilot)
    h_grid = sum(hours(r.cfg, run_status(r)["step"]) for r in planned) + sum(map(hours, later))
    n_grid = len(planned) + len(later)
    speeds = ", ".join(f"{m} {v:.2f} ({src})" for m, (v, src) in rates.items() if v is not None)
    return [f"  left: pilot {len(pilot)} run(s), ~{h_pilot:.1f} h; grid {n_grid} run(s){bound}, ~{h_grid:.1f} h; "
            f"~{h_pilot + h_grid:.1f} h of one worker, ~{(h_pilot + h_grid) / 2:.1f} h with two workers",
            f"  (s per step: {speeds}; validation curves, the pilot's validation evaluation and the test pass at "
            f"the per-task seconds measured {measured['source']})"]


def _learnability_lines() -> list[str]:
    """The learnability pilot's decision, for `status`: per task each run's validation score, reference and p, kept
    or dropped; the plateau steps and the budget."""
    d = learnability()
    if d["kept"] is None:
        left = [label for label, g in d["runs"].items() if g is None]
        return [f"learnability pilot: not decided yet ({', '.join(left)}: trained, then evaluated on validation)"]
    first = next(iter(d["runs"].values()))
    lines = [f"learnability pilot: {len(d['kept'])} of {len(first)} tasks kept (both runs above the reference on "
             f"validation, one-sided bootstrap p < {PROTOCOL['alpha']:g}): {', '.join(d['kept']) or '-'}; "
             f"dropped: {', '.join(d['dropped']) or '-'}"]
    for t in first:
        lines.append(f"  {t:<14}" + "  ".join(
            f"{label} {100 * g[t]['score']:.1f} (reference {100 * g[t]['reference']:.1f}, p {g[t]['p']:.3f})"
            for label, g in d["runs"].items()) + ("  kept" if t in d["kept"] else "  dropped"))
    plateau = ", ".join(f"{label} step {s}" for label, s in d["plateau"].items())
    lines.append(f"  budget: {d['budget'] or '(none)'} steps, the later plateau of the kept tasks' validation "
                 f"average (no later gain over {100 * PROTOCOL['tolerance']:g} point): {plateau or '-'}")
    return lines


def status() -> None:
    rows = ordered_runs()
    finished = [r for r, w in rows if w is None and (r.run_dir / "eval.json").is_file()]
    total_known = sum(1 for _, w in rows if w is None)
    waiting = sum(1 for _, w in rows if w in PROTOCOL["methods"])
    print(f"protocol in {OUT}: {len(finished)} of {total_known} planned runs finished" + (
        f" (+{PROTOCOL['seeds'] - 1} seed runs for each of the {waiting} methods whose sweep is not finished)"
        if waiting else ""))
    if "learnability" in PROTOCOL:
        print("\n".join(_learnability_lines() + _estimate(rows, finished)))
    else:
        print(_time_left(rows, finished))
    parked = sorted(ARCHIVE.glob(f"**/seed*/{PARKED}"))
    if parked:
        print("  parked in the archive (resumed from there on a new machine): " + ", ".join(
            f"{p.parent.relative_to(ARCHIVE)} at step {_parked_step(p)}" for p in parked))
    unarchived = [r for r, w in rows if w is None and _finished(r) and not _archived(r)]
    if unarchived:
        print(f"  not archived yet ({ARCHIVE}): " + ", ".join(f"{r.label} seed {r.seed}" for r in unarchived)
              + " -- `bench/protocol.py archive`, then commit the archive")
    width = max((len(r.label) for r, w in rows if w is None), default=0)
    for r, w in rows:
        if w is not None:
            print(f"  {w}: seeds wait for its learning-rate sweep" if w in PROTOCOL["methods"] else
                  f"  then: the runs that wait for {w}")
            continue
        claimed = _lock(r).exists()
        state = "done" if (r.run_dir / "eval.json").is_file() else ("claimed" if claimed else (
            "partial" if (r.run_dir / "config.yaml").is_file() else "not started"))
        if state == "done" and not _has_results(r.run_dir):
            state = "trained; its validation evaluation left" + (" (claimed)" if claimed else "")
        if state in ("claimed", "partial"):
            state += _progress(r)
        print(f"  {r.label:<{width}} seed {r.seed}: {state}")
    for m in PROTOCOL["methods"]:
        s = sweep(m)
        cells = ", ".join(f"lr {lr}: {'-' if v is None else f'{100 * v:.2f}'}" for lr, v in s["runs"].items())
        line = f"sweep {m:<10} {cells}  -> winner {s['winner'] or '(not yet)'}"
        if s["recorded"]:   # its choice stands; the winner's re-run shows whether the record reproduces
            again = final_validation(_sweep_dir(m, s["winner"]))
            line += f" (recorded; the winner's re-run: {'-' if again is None else f'{100 * again:.2f}'})"
        print(line)
        for lr, v in s["runs"].items():
            run_dir = _sweep_dir(m, lr)
            if v is None and not s["recorded"] and (run_dir / "eval.json").is_file():
                # stopped between its last checkpoint and that step's evaluation by a trainer before b601572
                print(f"  {_label(m, lr)} finished without the validation score of its last step, so this sweep "
                      f"cannot choose: `morelora train {run_dir / 'config.yaml'} --resume` evaluates it")


def _progress(run: Any) -> str:
    """`` (step S of N, checkpoint C)`` of a run in training, from its logs and newest checkpoint."""
    from morelora.training.checkpoint import latest_checkpoint

    path = run.run_dir / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()] if path.is_file() else []
    ckpt = latest_checkpoint(run.run_dir)
    return (f" (step {max(steps, default=0)} of {run.cfg.train.max_steps}, "
            f"checkpoint {'none' if ckpt is None else _step(ckpt)})")


def params() -> None:
    """Adapter parameters of every row on the protocol's model (``parameter_counts()``, before training)."""
    from morelora.methods import build_method
    from morelora.training.build import build_base_model, build_tasks, method_options, model_kind

    for m in PROTOCOL["methods"]:
        cfg = _runs([_label(m, PROTOCOL["lrs"][0])], 1)[0].cfg
        specs = build_tasks(cfg)
        _, base = build_base_model(cfg, model_kind(cfg.model), specs)
        counts = build_method(cfg.method_name, base, [s.name for s in specs], **method_options(cfg)).parameter_counts()
        print(f"{m:<10} adapter {counts['adapter']:>9,}  per task {counts['per_task']:>9,.0f}  "
              f"trainable (with heads) {counts['trainable']:>9,}")


def report(baseline: str = "lora", with_ablations: bool = False, interim: bool = False,
           against_lora: bool = False) -> None:
    """`morelora compare` over the winners whose seeds have all finished (the baseline's row first); with
    ``with_ablations``, the finished ablation rows against MoRE's winner instead (OUT/ablations/results.*);
    with ``interim``, the seeds finished so far (`report_interim`; with ablations too: `report_ablations`)."""
    from morelora.experiments.compare import compare

    if with_ablations:
        if baseline != "lora":
            raise SystemExit("protocol: --baseline does not apply to --ablations (they are against more; "
                             "--against-lora puts them against lora)")
        return report_ablations(interim=interim, against_lora=against_lora)
    if interim:
        return report_interim(baseline)
    if baseline != "lora":
        raise SystemExit("protocol: --baseline applies to `report --interim` (the seeds every row has finished; "
                         "all of them once the grid is done); the table itself is against lora")
    rows = {m: _winner_runs(m) for m in PROTOCOL["methods"]}
    labels = [runs[0].label for runs in rows.values()
              if runs and all((r.run_dir / "eval.json").is_file() for r in runs)]
    base = rows[baseline][0].label if rows.get(baseline) else None
    if base not in labels:
        raise SystemExit(f"protocol: {baseline}'s seeds are not all finished yet; see `bench/protocol.py status`")
    labels = [base] + [lab for lab in labels if lab != base]
    mc = OUT / "methods.yaml"
    import yaml

    mc.write_text(yaml.safe_dump({lab: method_config()[lab] for lab in labels}, sort_keys=False))
    compare(str(CONFIG), labels, PROTOCOL["seeds"], OUT, overrides=[*SET, *pilot_overrides()], method_config=str(mc),
            baseline=base)


def report_study(study: str) -> dict[str, Any]:
    """One study run before this protocol's grid, from its finished runs (the seeds every row has finished): the
    shared protocol's ``pilot`` (`_report_pilot`), ``control`` (`_report_control`) and ``headroom``
    (`_report_headroom`), the commonsense protocol's ``learnability`` (`report_learnability`)."""
    studies = {"shared": {"pilot": _report_pilot, "control": _report_control, "headroom": _report_headroom},
               "commonsense": {"learnability": report_learnability}}
    mine = studies.get(NAME, {})
    if study not in mine:
        owner = next((name for name, s in studies.items() if study in s), None)
        raise SystemExit(f"protocol: the {NAME} protocol has no {study} study"
                         + (f"; its studies: {', '.join(mine)}" if mine else "")
                         + (f" ({study} is MORELORA_PROTOCOL={owner}'s)" if owner else ""))
    return mine[study]()


def _report_pilot() -> dict[str, Any]:
    """Each form's validation average at its last step and per task (the choice), and its test average (reported,
    never chosen from) -> OUT/pilot.json."""
    out = {}
    for r in _pilot_runs():
        if not _finished(r):
            continue
        rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [x for x in rows if x.get("split") == "validation"][-1]
        test = json.loads((r.run_dir / "eval.json").read_text())
        out[r.label] = {"validation": last["eval_average"], "step": last["step"],
                        "validation_tasks": {k.removeprefix("eval_"): v for k, v in last.items()
                                             if k.startswith("eval_") and k != "eval_average"},
                        "test": test["average"]}
        print(f"{r.label:<22} validation {100 * last['eval_average']:.2f} (step {last['step']}; "
              + ", ".join(f"{k} {100 * v:.1f}" for k, v in out[r.label]["validation_tasks"].items())
              + f")  test {100 * test['average']:.2f}")
    winner = pilot()["winner"]
    print(f"winner (validation, among {', '.join(PROTOCOL['pilot'])}): {winner or '(not yet)'}")
    (OUT / "pilot.json").write_text(json.dumps({"runs": out, "winner": winner}, indent=1) + "\n")
    return out


def _report_control() -> dict[str, Any]:
    """MultiLoRA and MoRE against LoRA on sst2 / sst2_flipped, without and with the task's name ->
    OUT/control/{no_prefix,prefix}/results.*."""
    from morelora.experiments.report import summarize, write_report

    runs = [r for r in _control_runs() if _finished(r)]
    result = {}
    for name, suffix in (("no_prefix", ""), ("prefix", "_prefix")):
        labels = [f"control_{m}{suffix}" for m in PROTOCOL["control"]]
        mine = [r for r in runs if r.label in labels]
        seeds = [s for s in sorted({r.seed for r in mine}) if sum(r.seed == s for r in mine) == len(labels)]
        if not seeds:
            print(f"control ({name}): no seed finished for every row yet")
            continue
        chosen = sorted((r for r in mine if r.seed in seeds), key=lambda r: (labels.index(r.label), r.seed))
        result[name] = summarize(chosen, baseline=labels[0])
        title = (f"positive control ({'task name in the input' if suffix else 'no task name'}): sst2 vs "
                 f"sst2_flipped, seeds {', '.join(map(str, seeds))}, against {labels[0]}")
        print(write_report(result[name], OUT / "control" / name, title))
    return result


def _report_headroom() -> dict[str, Any]:
    """Per task, LoRA alone against the multi-task LoRA (its winner's seeds), paired over seeds and test examples
    (the combined test of `morelora compare`), and the task average once every task has the same seeds (per seed
    the mean of the tasks' differences; the tasks' test sets are resampled independently, so the example term is
    Σ var_t / T²) -> OUT/headroom/results.{json,md}."""
    import numpy as np

    from morelora.experiments.report import _p as fmt_p
    from morelora.experiments.report import summarize
    from morelora.experiments.statistics import combined_test

    lora = _winner_runs("lora")
    if not lora:
        raise SystemExit("protocol: LoRA's sweep has no winner yet; the headroom runs wait for it")
    winner = sweep("lora")["winner"]
    alone = [r for r in _headroom_runs(winner) if _finished(r)]
    rows, lines = {}, ["| task | LoRA alone | multi-task LoRA | alone − multi-task (95 % CI) | p | MDE | seeds |",
                       "|---|---|---|---|---|---|---|"]
    parts = {}   # task -> (alone's per-seed scores, the multi-task LoRA's, the example bootstrap variance)

    def line(name: str, row: dict[str, Any]) -> str:
        return (f"| {name} | {100 * row['alone']:.2f} | {100 * row['multi_task']:.2f} | {100 * row['diff']:+.2f} "
                f"({100 * row['ci_low']:+.2f} to {100 * row['ci_high']:+.2f}) | {fmt_p(row['p'])} | "
                f"{100 * row['mde']:.2f} | {len(row['seeds'])} |")

    for task in grid_tasks():
        mine = [r for r in alone if r.label == f"alone_{task}"]
        seeds = [r.seed for r in mine if _finished(lora[r.seed])]
        if not seeds:
            continue
        summary = summarize([r for r in mine if r.seed in seeds] + [lora[s] for s in seeds],
                            baseline=lora[0].label)
        tests = summary["tests"][f"alone_{task}"]
        a, b = (summary["methods"][x]["tasks"][task] for x in (f"alone_{task}", lora[0].label))
        rows[task] = {"alone": a["mean"], "multi_task": b["mean"], "seeds": seeds, **tests["combined_tasks"][task]}
        lines.append(line(task, rows[task]))
        parts[task] = (a["scores"], b["scores"], tests["bootstrap_tasks"][task]["var"])
    if len(rows) == len(grid_tasks()) and len({tuple(r["seeds"]) for r in rows.values()}) == 1:
        alone_s, multi_s = (np.mean([parts[t][i] for t in parts], axis=0) for i in (0, 1))
        rows["average"] = {"alone": float(alone_s.mean()), "multi_task": float(multi_s.mean()),
                           "seeds": next(iter(rows.values()))["seeds"],
                           **combined_test(alone_s - multi_s, sum(v for *_, v in parts.values()) / len(parts) ** 2)}
        lines.append(line("**average**", rows["average"]))
    (OUT / "headroom").mkdir(parents=True, exist_ok=True)
    (OUT / "headroom" / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (OUT / "headroom" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def report_learnability() -> dict[str, Any]:
    """The commonsense protocol's learnability pilot (``report --study learnability``): per task its validation
    reference and each run's score and one-sided p at the last step, kept or not; the kept tasks' validation
    average by step with each run's plateau, and the budget -> OUT/learnability.{json,md}, OUT/learnability.png
    (`morelora curves`'s figure: every task, the 8-task average, and the kept tasks' average)."""
    from morelora.analysis.curves import plot_curves

    d = learnability()
    if d["kept"] is None:
        left = [label for label, g in d["runs"].items() if g is None]
        raise SystemExit(f"protocol: the learnability pilot is not finished ({', '.join(left)}: trained, then "
                         "evaluated on validation); see `bench/protocol.py status`")
    labels = list(d["runs"])
    first = d["runs"][labels[0]]
    lines = [f"learnability pilot: validation at the last step; reference = the majority class / chance / the most "
             f"frequent answer position; p: one-sided bootstrap p of \"no better than the reference\" (1000 "
             f"resamples); kept: both runs above the reference with p < {PROTOCOL['alpha']:g}", "",
             "| task (validation n) | reference | " + " | ".join(f"{lab} | p" for lab in labels) + " | kept |",
             "|---|---|" + "---|---|" * len(labels) + "---|"]
    for t, g in first.items():
        lines.append(f"| {t} ({g['n']}) | {100 * g['reference']:.1f} | " + " | ".join(
            f"{100 * d['runs'][lab][t]['score']:.1f} | {d['runs'][lab][t]['p']:.3f}" for lab in labels)
            + f" | {'yes' if t in d['kept'] else 'no'} |")
    kept_avg = {lab: dict(average_curve(d["curves"][lab], d["kept"])) for lab in labels}
    steps = sorted({s for c in kept_avg.values() for s in c})
    lines += ["", f"validation average of the {len(d['kept'])} kept tasks (x100) by step:", "",
              "| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {lab} | " + " | ".join(f"{100 * kept_avg[lab][s]:.2f}" if s in kept_avg[lab] else "-"
                                         for s in steps) + " |" for lab in labels]
    lines += ["", "plateau (the first step after which the kept tasks' average never rises more than "
              f"{100 * PROTOCOL['tolerance']:g} point): " + ", ".join(f"{lab} step {s}" for lab, s in
                                                                       d["plateau"].items())
              + f"; budget (the later): {d['budget'] or '(none: no task kept)'} steps",
              "grid runs take: " + (" ".join(d["overrides"]) or "-")]
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "learnability.md").write_text("\n".join(lines) + "\n")
    saved = {k: d[k] for k in ("runs", "kept", "dropped", "plateau", "budget", "overrides")}
    saved["kept_average"] = {lab: sorted(c.items()) for lab, c in kept_avg.items()}
    saved["curves"] = d["curves"]
    (OUT / "learnability.json").write_text(json.dumps(saved, indent=1) + "\n")
    figure = {lab: {**d["curves"][lab], "kept average": sorted(kept_avg[lab].items())} for lab in labels}
    plot_curves(figure, OUT / "learnability.png", title="learnability pilot: validation score vs step")
    print(f"-> {OUT / 'learnability.md'}, {OUT / 'learnability.json'}, {OUT / 'learnability.png'}")
    return saved


def grid_tasks() -> list[str]:
    """The grid's tasks (the config's, or the learnability pilot's kept ones)."""
    from morelora.config import load_config

    return load_config(CONFIG, [*SET, *pilot_overrides()]).tasks


def report_interim(baseline: str = "lora") -> None:
    """The rows whose sweep has a winner, over the seeds every one of them has finished (``baseline``'s row first
    and the others against it), while the grid is still running: OUT/interim/results.* against ``lora``,
    OUT/interim_vs_<baseline>/ against another row (a progress figure, not the protocol's table)."""
    from morelora.experiments.report import summarize, write_report

    if baseline not in PROTOCOL["methods"]:
        raise SystemExit(f"protocol: no row named {baseline!r}; the rows are {', '.join(PROTOCOL['methods'])}")
    rows = {m: runs for m in PROTOCOL["methods"] if (runs := _winner_runs(m))}
    if baseline not in rows:
        raise SystemExit(f"protocol: {baseline}'s learning-rate sweep is not finished yet; "
                         "see `bench/protocol.py status`")
    seeds = [s for s in range(PROTOCOL["seeds"]) if all(_finished(runs[s]) for runs in rows.values())]
    if not seeds:
        raise SystemExit("protocol: no seed is finished for every swept method yet")
    order = [baseline] + [m for m in rows if m != baseline]
    runs = [rows[m][s] for m in order for s in seeds]
    summary = summarize(runs, baseline=rows[baseline][0].label)
    title = (f"protocol, interim: {len(order)} rows x seeds {', '.join(map(str, seeds))} "
             f"(of {PROTOCOL['seeds']}), against {rows[baseline][0].label}")
    print(write_report(summary, OUT / ("interim" if baseline == "lora" else f"interim_vs_{baseline}"), title))


def report_ablations(interim: bool = False, against_lora: bool = False) -> None:
    """Each finished ablation row (all seeds) against MoRE's winner, paired over seeds and test examples; with
    ``interim``, every row with 2 or more finished seeds, over the seeds all of them and MoRE have finished
    (OUT/ablations_interim: a progress figure); with ``against_lora``, MoRE and those rows against LoRA's
    winner instead (same seeds; folder name + ``_vs_lora``)."""
    from morelora.experiments.report import summarize, write_report

    winner = sweep("more")["winner"]
    full = _winner_runs("more")
    if not full or not all(_finished(r) for r in full):
        raise SystemExit("protocol: more's seeds are not all finished yet; see `bench/protocol.py status`")
    extra = ablation_config(winner)
    rows = [_runs([label], PROTOCOL["seeds"], extra) for label in extra]
    if against_lora:
        lora = _winner_runs("lora")
        if not lora or not all(_finished(r) for r in lora):
            raise SystemExit("protocol: lora's seeds are not all finished yet; see `bench/protocol.py status`")
        rows.insert(0, full)
        full = lora
    if interim:
        rows = [runs for runs in rows if sum(_finished(x) for x in runs) >= 2]
        seeds = [s for s in range(PROTOCOL["seeds"]) if all(_finished(runs[s]) for runs in rows)]
        if not rows or len(seeds) < 2:
            raise SystemExit("protocol: no ablation row has 2 finished seeds in common with the others yet")
        full = [full[s] for s in seeds]
        done = [runs[s] for runs in rows for s in seeds]
    else:
        done = [r for runs in rows if all(_finished(x) for x in runs) for r in runs]
    if not done:
        raise SystemExit("protocol: no ablation row has all its seeds finished yet")
    summary = summarize(full + done, baseline=full[0].label)
    title = f"protocol ablations of MoRE (lr {winner}) against {full[0].label}"
    if interim:
        title += f", interim: seeds {', '.join(str(r.seed) for r in full)} (of {PROTOCOL['seeds']})"
    folder = ("ablations_interim" if interim else "ablations") + ("_vs_lora" if against_lora else "")
    print(write_report(summary, OUT / folder, title))


def routing_over_training(run: Any) -> dict[str, Any] | None:
    """The router's choices over a run (its ``routing.jsonl``; None without one): per task, the fraction of the
    adapted layers that switch rank between two logged steps, averaged within each quarter of the run (None where
    a quarter has no pair of logs), the task's mean rank at the first and the last logged step, and at both steps
    how many different ranks the tasks use per layer (`distinct_ranks`: 1 = all tasks on one route)."""
    import numpy as np

    from morelora.analysis.plots import distinct_ranks, rank_switches, read_routing

    history = read_routing(run.run_dir)
    if len(history) < 2:
        return None
    steps, fractions = rank_switches(history)
    steps, end = np.array(steps), run.cfg.train.max_steps
    quarters = [(steps > end * q / 4) & (steps <= end * (q + 1) / 4) for q in range(4)]
    mean_rank = {i: {t: float(np.mean(list(r.values()))) for t, r in history[i][1].items()} for i in (0, -1)}
    return {"switch_by_quarter": {t: [float(np.nanmean(f[m])) if np.isfinite(f[m]).any() else None for m in quarters]
                                  for t, f in fractions.items()},
            "first_step": history[0][0], "first_mean_rank": mean_rank[0], "last_mean_rank": mean_rank[-1],
            "first_distinct_ranks": distinct_ranks(history[0][1]),
            "last_distinct_ranks": distinct_ranks(history[-1][1])}


def _quarters(routing: dict[str, Any]) -> list[list[float]]:
    """Per quarter of the run, the tasks' switching fractions that quarter has (from `routing_over_training`)."""
    return [[v[q] for v in routing["switch_by_quarter"].values() if v[q] is not None] for q in range(4)]


def row_means(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{label: {"seeds", "tasks": {task: {key: mean over seeds}}, and where its runs logged their routing:
    "switch_by_quarter" (per quarter, the mean over seeds of the mean over tasks; None where no run has that
    quarter), "first_distinct_ranks", "last_distinct_ranks"}}``: `diagnose`'s runs averaged per row."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        tasks = mine[0]["tasks"]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in mine], "tasks": {
            t: {k: float(np.mean([r["tasks"][t][k] for r in mine])) for k in keys} for t, keys in tasks.items()}}
        logged = [r["routing"] for r in mine if "routing" in r]
        if logged:
            per_run = [_quarters(g) for g in logged]
            row["switch_by_quarter"] = [
                float(np.mean([np.mean(v[q]) for v in per_run if v[q]])) if any(v[q] for v in per_run) else None
                for q in range(4)]
            for k in ("first_distinct_ranks", "last_distinct_ranks"):
                row[k] = float(np.mean([g[k] for g in logged]))
        out[label] = row
    return out


def diagnose() -> dict[str, Any]:
    """Where MoRE's adaptation differs from LoRA's, per task, on every MoRE run (sweep, seeds and ablation rows)
    with a finished LoRA run of the same seed: the rank each task uses (mean over layers), how decided its router
    is (top probability and its margin over the second), and ``||dW_t||`` against LoRA's
    (`relative_update_norms`); where the run logged its routing, how its ranks moved over training
    (`routing_over_training`); and ``||dW_t||`` against LoRA's for every other method's winner ("other_rows").
    -> OUT/diagnosis.json"""
    import numpy as np

    from morelora.analysis.updates import relative_update_norms
    from morelora.training.build import build_tasks, load_data

    lora_runs = _winner_runs("lora")
    if not lora_runs:
        raise SystemExit("protocol: lora's learning-rate sweep is not finished yet")
    lora = {r.seed: r for r in lora_runs if _finished(r)}
    more_w = sweep("more")["winner"]
    extra = ablation_config(more_w) if more_w else {}
    more = [r for lr in PROTOCOL["lrs"] for r in _runs([_label("more", lr)], PROTOCOL["seeds"])]
    more += [r for label in extra for r in _runs([label], PROTOCOL["seeds"], extra)]   # MoRE's ablation rows
    more = [r for r in more if _finished(r) and r.seed in lora]
    lost = [r for r in more if not _analysable(r.run_dir)]
    if lost:
        print("protocol: no weights and no analysis.json, left out: " + ", ".join(f"{r.label} s{r.seed}" for r in lost))
    more = [r for r in more if r not in lost]
    cfg = more[0].cfg if more else None
    if cfg is None:
        raise SystemExit("protocol: no finished MoRE run has a finished LoRA run of the same seed yet")
    specs = build_tasks(cfg)
    sizes = {s.name: len(d["train"]) for s, d in zip(specs, load_data(cfg, specs))}
    ref_norms = {seed: run_analysis(r.run_dir)["update_norms"] for seed, r in lora.items()}
    out: dict[str, Any] = {"train_examples": sizes, "lora": lora_runs[0].label, "runs": []}
    for r in more:
        a = run_analysis(r.run_dir)
        rel = relative_update_norms(a["update_norms"], ref_norms[r.seed])
        test = json.loads((r.run_dir / "eval.json").read_text())["tasks"]
        ref_test = json.loads((lora[r.seed].run_dir / "eval.json").read_text())["tasks"]
        out["runs"].append({"label": r.label, "seed": r.seed, "tasks": {t: {
            "mean_rank": float(np.mean(list(ranks.values()))),
            "router_top_p": a["router"][t]["top_p"],
            "router_margin": a["router"][t]["margin"],
            "update_norm_vs_lora": rel[t],
            "test_minus_lora": test[t]["score"] - ref_test[t]["score"]} for t, ranks in a["task_ranks"].items()}})
        if (routing := routing_over_training(r)) is not None:
            out["runs"][-1]["routing"] = routing
    out["rows"] = row_means(out["runs"])
    out["other_rows"] = {}   # the other methods' winners: how large their per-task update is against LoRA's
    for method in (m for m in PROTOCOL["methods"] if m not in ("lora", "more")):   # their sweeps are read above
        runs = [r for r in _winner_runs(method) if _finished(r) and r.seed in lora and _analysable(r.run_dir)]
        if runs:
            rel = [relative_update_norms(run_analysis(r.run_dir)["update_norms"], ref_norms[r.seed]) for r in runs]
            out["other_rows"][runs[0].label] = {"seeds": [r.seed for r in runs], "update_norm_vs_lora": {
                t: float(np.mean([x[t] for x in rel])) for t in rel[0]}}
    (OUT / "diagnosis.json").write_text(json.dumps(out, indent=1))
    names = {id(run): f"{run['label']} s{run['seed']}" for run in out["runs"]}
    width = max(map(len, names.values()), default=3) + 2
    print(f"{'run':<{width}}{'task':<15}{'train n':>8}{'mean k':>8}{'top p':>7}{'margin':>8}{'|dW|/LoRA':>10}"
          f"{'test - LoRA':>12}")
    for run in out["runs"]:
        for t, d in run["tasks"].items():
            print(f"{names[id(run)]:<{width}}{t:<15}{sizes[t]:>8}{d['mean_rank']:>8.2f}"
                  f"{d['router_top_p']:>7.3f}{d['router_margin']:>8.3f}{d['update_norm_vs_lora']:>10.3f}"
                  f"{100 * d['test_minus_lora']:>+12.2f}")
    logged = [run for run in out["runs"] if "routing" in run]
    if logged:
        print("\nrouting over training: % of layers switching rank between two logged steps, mean over the tasks, "
              "by quarter of the run; different ranks among the tasks per layer and each task's mean rank, at the "
              "first -> last logged step")
    for run in logged:
        g = run["routing"]
        by_quarter = _quarters(g)
        print(f"{names[id(run)]:<{width}}" + " / ".join(f"{100 * np.mean(v):4.1f}" if v else "   -" for v in by_quarter)
              + f"   distinct {g['first_distinct_ranks']:.2f}->{g['last_distinct_ranks']:.2f}; "
              + ", ".join(f"{t} {g['first_mean_rank'][t]:.1f}->{g['last_mean_rank'][t]:.1f}"
                                  for t in g["last_mean_rank"]))
    print("\nper row, mean over its seeds: per task mean k / top p / margin / |dW|/LoRA / test - LoRA; "
          "% switching by quarter and different ranks first -> last, over the seeds that logged routing")
    lw = max(map(len, [*out["rows"], *out["other_rows"]]), default=3) + 2
    for label, row in out["rows"].items():
        print(f"{label:<{lw}}seeds {', '.join(map(str, row['seeds']))}")
        for t, d in row["tasks"].items():
            print(f"{'':<{lw}}{t:<15}{d['mean_rank']:>6.2f}{d['router_top_p']:>7.3f}{d['router_margin']:>7.3f}"
                  f"{d['update_norm_vs_lora']:>7.3f}{100 * d['test_minus_lora']:>+8.2f}")
        if "switch_by_quarter" in row:
            print(f"{'':<{lw}}switching " + " / ".join("   -" if q is None else f"{100 * q:4.1f}"
                                                      for q in row["switch_by_quarter"])
                  + f"   distinct {row['first_distinct_ranks']:.2f}->{row['last_distinct_ranks']:.2f}")
    if out["other_rows"]:
        print("\nthe other rows, mean over their seeds: per task |dW|/LoRA")
        for label, row in out["other_rows"].items():
            print(f"{label:<{lw}}seeds {', '.join(map(str, row['seeds']))}: "
                  + ", ".join(f"{t} {v:.3f}" for t, v in row["update_norm_vs_lora"].items()))
    print(f"-> {OUT / 'diagnosis.json'}")
    return out


def _row(name: str) -> tuple[str, list[Any]]:
    """``(label, runs of every seed)`` of a row: a swept method (``more``: its winner's runs) or an ablation row
    (``ablation_no_ste`` or ``no_ste``: MoRE's winner plus that file's switch)."""
    if name in PROTOCOL["methods"]:
        if not (runs := _winner_runs(name)):
            raise SystemExit(f"protocol: {name}'s learning-rate sweep is not finished yet")
        return runs[0].label, runs
    rows = ablations()
    label = name if name in rows else f"ablation_{name}"
    if label not in rows:
        raise SystemExit(f"protocol: no row named {name!r}; the rows are the methods "
                         f"{', '.join(PROTOCOL['methods'])} and the ablations {', '.join(rows)}")
    winner = sweep("more")["winner"]
    if winner is None:
        raise SystemExit("protocol: more's learning-rate sweep is not finished yet (the ablations train at its "
                         "winning learning rate)")
    return label, _runs([label], PROTOCOL["seeds"], {label: ablation_config(winner)[label]})


def _paired_diffs(method: str, baseline: str) -> tuple[dict[str, str], list[int], dict[str, Any]]:
    """``(labels, seeds, {task: seeds x examples correctness differences})`` of ``method`` - ``baseline`` (rows as
    `_row` names them) over the seeds both have finished."""
    from morelora.experiments.report import load_predictions
    from morelora.experiments.statistics import TaskPredictions

    rows, labels = {}, {}
    for m in (method, baseline):
        labels[m], runs = _row(m)
        rows[m] = {r.seed: r for r in runs if _finished(r)}
    seeds = sorted(set(rows[method]) & set(rows[baseline]))
    if len(seeds) < 2:
        raise SystemExit(f"protocol: {method} and {baseline} have fewer than 2 finished seeds in common")
    preds = {m: [load_predictions(rows[m][s].run_dir) for s in seeds] for m in rows}
    diffs = {}
    for t, first in preds[baseline][0].items():
        try:
            correct = {m: TaskPredictions([p[t]["predictions"] for p in preds[m]], first["references"],
                                          first["main_metric"]).correct() for m in preds}
        except ValueError as e:   # a metric that is not a mean of per-example scores (F1, MCC)
            raise SystemExit(f"protocol: task {t}: {e}") from None
        diffs[t] = correct[method] - correct[baseline]
    return labels, seeds, diffs


def power(method: str = "more", baseline: str = "lora", target: float = 0.01) -> dict[str, Any]:
    """Where the noise of ``method`` - ``baseline`` on the test average comes from, and the MDE more seeds would
    reach (`variance_components`, `project_mde`), from the seeds both rows have finished; either row is a swept
    method (its winner) or an ablation row (`_row`). ``target``: the MDE to reach (fraction). -> OUT/power.json"""
    import math

    from morelora.experiments.statistics import project_mde, seeds_for_mde, variance_components

    labels, seeds, diffs = _paired_diffs(method, baseline)
    comp = variance_components(diffs)
    counts = sorted({len(seeds), 5, 8, 10, 12, 15, 20, 30, 50})
    proj = {str(s): {"estimate": project_mde(comp, s), "as_reported": project_mde(comp, s, as_reported=True)}
            for s in [*counts, math.inf]}
    need = {k: seeds_for_mde(comp, target, as_reported=k == "as_reported") for k in ("estimate", "as_reported")}
    out = {"method": labels[method], "baseline": labels[baseline], "seeds": seeds, "components": comp,
           "projection": proj, "target_mde": target, "seeds_for_target": need}
    (OUT / "power.json").write_text(json.dumps(out, indent=1))
    pts = 100
    print(f"{out['method']} - {out['baseline']}, seeds {', '.join(map(str, seeds))}: noise of the test average "
          f"(x100 points, as SDs): examples' floor sqrt(E) {pts * math.sqrt(comp['examples_var']):.3f}, "
          f"one seed's sqrt(V) {pts * math.sqrt(comp['seed_var']):.3f} "
          f"(of which seed-by-example sqrt(W) {pts * math.sqrt(comp['interaction_var']):.3f})")
    print(f"{'seeds per method':>16}{'SE':>8}{'MDE':>8}{'MDE as reported':>17}")
    for s, p in proj.items():
        print(f"{s:>16}{pts * p['estimate']['se']:>8.2f}{pts * p['estimate']['mde']:>8.2f}"
              f"{pts * p['as_reported']['mde']:>17.2f}")
    for k, n in need.items():
        print(f"MDE <= {pts * target:.2f} ({k}): " + (f"{n} seeds per method" if n else "not reachable by seeds alone "
              f"(the examples' floor is {pts * proj['inf'][k]['mde']:.2f})"))
    if comp["examples_var_estimate"] < 0:
        print(f"note: E's estimate came out below 0 ({pts ** 2 * comp['examples_var_estimate']:+.4f} points²) and is "
              f"cut at 0: at {len(seeds)} seeds the examples' part cannot be told from the seed-by-example part, so "
              "the floor (inf) and the counts far past the seeds measured are optimistic")
    print(f"-> {OUT / 'power.json'}")
    return out


def pool(previous: Path, method: str = "more", baseline: str = "lora") -> dict[str, Any]:
    """``method`` - ``baseline`` over two draws of the same protocol: an earlier report's seeds (``previous``, a
    `morelora compare` results.json: per-seed task scores; its predictions may be gone) and the seeds this run
    folder has finished. A seed number trained in both draws is one cluster: runs with the same seed share their
    initialisation and data order, so their differences correlate (MoRE's per-seed averages r = 0.82 across the
    two draws), and counting them as independent seeds makes the test anti-conservative. The pooled test takes
    each seed's mean over its draws as one observation (`cluster_means`; tests/test_protocol.py checks its
    false-positive rate by simulation) in `combined_test`; the test examples, the same in both draws, count once,
    with the variance E + W / R that compare's bootstrap would give the R runs, estimated from this folder's
    predictions (`variance_components`). Also: each draw alone (the earlier one as its report gave it, where it
    has the comparison), the runs as if independent (``pooled_unclustered``, what this command reported before),
    each task pooled the same way, the seed-only paired t-test over the clusters, the correlation of same-seed
    draws, and Welch's test of whether the two draws differ. -> OUT/pooled.json, OUT/pooled.png"""
    import numpy as np
    from scipy import stats

    from morelora.experiments.report import _p as fmt_p
    from morelora.experiments.statistics import combined_test, paired_ttest, variance_components

    labels, seeds, diffs = _paired_diffs(method, baseline)
    prev = json.loads(Path(previous).read_text())
    missing = [lab for lab in labels.values() if lab not in prev.get("methods", {})]
    if missing:
        raise SystemExit(f"protocol: {previous} has no row {', '.join(missing)}; pool needs both winners' rows")
    if list(prev["tasks"]) != list(diffs) or any(prev["num_examples"][t] != d.shape[1] for t, d in diffs.items()):
        raise SystemExit(f"protocol: {previous} was not made on this protocol's tasks and test sets "
                         f"({prev['tasks']} vs {list(diffs)})")
    scores = {t: {m: np.asarray(prev["methods"][lab]["tasks"][t]["scores"]) for m, lab in labels.items()}
              for t in diffs}
    prev_diffs = {t: sc[method] - sc[baseline] for t, sc in scores.items()}   # the earlier draw, per task and seed
    d_before = np.mean(list(prev_diffs.values()), axis=0)
    d_now = np.mean([d.mean(1) for d in diffs.values()], axis=0)
    comp = variance_components(diffs)
    both = np.concatenate([d_before, d_now])
    ids = [*prev["seeds"], *seeds]   # the seed number of each run: the cluster
    clusters = cluster_means(both, ids)
    out = {"method": labels[method], "baseline": labels[baseline], "previous": str(previous),
           "seeds": {"previous": prev["seeds"], "now": seeds}, "seed_diffs": {"previous": d_before.tolist(),
                                                                             "now": d_now.tolist()},
           "cluster_diffs": clusters.tolist(), "components": comp}
    examples = comp["examples_var"] + comp["interaction_var"] / len(both)
    for name, d in (("previous", d_before), ("now", d_now), ("pooled_unclustered", both)):
        out[name] = combined_test(d, comp["examples_var"] + comp["interaction_var"] / len(d))
    out["pooled"] = combined_test(clusters, examples)
    reported = prev.get("tests", {}).get(labels[method], {})
    if reported.get("baseline") == labels[baseline] and "combined" in reported:
        out["previous"] = reported["combined"]   # the earlier draw as its own report gave it (its predictions)
    out["tasks"] = {}   # per task, pooled the same way: its examples' variance (sigma2_e + sigma2_w / R) / n, cut at 0
    for t, d in diffs.items():
        d_t = np.concatenate([prev_diffs[t], d.mean(1)])
        c = comp["tasks"][t]
        out["tasks"][t] = combined_test(cluster_means(d_t, ids),
                                        max(0.0, c["sigma2_e"] + c["sigma2_w"] / len(d_t)) / c["n"])
    out["seed_only_ttest"] = {**paired_ttest(clusters, np.zeros(len(clusters))), "diff": float(clusters.mean())}
    shared = sorted(set(prev["seeds"]) & set(seeds))
    if len(shared) > 2:   # how strongly a seed's two draws agree
        pairs = [(d_before[prev["seeds"].index(x)], d_now[seeds.index(x)]) for x in shared]
        out["same_seed_correlation"] = float(np.corrcoef(np.asarray(pairs).T)[0, 1])
    welch = stats.ttest_ind(d_before, d_now, equal_var=False)
    out["draws_differ"] = {"diff": float(d_before.mean() - d_now.mean()), "p": float(welch.pvalue)}
    (OUT / "pooled.json").write_text(json.dumps(out, indent=1))
    _plot_pooled(out, OUT / "pooled.png")
    pts = 100

    def line(label: str, n: int, c: dict[str, Any]) -> None:
        print(f"{label:<34}{n:>6}{pts * c['diff']:>8.2f}   {pts * c['ci_low']:>6.2f} to {pts * c['ci_high']:>5.2f}"
              f"{fmt_p(c['p']):>8}{pts * c['mde']:>7.2f}")

    print(f"{out['method']} - {out['baseline']} on the test average (x100), two draws of the protocol:")
    print(f"{'':<34}{'seeds':>6}{'diff':>8}{'95 % CI':>17}{'p':>8}{'MDE':>7}")
    line(f"earlier ({Path(previous).parent.name})", len(d_before), out["previous"])
    line(f"this folder ({OUT.name})", len(d_now), out["now"])
    line("runs as if independent (anti-cons.)", len(both), out["pooled_unclustered"])
    line("pooled, seeds as clusters", len(clusters), out["pooled"])
    for task, c in out["tasks"].items():
        line(f"  pooled, {task}", len(clusters), c)
    if "same_seed_correlation" in out:
        print(f"same-seed runs of the two draws correlate: r = {out['same_seed_correlation']:.2f}")
    t = out["seed_only_ttest"]
    print(f"seed-only paired t-test over the {t['n']} seed clusters (test examples fixed): p {t['p']:.4f}")
    print(f"do the draws differ? {pts * out['draws_differ']['diff']:+.2f} (Welch p {out['draws_differ']['p']:.3f})")
    print(f"-> {OUT / 'pooled.json'}, {OUT / 'pooled.png'}")
    return out


def cluster_means(values: Any, clusters: list[Any]) -> Any:
    """The mean of ``values`` within each cluster (in order of first appearance): one observation per cluster."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    order = list(dict.fromkeys(clusters))
    return np.array([values[[i for i, c in enumerate(clusters) if c == k]].mean() for k in order])


def _plot_pooled(out: dict[str, Any], path: Path) -> None:
    """Each seed's difference (dots, one row per draw) and each draw's and the pooled mean with its 95 % CI; grey:
    +-MDE of the pooled comparison."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("previous", "earlier draw"), ("now", "this draw"), ("pooled", "pooled")]
    fig, ax = plt.subplots(figsize=(9.5, 3.0))
    mde = 100 * out["pooled"]["mde"]
    ax.axvspan(-mde, mde, color="0.9", label=f"±MDE of the pooled test ({mde:.2f})")
    ax.axvline(0, color="0.4", lw=0.8)
    for y, (key, _) in enumerate(rows):
        c = out[key]
        ax.errorbar(100 * c["diff"], y, xerr=[[100 * (c["diff"] - c["ci_low"])], [100 * (c["ci_high"] - c["diff"])]],
                    fmt="s", color="C3" if key == "pooled" else "C0", capsize=4,
                    label="mean, 95 % CI (seeds + test examples)" if y == 0 else None)
        if key in out["seed_diffs"]:
            d = 100 * np.asarray(out["seed_diffs"][key])
            ax.plot(d, np.full(len(d), y + 0.22), "o", ms=4, color="0.3", alpha=0.7,
                    label="one seed's difference" if y == 0 else None)
    counts = {k: f"{len(v)} seeds" for k, v in out["seed_diffs"].items()}
    counts["pooled"] = f"{len(out['cluster_diffs'])} seed clusters"
    ax.set_yticks(range(len(rows)), [f"{name} ({counts[k]})" for k, name in rows])
    ax.set_ylim(len(rows) - 0.6, -0.5)
    ax.set_xlabel(f"{out['method']} − {out['baseline']}, test average (points)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "status", "report", "params", "diagnose", "power", "pool", "archive",
                                       "park"])
    p.add_argument("--previous", type=Path, default=ROOT / "docs" / "protocol" / "final" / "results.json",
                   help="pool: an earlier report's results.json (default: the verdict's, docs/protocol/final)")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between checks while waiting (run)")
    p.add_argument("--ablations", action="store_true", help="report: the ablation rows against MoRE")
    p.add_argument("--against-lora", action="store_true",
                   help="report --ablations: MoRE and the ablation rows against LoRA's winner instead")
    p.add_argument("--baseline", default="lora",
                   help="report --interim: the row the others are tested against (default lora; OUT/interim_vs_<row>); "
                        "power: the row subtracted (a method, or an ablation row such as ablation_no_ste)")
    p.add_argument("--method", default="more", help="power: the row tested (default more; or an ablation row)")
    p.add_argument("--target", type=float, default=1.0,
                   help="power: the MDE to reach, in points of the test average (default 1.0)")
    p.add_argument("--study", choices=["pilot", "control", "headroom", "learnability"],
                   help="report (MORELORA_PROTOCOL=shared): the pilot, the positive control or the headroom; "
                        "(MORELORA_PROTOCOL=commonsense): the learnability pilot")
    p.add_argument("--interim", action="store_true",
                   help="report: the swept rows (with --ablations: the ablation rows) over the seeds finished so far "
                        "(OUT/interim, OUT/ablations_interim)")
    args = p.parse_args()
    if (n := restore()):
        print(f"protocol: {n} finished run(s) restored from {ARCHIVE}")
    for run, step in unpark():
        print(f"protocol: {run} unparked at step {step} from {ARCHIVE} (it resumes there)")
    {"run": lambda: run_worker(args.poll), "status": status,
     "report": lambda: report_study(args.study) if args.study else report(
         args.baseline, with_ablations=args.ablations, interim=args.interim, against_lora=args.against_lora),
     "params": params, "diagnose": diagnose,
     "power": lambda: power(args.method, args.baseline, args.target / 100), "pool": lambda: pool(args.previous),
     "archive": archive,
     "park": lambda: print(f"protocol: {park()} run(s) in training parked in {ARCHIVE}; commit the archive")}[
        args.command]()


if __name__ == "__main__":
    main()
