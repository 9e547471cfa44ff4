"""``morelora plot RUN_DIR``: what the router learned, as PNGs in ``RUN_DIR/plots/``.

Everything is read from the run folder's files (no model is built):

* ``checkpoint-<step>/adapter/adapter_model.safetensors`` — the task embeddings ``E`` of every adapted layer
  (``<module>.task_embedding``; the router-logit table ``<module>.router_logits`` when the run was trained
  without task embeddings);
* ``checkpoint-<step>/adapter/adapter_config.json`` — ``task_ranks`` (``{task: {module: k}}``), what
  ``MoREModel.task_ranks()`` returned when the checkpoint was written;
* ``metrics.jsonl`` — training rows (``loss``, ``task_loss``, auxiliary losses, per-task losses if logged)
  and evaluation rows (``split``, ``eval_<task>``, ``eval_average``);
* ``routing.jsonl`` — ``{"step", "task_ranks"}`` at every logging step (the router's choices over the whole
  training; MoRE runs trained since the trainer wrote it).

Files written (those whose data the run lacks are skipped):

==========================  ==================================================================================
``task_embeddings_pca.png``  per adapted layer, the tasks' embeddings (rows L2-normalised) in 2-D by PCA
``task_embeddings_tsne.png`` the same by t-SNE (only with at least ``TSNE_MIN_TASKS`` tasks)
``task_similarity.png``      cosine similarity of the tasks' embeddings, averaged over layers
``ranks.png``                heatmap tasks x layers of the rank k each task uses (annotated)
``rank_history.png``         mean rank (over layers) per task vs training step: one point per ``routing.jsonl``
                             row, or without that file one per kept checkpoint
``rank_history_panels.png``  ranks heatmaps at up to ``MAX_HISTORY_PANELS`` of those steps, evenly spaced, the
                             last included
``rank_switches.png``        per task, the fraction of adapted layers whose rank changed since the previous
                             ``routing.jsonl`` row, vs step (does the routing settle?)
``training_curves.png``      loss / task loss, auxiliary losses, per-task losses, validation scores vs step
==========================  ==================================================================================
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from morelora.analysis import short_layer_name

__all__ = [
    "configure",
    "evenly_spaced",
    "main",
    "plot_rank_heatmap",
    "plot_rank_history",
    "plot_rank_switches",
    "plot_run",
    "plot_task_embeddings",
    "plot_task_similarity",
    "plot_training_curves",
    "rank_matrix",
    "rank_switches",
    "read_checkpoint",
    "read_metrics",
    "read_routing",
]

TSNE_MIN_TASKS = 5
MAX_HISTORY_PANELS = 6
_TRAIN_KEYS_NOT_LOSSES = {"step", "lr", "examples_per_s", "examples", "split"}
_PER_TASK_LOSS = re.compile(r"^(?:task_loss|loss)[_/:](?P<task>.+)$")


# ------------------------------------------------------------------------------------------- reading


#: ``[(step, {task: {module: rank k}}), ...]``, oldest first
RankHistory = list[tuple[int, dict[str, dict[str, int]]]]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (missing file: ``[]``; a cut last line is skipped)."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_routing(run_dir: str | Path) -> RankHistory:
    """The rank history in ``RUN_DIR/routing.jsonl``, one entry per logging step (missing file: ``[]``)."""
    from morelora.training.checkpoint import ROUTING_FILE

    return [(int(r["step"]), r["task_ranks"]) for r in _read_jsonl(Path(run_dir) / ROUTING_FILE)
            if r.get("task_ranks")]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (missing file: ``[]``; a line cut by a kill is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """``{"tasks", "task_ranks", "r", "tables", "table_kind"}`` of one checkpoint's ``adapter/`` folder.

    ``tables`` maps each adapted module to its ``(T, d)`` task-embedding matrix (``table_kind`` =
    ``"task_embedding"``) or ``(T, r)`` router-logit table (``"router_logits"``); empty for other methods.
    """
    from safetensors.numpy import load_file

    from morelora.training.checkpoint import ADAPTER_DIR

    adapter = Path(ckpt_dir) / ADAPTER_DIR
    meta = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    tables: dict[str, np.ndarray] = {}
    kind = None
    for suffix in ("task_embedding", "router_logits"):
        found = {k[: -len(suffix) - 1]: v.astype(np.float64) for k, v in weights.items() if k.endswith("." + suffix)}
        if found:
            tables, kind = found, suffix
            break
    ranks = meta.get("task_ranks") or {}
    if ranks:  # keep the model's module order
        order = list(next(iter(ranks.values())))
        tables = {m: tables[m] for m in order if m in tables} | {m: t for m, t in tables.items() if m not in order}
    return {"tasks": list(meta.get("tasks") or []), "task_ranks": ranks, "r": meta.get("config", {}).get("r"),
            "tables": tables, "table_kind": kind}


def rank_matrix(task_ranks: dict[str, dict[str, int]]) -> tuple[list[str], list[str], np.ndarray]:
    """``(tasks, modules, K)`` with ``K[t, l]`` the rank task ``t`` uses in module ``l`` (int array)."""
    tasks = list(task_ranks)
    modules = list(next(iter(task_ranks.values()))) if tasks else []
    k = np.array([[int(task_ranks[t][m]) for m in modules] for t in tasks], dtype=np.int64).reshape(len(tasks),
                                                                                                   len(modules))
    return tasks, modules, k


def rank_switches(history: RankHistory) -> tuple[list[int], dict[str, np.ndarray]]:
    """Per task of the last entry, the fraction of adapted layers whose rank differs from the previous entry.

    Returns ``(steps, {task: fractions})`` for the entries after the first (NaN where the task has no layer in
    both entries)."""
    pairs = list(zip(history, history[1:]))
    tasks = list(history[-1][1]) if history else []
    fractions = {t: np.array([_changed(prev.get(t), cur.get(t)) for (_, prev), (_, cur) in pairs], dtype=np.float64)
                 for t in tasks}
    return [step for _, (step, _) in pairs], fractions


def distinct_ranks(task_ranks: dict[str, dict[str, int]]) -> float:
    """How many different ranks the tasks use in one adapted layer, mean over the layers all tasks have: 1 when
    every layer routes every task to the same rank, up to ``min(T, r)`` when each task has its own."""
    layers = set.intersection(*(set(r) for r in task_ranks.values())) if task_ranks else set()
    if not layers:
        return math.nan
    return float(np.mean([len({ranks[m] for ranks in task_ranks.values()}) for m in sorted(layers)]))


def _changed(before: dict[str, int] | None, after: dict[str, int] | None) -> float:
    """The fraction of the modules in both whose value differs (NaN when no module is in both)."""
    before, after = before or {}, after or {}
    common = [m for m in after if m in before]
    return sum(before[m] != after[m] for m in common) / len(common) if common else math.nan


# ------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _task_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _grid(n: int, max_cols: int = 6) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def _project(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(T, d) -> (T, 2) by PCA or t-SNE; rows are L2-normalised first."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    if n == 1:
        return np.zeros((1, 2))
    if method == "pca":
        from sklearn.decomposition import PCA

        comps = min(2, n - 1, x.shape[1])  # n points span at most n - 1 directions (the rest is float noise)
        y = PCA(n_components=comps, random_state=seed).fit_transform(x)
        return np.pad(y, ((0, 0), (0, 2 - comps)))
    from sklearn.manifold import TSNE

    perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
    method = "exact" if n < 500 else "barnes_hut"  # exact is much faster for a handful of points
    return TSNE(n_components=2, perplexity=perplexity, init="pca", method=method,
                random_state=seed).fit_transform(x)


def plot_task_embeddings(tables: dict[str, np.ndarray], tasks: list[str], path: str | Path, method: str = "pca",
                         task_ranks: dict[str, dict[str, int]] | None = None,
                         title: str = "task embeddings") -> dict[str, np.ndarray]:
    """A grid with one scatter per adapted module: each task's row of ``E`` in 2-D, labelled (with its rank).

    Returns the 2-D coordinates per module.
    """
    modules = list(tables)
    rows, cols = _grid(len(modules))
    fig = _figure(3.1 * cols, 2.9 * rows + 0.6)
    colors = _task_colors(len(tasks))
    coords: dict[str, np.ndarray] = {}
    how = "PCA" if method == "pca" else "t-SNE"
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, module in enumerate(modules):
        ax = axes[i // cols][i % cols]
        y = coords[module] = _project(tables[module], method)
        for t, task in enumerate(tasks):
            label = task if task_ranks is None else f"{task} k={task_ranks[task][module]}"
            ax.scatter(y[t, 0], y[t, 1], color=colors[t], s=36, label=task, zorder=3)
            ax.annotate(label, (y[t, 0], y[t, 1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(short_layer_name(module), fontsize=9)
        ax.tick_params(labelsize=6)
        ax.margins(0.25)
        if i // cols == rows - 1 or i + cols >= len(modules):
            ax.set_xlabel(f"{how} 1", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel(f"{how} 2", fontsize=7)
    for j in range(len(modules), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(tasks), 8), fontsize=8, title="task")
    fig.suptitle(f"{title} per adapted layer ({how} of the L2-normalised rows)"
                 + ("; k = rank the task uses" if task_ranks else ""), fontsize=11)
    _save(fig, Path(path))
    return coords


def task_similarity(tables: dict[str, np.ndarray]) -> np.ndarray:
    """(T, T) cosine similarity of the task rows, averaged over modules."""
    sims = []
    for x in tables.values():
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims.append(x @ x.T)
    return np.mean(sims, axis=0)


def plot_task_similarity(tables: dict[str, np.ndarray], tasks: list[str], path: str | Path,
                         title: str = "task embeddings") -> np.ndarray:
    """Heatmap of :func:`task_similarity` (annotated); returns the matrix."""
    sim = task_similarity(tables)
    n = len(tasks)
    fig = _figure(max(4.5, 0.7 * n + 2.5), max(3.8, 0.6 * n + 1.8))
    ax = fig.subplots()
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(sim[i, j]) > 0.6 else "black")
    ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), tasks, fontsize=8)
    ax.set_title(f"cosine similarity of {title},\naveraged over {len(tables)} layers", fontsize=10)
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.8)
    _save(fig, Path(path))
    return sim


def _rank_heatmap(ax: Any, k: np.ndarray, tasks: list[str], modules: list[str], r: int, annotate: bool = True,
                  xlabels: bool = True) -> Any:
    im = ax.imshow(k, cmap="viridis", vmin=1, vmax=max(r, 2), aspect="auto")
    if annotate:
        for i in range(k.shape[0]):
            for j in range(k.shape[1]):
                ax.text(j, i, str(k[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if k[i, j] > 0.6 * r else "white")
    means = k.mean(axis=1) if k.size else np.zeros(len(tasks))
    ax.set_yticks(range(len(tasks)), [f"{t} (mean {m:.1f})" for t, m in zip(tasks, means)], fontsize=8)
    if xlabels:
        ax.set_xticks(range(len(modules)), [short_layer_name(m) for m in modules], rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    return im


def plot_rank_heatmap(task_ranks: dict[str, dict[str, int]], path: str | Path, r: int | None = None,
                      title: str = "") -> np.ndarray:
    """Heatmap of the rank each task uses in each adapted layer, annotated with k; returns the (T, L) matrix."""
    tasks, modules, k = rank_matrix(task_ranks)
    r = int(r or (k.max() if k.size else 1))
    fig = _figure(max(6.0, 0.3 * len(modules) + 3.0), max(3.0, 0.42 * len(tasks) + 2.2))
    ax = fig.subplots()
    im = _rank_heatmap(ax, k, tasks, modules, r)
    ax.set_xlabel("adapted layer")
    ax.set_ylabel("task (mean k over layers)")
    ax.set_title(f"rank k each task uses in each adapted layer (r = {r}){title}", fontsize=10)
    fig.colorbar(im, ax=ax, label="rank k", shrink=0.9, pad=0.01, ticks=range(1, r + 1))
    _save(fig, Path(path))
    return k


def plot_rank_history(history: RankHistory, path: str | Path, panels_path: str | Path | None = None,
                      r: int | None = None, per: str = "checkpoint") -> np.ndarray:
    """Mean rank per task vs step and, optionally, ranks heatmaps at up to ``MAX_HISTORY_PANELS`` of the steps.

    ``history`` is ``[(step, task_ranks), ...]`` oldest first; ``per`` names what one entry is (a "checkpoint",
    a "logging step"). Returns the (entries, T) mean ranks.
    """
    steps = [s for s, _ in history]
    tasks = list(history[-1][1])
    means = np.array([[np.mean(list(ranks[t].values())) if t in ranks else np.nan for t in tasks]
                      for _, ranks in history])
    r = int(r or max(max(v.values()) for _, ranks in history for v in ranks.values()))
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for t, (task, color) in enumerate(zip(tasks, _task_colors(len(tasks)))):
        ax.plot(steps, means[:, t], marker="o" if len(steps) < 30 else None, color=color, label=task)
    ax.set_xlabel(f"training step ({per})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean rank k over layers")
    ax.set_ylim(0.5, r + 0.5)
    ax.set_title(f"how the rank picks moved during training ({len(steps)} {per}s, r = {r})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(tasks) > 6 else 1, loc="best", title="task")
    _save(fig, Path(path))
    if panels_path is not None:
        _plot_rank_panels(history, Path(panels_path), tasks, r, per)
    return means


def evenly_spaced(items: list[Any], k: int) -> list[Any]:
    """At most ``k`` of ``items``, evenly spaced, the last always included (and the first when ``k`` > 1)."""
    if len(items) <= k:
        return list(items)
    if k <= 1:
        return list(items[-1:])
    return [items[round(i)] for i in np.linspace(0, len(items) - 1, k)]


def _plot_rank_panels(history: RankHistory, path: Path, tasks: list[str], r: int, per: str) -> None:
    """One ranks heatmap per chosen step (`evenly_spaced`, ``MAX_HISTORY_PANELS``), stacked."""
    chosen = evenly_spaced(history, MAX_HISTORY_PANELS)
    _, modules, _ = rank_matrix(history[-1][1])
    fig = _figure(max(6.0, 0.22 * len(modules) + 2.5), (0.3 * len(tasks) + 0.9) * len(chosen) + 1.5)
    axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
    for i, (step, ranks) in enumerate(chosen):
        _, _, k = rank_matrix({t: ranks[t] for t in tasks if t in ranks})
        im = _rank_heatmap(axes[i], k, [t for t in tasks if t in ranks], modules, r,
                           annotate=len(modules) <= 48, xlabels=i == len(chosen) - 1)
        axes[i].set_title(f"step {step}", fontsize=9, loc="left")
    axes[-1].set_xlabel("adapted layer")
    fig.colorbar(im, ax=list(axes), label="rank k", shrink=min(0.8, 3.0 / len(chosen)), pad=0.01,
                 ticks=range(1, r + 1))
    fig.suptitle(f"rank each task uses per layer, at {len(chosen)} of the {len(history)} {per}s", fontsize=10)
    _save(fig, path)


def plot_rank_switches(history: RankHistory, path: str | Path) -> dict[str, np.ndarray]:
    """Per task, the fraction of adapted layers whose rank changed since the previous entry, vs step.

    Returns :func:`rank_switches`' fractions."""
    steps, fractions = rank_switches(history)
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for (task, values), color in zip(fractions.items(), _task_colors(len(fractions))):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, color=color, label=task)
    ax.set_xlabel("training step (logging step)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("fraction of layers whose rank changed")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("routing changes since the previous logged step (0 = settled)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(fractions) > 6 else 1, loc="best", title="task")
    _save(fig, Path(path))
    return fractions


