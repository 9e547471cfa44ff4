"""The ``morelora`` command line.

Subcommands are registered in one place, :data:`COMMANDS`: each entry names the subcommand, its help,
a function adding its arguments and a function running it. To add a subcommand, append a
:class:`Command` (from this module or another one imported here).

Bad input (unknown task or config key, bad value, missing file, existing run folder, missing
checkpoint) prints one line ``morelora: error: ...`` on stderr and exits with code 2.
Set ``MORELORA_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Nothing heavy at import: torch / transformers / peft load inside the subcommand that needs them, so that
# `morelora --help` and argument errors answer at once.

__all__ = ["COMMANDS", "Command", "UsageError", "main"]


class UsageError(ValueError):
    """Bad command-line input detected by a subcommand itself."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` executes it.

    Either may be given as ``"module:function"``: imported only when that subcommand is used."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | str
    run: Callable[[argparse.Namespace], int | None] | str

    @staticmethod
    def resolve(target: Callable | str) -> Callable:
        if callable(target):
            return target
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------------------------ train


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML), e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=1e-3 tasks=[sst2,rte] method.r=16")
    p.add_argument("--output-dir", help="run folder (default: train.output_dir of the config)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run folder (an older one, with a "
                        "warning, when the newest does not load); train.max_steps may change, other keys may not")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="continue from this checkpoint folder of the run (implies --resume)")


def _train(args: argparse.Namespace) -> None:
    from morelora.config import load_config
    from morelora.training import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    run_dir = train(cfg, resume=args.resume, checkpoint=args.checkpoint)
    _print_summary(run_dir / "eval.json")


# ------------------------------------------------------------------------------------------------- eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder written by `morelora train`")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"),
                   help="split to score (default: test -> eval.json; others -> eval_<split>.json)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest complete one)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: train.eval_batch_size)")
    p.add_argument("--no-adapter", action="store_true",
                   help="score with the adapter disabled: what the frozen base model plus the run's trained task "
                   "heads achieve without it (-> eval_no_adapter.json / eval_<split>_no_adapter.json)")


def _eval(args: argparse.Namespace) -> None:
    from morelora.training import evaluate_run

    path = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint,
                        batch_size=args.batch_size, no_adapter=args.no_adapter)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process or not path.exists():
        return
    result = json.loads(path.read_text())
    if result.get("adapter") == "disabled":
        print("adapter disabled: the frozen base model with the run's trained task heads (morelora eval "
              "--no-adapter); compare with the run's own eval for what the adapter adds")
    below = []
    for task, r in result["tasks"].items():
        gap = r.get("vs_reference")
        above = (f"; {gap['diff']:+.4f}, 95% CI {gap['low']:+.4f} to {gap['high']:+.4f}, p {gap['p']:.3f}"
                 if gap else "")
        if r["score"] < r["reference_score"]:
            below.append(task)
        print(f"{task:>16}  {r['main_metric']} {r['score']:.4f}   (reference {r['reference_score']:.4f}{above})"
              + ("  below the reference" if task in below else ""))
    print(f"{'average':>16}  {result['average']:.4f}   -> {path}")
    if below:
        steps = result.get("train", {}).get("steps")
        print(f"{len(below)} task(s) below their majority-class / chance reference ({', '.join(below)}): expected "
              f"of a short run{f' ({steps} steps)' if steps else ''} such as the demo's, which leaves the harder "
              "tasks near chance; longer training moves them above (docs/RESULTS.md)")


# -------------------------------------------------------------------------------------- export / merge


def _task_out_args(p: argparse.ArgumentParser, action: str, all_tasks: bool = False) -> None:
    p.add_argument("run_dir", help="run folder written by `morelora train`")
    which = p.add_mutually_exclusive_group(required=True) if all_tasks else p
    which.add_argument("--task", required=not all_tasks, help=f"the run's task to {action}")
    if all_tasks:
        which.add_argument("--all-tasks", action="store_true", help="every task, one adapter folder each: OUT/<task>")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest complete one)")


