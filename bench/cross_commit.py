"""Do two commits train the same numbers? For protocol runs resumed on a later commit than the one they started on.

    python bench/cross_commit.py OLD [NEW] [--config configs/protocol/shared.yaml] [--methods more lora]
        [--steps 30] [--resume-at 20]

For each method: the config trained for ``--steps`` steps by OLD's code and by NEW's (default: this checkout), and
OLD's run resumed by NEW's code from its checkpoint at ``--resume-at`` (what `bench/protocol.py run` does with a
run parked or interrupted on OLD). Prints, per method, whether the final adapters are bit-identical (else the
largest absolute difference) and whether the logged training losses match. OLD's code is a detached git worktree
in a temporary folder; the run config is the one OLD's `morelora compare` writes (as the protocol's runs have it);
every run uses this interpreter (the same torch / transformers / peft) and one thread. Evaluation is capped to 8
examples per task (it does not enter the adapter). Exit status 0 when every comparison is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


_PLAN = """import sys
from morelora.experiments.compare import plan_runs
config, method, out, *sets = sys.argv[1:]
plan_runs(config, [method], 1, out + ".plan", overrides=sets, verbose=False)[0].cfg.dump(out)
"""


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _call(cmd: list[str], code: Path) -> None:
    res = subprocess.run(cmd, cwd=code, env=_env(code), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cross_commit: {' '.join(cmd[:4])} with {code} failed:\n{res.stdout[-2000:]}"
                         f"{res.stderr[-2000:]}")


def plan(code: Path, config: Path, method: str, steps: int, every: int, out: Path) -> Path:
    """The run config of ``method`` as ``code``'s `morelora compare` writes it (its method block: the method's own
    options only), shortened to ``steps`` steps with a checkpoint every ``every``."""
    sets = [f"train.max_steps={steps}", f"train.save_steps={every}", "train.eval_steps=0", "train.warmup_steps=5",
            "data.max_eval_per_task=8", "train.save_total_limit=100"]
    _call([sys.executable, "-c", _PLAN, str(config), method, str(out), *sets], code)
    return out


def train(code: Path, config: Path, out: Path, checkpoint: Path | None = None) -> None:
    """``morelora train`` of ``config`` with ``code``'s package."""
    cmd = [sys.executable, "-m", "morelora", "train", str(config), "--output-dir", str(out)]
    _call(cmd + (["--checkpoint", str(checkpoint)] if checkpoint else []), code)


def adapter(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / f"checkpoint-{step}" / "adapter").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def compare(a: dict, b: dict) -> str:
    if a.keys() != b.keys():
        return f"different tensors ({len(a)} against {len(b)})"
    if all(bool((a[k] == b[k]).all()) for k in a):
        return f"bit-identical ({len(a)} tensors)"
    return f"DIFFERENT: largest absolute difference {max((a[k] - b[k]).abs().max().item() for k in a):.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", help="a commit (default: this checkout's working tree)")
    ap.add_argument("--config", default="configs/protocol/shared.yaml")
    ap.add_argument("--methods", nargs="+", default=["more", "lora"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resume-at", type=int, default=20)
    args = ap.parse_args(argv)
    if not 0 < args.resume_at < args.steps:
        ap.error("--resume-at must lie between 0 and --steps")
    every = args.resume_at if args.steps % args.resume_at == 0 else 1
    with tempfile.TemporaryDirectory(prefix="cross_commit_") as tmp:
        tmp_path = Path(tmp)
        trees = []
        for name, commit in (("old", args.old), ("new", args.new)):
            if commit is None:
                trees.append(ROOT)
                continue
            tree = tmp_path / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                           capture_output=True)
            trees.append(tree)
        old, new = trees
        try:
            ok = True
            for m in args.methods:
                runs = {k: tmp_path / f"{k}_{m}" for k in ("old", "new", "resumed")}
                cfg = plan(old, old / args.config, m, args.steps, every, tmp_path / f"{m}.yaml")   # as OLD wrote it
                train(old, cfg, runs["old"])
                train(new, cfg, runs["new"])
                runs["resumed"].mkdir()
                start = runs["resumed"] / f"checkpoint-{args.resume_at}"
                subprocess.run(["cp", "-r", str(runs["old"] / start.name), str(runs["old"] / "config.yaml"),
                                str(runs["resumed"])], check=True)
                train(new, cfg, runs["resumed"], checkpoint=start)
                ref = adapter(runs["old"], args.steps)
                for k in ("new", "resumed"):
                    verdict = compare(ref, adapter(runs[k], args.steps))
                    ok &= verdict.startswith("bit-identical")
                    print(f"{m:8s} {k:8s} against old: adapter {verdict}")
                same = losses(runs["old"]) == losses(runs["new"])
                ok &= same
                print(f"{m:8s} training losses old == new: {same} (last {losses(runs['old'])[-1]})")
        finally:
            for tree in trees:
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    print("same numbers" if ok else "the commits train DIFFERENT numbers")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