def plot_training_curves(metrics: list[dict[str, Any]], path: str | Path, tasks: list[str] | None = None) -> list[str]:
    """Loss curves and validation scores vs step; returns the titles of the panels drawn."""
    train_rows = [m for m in metrics if "split" not in m and "step" in m]
    eval_rows = [m for m in metrics if m.get("split") and "step" in m]
    numeric = sorted({k for m in train_rows for k, v in m.items()
                      if isinstance(v, (int, float)) and k not in _TRAIN_KEYS_NOT_LOSSES})
    per_task = {k: mt.group("task") for k in numeric if (mt := _PER_TASK_LOSS.match(k))
                and (tasks is None or mt.group("task") in tasks)}
    main_losses = [k for k in ("loss", "task_loss") if k in numeric]
    aux = [k for k in numeric if k not in main_losses and k not in per_task]
    eval_keys = sorted({k for m in eval_rows for k in m if k.startswith("eval_") and k != "eval_average"})

    panels: list[tuple[str, str, list[tuple[str, str, list[dict]]]]] = []  # title, ylabel, [(key, label, rows)]
    if main_losses:
        panels.append(("training loss", "loss", [(k, {"loss": "total loss", "task_loss": "task loss"}[k], train_rows)
                                                 for k in main_losses]))
    if aux:
        panels.append(("auxiliary losses (unweighted)", "loss", [(k, k, train_rows) for k in aux]))
    if per_task:
        panels.append(("training loss per task", "loss", [(k, t, train_rows) for k, t in per_task.items()]))
    if eval_keys:
        series = [(k, k.removeprefix("eval_"), eval_rows) for k in eval_keys]
        if any("eval_average" in m for m in eval_rows):
            series.append(("eval_average", "average", eval_rows))
        split = eval_rows[0]["split"]
        panels.append((f"{split} score per task", "score (main metric)", series))
    if not panels:
        return []
    rows, cols = _grid(len(panels), max_cols=2)
    fig = _figure(6.0 * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    names = tasks or sorted({t for _, t in per_task.items()} | {k.removeprefix("eval_") for k in eval_keys})
    color_of = dict(zip(names, _task_colors(len(names))))
    for i, (title, ylabel, series) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for key, label, src in series:
            pts = [(m["step"], m[key]) for m in src if isinstance(m.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if key == "eval_average" else (
                {"color": color_of[label]} if label in color_of else {})
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 4:  # many lines: the legend goes beside the plot, not over it
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=7)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    _save(fig, Path(path))
    return [p[0] for p in panels]


# --------------------------------------------------------------------------------------------- a run


def plot_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write every plot the run folder has data for into ``out_dir`` (default ``RUN_DIR/plots``).

    The embeddings and the ranks heatmap come from ``checkpoint`` (default: the newest complete one); the
    rank history from ``routing.jsonl``, or without it from every kept checkpoint. Returns ``{plot name: path}``.
    """
    from morelora.training.checkpoint import RunError, list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    ckpts = list_checkpoints(run_dir)
    written: dict[str, Path] = {}
    metrics = read_metrics(run_dir)
    if not ckpts and not metrics:
        raise RunError(f"{run_dir} has neither a complete checkpoint nor metrics.jsonl: nothing to plot")
    tasks, r = None, None
    if ckpts:
        final = read_checkpoint(Path(checkpoint) if checkpoint else ckpts[-1][1])
        tasks, ranks, r, tables = final["tasks"], final["task_ranks"], final["r"], final["tables"]
        what = "task embeddings" if final["table_kind"] == "task_embedding" else "router logits"
        if tables:
            written["task_embeddings_pca"] = out / "task_embeddings_pca.png"
            plot_task_embeddings(tables, tasks, written["task_embeddings_pca"], "pca", ranks or None, what)
            if len(tasks) >= TSNE_MIN_TASKS:
                written["task_embeddings_tsne"] = out / "task_embeddings_tsne.png"
                plot_task_embeddings(tables, tasks, written["task_embeddings_tsne"], "tsne", ranks or None, what)
            if len(tasks) >= 2:
                written["task_similarity"] = out / "task_similarity.png"
                plot_task_similarity(tables, tasks, written["task_similarity"], what)
        if ranks:
            written["ranks"] = out / "ranks.png"
            step = re.sub(r"^checkpoint-", "", Path(checkpoint).name if checkpoint else ckpts[-1][1].name)
            plot_rank_heatmap(ranks, written["ranks"], r, title=f", step {step}")
    written |= _plot_rank_histories(run_dir, ckpts, out, r)
    if metrics and plot_training_curves(metrics, out / "training_curves.png", tasks):
        written["training_curves"] = out / "training_curves.png"
    return written


def _plot_rank_histories(run_dir: Path, ckpts: list[tuple[int, Path]], out: Path, r: int | None) -> dict[str, Path]:
    """The rank history and its panels from ``routing.jsonl`` (plus the rank switches), else from the checkpoints."""
    history, per = read_routing(run_dir), "logging step"
    if not history:
        history = [(s, h) for s, p in ckpts if (h := read_checkpoint(p)["task_ranks"])]
        per = "checkpoint"
    if not history:
        return {}
    written = {name: out / f"{name}.png" for name in ("rank_history", "rank_history_panels")}
    plot_rank_history(history, written["rank_history"], written["rank_history_panels"], r, per)
    if per == "logging step" and len(history) >= 2:
        written["rank_switches"] = out / "rank_switches.png"
        plot_rank_switches(history, written["rank_switches"])
    return written


# ----------------------------------------------------------------------------------------------- CLI


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``morelora plot``."""
    p.add_argument("run_dir", help="run folder written by `morelora train`")
    p.add_argument("--checkpoint", help="checkpoint folder for the embeddings and ranks (default: the newest)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/plots)")


def main(args: argparse.Namespace) -> None:
    """``morelora plot``: write the PNGs and list them."""
    written = plot_run(args.run_dir, checkpoint=args.checkpoint, out_dir=args.out)
    for name, path in written.items():
        print(f"{name:>22}  {path}")