def _export_args(p: argparse.ArgumentParser) -> None:
    _task_out_args(p, "export", all_tasks=True)
    p.add_argument("--uniform-rank", action="store_true",
                   help="every module at one rank (unused ranks zero-padded), no rank_pattern / alpha_pattern: "
                        "for engines that read only r and lora_alpha (vLLM, LoRAX, TGI)")
    p.add_argument("--base-model", metavar="ID_OR_PATH",
                   help="base_model_name_or_path written into adapter_config.json (default: the base model's hub "
                        "id, e.g. sentence-transformers/all-MiniLM-L6-v2 for the bundled MiniLM)")


def _merge_args(p: argparse.ArgumentParser) -> None:
    _task_out_args(p, "merge into the base model")


def _fresh_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder {out} exists and is not empty; choose another --out")
    return out


def _head_note(model: object, base: str) -> str:
    """What an encoder export / merge holds besides the weights of ``base`` ('' for models without task heads)."""
    heads = getattr(model, "base_model", model)
    if not hasattr(heads, "standard_heads"):
        return ""
    if heads.standard_heads:
        return " with its classifier head"
    return (f" ({base} is a plain AutoModel), plus its {heads.pooling}-pooling {heads.encoding} head in "
            "task_head.safetensors (README, 'Exported heads': model outputs -> logits)")


def _save_tokenizer(run: object, folder: Path) -> None:
    """The run's tokenizer with its ``model_max_length`` set to the run's ``model.max_length``: ``truncation=True``
    then cuts inputs where the run cut them (in training and evaluation), not at the base model's limit."""
    run.tokenizer.model_max_length = run.cfg.model.max_length
    run.tokenizer.save_pretrained(folder)


def _export(args: argparse.Namespace) -> None:
    from morelora.training import load_run

    out = _fresh_out_dir(args.out)
    tasks = _check_task(args.run_dir, args.task) if args.task else _run_tasks(args.run_dir)
    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    for task in tasks:
        folder = out / task if args.all_tasks else out
        run.model.export_lora(task, folder, base_model_name_or_path=args.base_model, uniform_rank=args.uniform_rank)
        _save_tokenizer(run, folder)
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        print(f"exported task {task!r} as a PEFT LoRA adapter for {base}{_head_note(run.model, base)} -> {folder}")


def _merge(args: argparse.Namespace) -> None:
    from morelora.config import load_run_config
    from morelora.training import load_run

    out = _fresh_out_dir(args.out)
    _check_task(args.run_dir, args.task)
    # a run trained on a quantised base merges into a full-precision copy of it: packed weights cannot take the
    # change without re-rounding the whole matrix
    run = load_run(args.run_dir, checkpoint=args.checkpoint, full_precision=True)
    note = _head_note(run.model, "the merged model")
    merged = run.model.merge_and_unload(task=args.task)
    if hasattr(merged, "standard_heads"):  # encoder + task heads
        if merged.standard_heads:  # a plain BertFor* model for one task
            merged = merged.build_task_model(args.task)
        else:  # the merged backbone (AutoModel) + the head file
            merged.save_task_head(args.task, out)
            merged = merged.backbone
    if not hasattr(merged, "save_pretrained"):
        raise UsageError(f"the merged {type(merged).__name__} cannot be saved as a transformers model")
    merged.save_pretrained(out)
    _save_tokenizer(run, out)
    quant = load_run_config(args.run_dir).model.quantization
    note += f" (trained on a {quant.bits}-bit base; merged into its full-precision weights)" if quant else ""
    print(f"merged task {args.task!r} into the base model{note} -> {out}")


def _run_tasks(run_dir: str) -> list[str]:
    """The run's tasks, read from its config.yaml (before any weights are loaded)."""
    from morelora.config import load_run_config
    from morelora.training import RunError

    if not (Path(run_dir) / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    return list(load_run_config(run_dir).tasks)


def _check_task(run_dir: str, task: str) -> list[str]:
    """Fail fast (before loading any weights) on a task the run does not have."""
    tasks = _run_tasks(run_dir)
    if task not in tasks:
        raise UsageError(f"unknown task {task!r}; this run has tasks: {', '.join(tasks)}")
    return [task]


# ------------------------------------------------------------------------------------------------ serve


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder written by `morelora train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="examples per forward pass, any mix of tasks (also the most inputs per request; default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first (default 5)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="queued requests; beyond: 503 + Retry-After (default 256)")
    p.add_argument("--request-timeout-s", type=float, default=60.0,
                   help="a request not answered in time gets 504 (default 60)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="a larger request body gets 413 (default 1048576 = 1 MiB)")
    p.add_argument("--body-timeout-s", type=float, default=10.0,
                   help="a request body not received in full in time gets 408 (default 10)")
    p.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                   help="on SIGTERM / SIGINT, the longest wait for requests in flight (default 30)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest complete one)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def _serve(args: argparse.Namespace) -> None:
    import torch

    from morelora.serve import ServeOptions, serve
    from morelora.training import load_run

    _run_tasks(args.run_dir)
    options = ServeOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
                           max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
                           shutdown_timeout_s=args.shutdown_timeout_s)
    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    run.model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"serving {len(run.task_names)} tasks ({run.cfg.method_name}, {run.kind}) of {args.run_dir} on "
          f"http://{args.host}:{args.port}: {', '.join(run.task_names)}", flush=True)
    serve(run, host=args.host, port=args.port, options=options)


# ------------------------------------------------------------------------------------- bench / methods


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run config: also count each method's parameters per task on its model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method.r=16")


def _methods(args: argparse.Namespace) -> None:
    from morelora.methods_table import describe_methods

    model = cfg = None
    if args.config:
        from morelora.config import load_config
        from morelora.training.build import build_base_model, build_tasks, model_kind

        cfg = load_config(args.config, list(args.overrides))
        specs = build_tasks(cfg)
        _, model = build_base_model(cfg, model_kind(cfg.model), specs)
        cfg = {"tasks": [s.name for s in specs], "method": dict(cfg.method_options, name=cfg.method_name)}
    rows = describe_methods(model, cfg)
    header = f"{'method':<10} {'routing':<10} {'mergeable':<9} {'params/task':>12}  description"
    print(header)
    print("-" * len(header))
    for row in rows:
        per_task = row.get("params_per_task")
        count = f"{per_task:>12,.0f}" if per_task is not None else f"{'-':>12}"
        print(f"{row['name']:<10} {row['routing']:<10} {'yes' if row['mergeable'] else 'no':<9} {count}  "
              f"{row['description']}")


# ------------------------------------------------------------------------------------------- registry

#: The single place where subcommands are registered.
COMMANDS: list[Command] = [
    Command("train", "train one multi-task adapter from a run config", _train_args, _train),
    Command("eval", "evaluate a run folder's newest checkpoint -> RUN_DIR/eval.json", _eval_args, _eval),
    Command("export", "write one task (or every task) of a run as a standard PEFT LoRA adapter", _export_args,
            _export),
    Command("merge", "merge one task into the base model, save model + tokenizer", _merge_args, _merge),
    Command("serve", "serve every task of a run from one model over HTTP (mixed-task batches)", _serve_args,
            _serve),
    Command("compare", "train and evaluate methods x seeds, compare them with CIs and paired tests",
            "morelora.experiments.compare:configure_parser", "morelora.experiments.compare:run_command"),
    Command("plot", "plot what the router learned (embeddings, ranks, training curves) -> RUN_DIR/plots/",
            "morelora.analysis.plots:configure", "morelora.analysis.plots:main"),
    Command("curves", "validation curves of several runs side by side, and where each stops rising",
            "morelora.analysis.curves:configure", "morelora.analysis.curves:main"),
    Command("fewshot", "add a new task to a trained MoRE run from K examples; compare with LoRA / fresh MoRE",
            "morelora.analysis.fewshot:configure", "morelora.analysis.fewshot:main"),
    Command("bench", "benchmark MoRE against PEFT LoRA, the baselines and the base model (ratios from one run)",
            "morelora.bench.suite:configure", "morelora.bench.suite:run"),
    Command("methods", "list every method: routing, mergeable, parameters per task for a config's model",
            _methods_args, _methods),
    Command("sweep", "train a config over values of one parameter x seeds -> sweep.json / .md / .png",
            "morelora.experiments.sweep:configure", "morelora.experiments.sweep:main"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only subcommand ``command``'s arguments are added (all of them when ``command`` is None)."""
    parser = argparse.ArgumentParser(prog="morelora",
                                     description="MoRE multi-task parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if command is None or command == cmd.name:
            Command.resolve(cmd.configure)(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: shown as one line, not a traceback (a module that was never imported
    raised none of its own)."""
    from morelora.config import ConfigError
    from morelora.errors import MoreLoraError

    errors: list[type[BaseException]] = [UsageError, ConfigError, MoreLoraError, FileNotFoundError, FileExistsError]
    checkpoint = sys.modules.get("morelora.training.checkpoint")
    if checkpoint is not None:
        errors.append(checkpoint.RunError)
    return tuple(errors)


#: Subcommands that run models: they get a thread count that fits a busy machine (see `_fit_threads`).
_COMPUTE = ("train", "eval", "compare", "sweep", "fewshot", "export", "merge", "methods")


def _other_runnable() -> int | None:
    """Processes (threads) runnable right now besides this one, from /proc/loadavg; None where it does not exist."""
    try:
        return parse_runnable(Path("/proc/loadavg").read_text())
    except (OSError, ValueError, IndexError):
        return None


def parse_runnable(loadavg: str) -> int:
    """``"0.61 0.55 0.43 3/97 6271"`` (the /proc/loadavg format) -> 2: the runnable count less this process."""
    return max(0, int(loadavg.split()[3].split("/")[0]) - 1)


def _fit_threads() -> None:
    """Without OMP_NUM_THREADS, use only the CPUs that other processes leave free.

    Busy CPUs: the 1-minute load average, capped by the processes runnable right now (the average lags: just after
    a `pip install` it still counts the install on an idle machine). Several multi-threaded torch processes on few
    cores run up to ten times slower than one thread each; on an idle machine this changes nothing. Runs before
    torch is imported (which reads OMP_NUM_THREADS)."""
    cpus = os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    load = os.getloadavg()[0]
    now = _other_runnable()
    busy = load if now is None else min(load, now)
    free = max(1, cpus - round(busy))
    if free < cpus:
        os.environ["OMP_NUM_THREADS"] = str(free)
        if "torch" in sys.modules:  # imported already (main() called from Python)
            sys.modules["torch"].set_num_threads(free)
        running = "" if now is None else f", {now} other process(es) running"
        print(f"morelora: the machine is busy (load average {load:.1f} on {cpus} CPUs{running}): using {free} "
              "torch thread(s); set OMP_NUM_THREADS to choose", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # the subcommand is the first word
    if command in _COMPUTE and not {"-h", "--help"} & set(argv):
        _fit_threads()
    parser = build_parser(command if command in {c.name for c in COMMANDS} else "")
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (train CONFIG --resume lr=...): argparse leaves them over
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return Command.resolve(args._run)(args) or 0
    except _user_errors() as e:
        if os.environ.get("MORELORA_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        code = getattr(e, "exit_code", None)   # a run stopped by a signal: 128 + its number, and not an error
        print(f"morelora: {'' if code else 'error: '}{message}", file=sys.stderr)
        return code or 2
    except KeyboardInterrupt:
        print("morelora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
