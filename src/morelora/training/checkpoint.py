"""Run folders and atomic checkpoints.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``routing.jsonl`` (methods with routing choices),
``eval.json`` and ``checkpoint-<step>/`` folders.
A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed with ``os.replace`` once complete (the
last file written is ``trainer_state.json``), so a folder named ``checkpoint-<step>`` is always whole and
a ``.tmp`` folder left by a killed run is never picked up.

One process writes a run folder at a time: :class:`RunLock` holds ``RUN_DIR/.lock`` (an ``flock``, which the
kernel releases when the process dies, and the holder's pid / host for the message that refuses a second one).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

from morelora.errors import CheckpointError, MoreLoraError

__all__ = [
    "ADAPTER_DIR",
    "BEST_NAME",
    "LOCK_NAME",
    "LOG_FILES",
    "ROUTING_FILE",
    "STATE_NAME",
    "DiskFullError",
    "NonFiniteError",
    "RunError",
    "RunLock",
    "TrainingStopped",
    "best_checkpoint",
    "check_new_run_dir",
    "finalize_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "code_version",
    "record_provenance",
    "prune_checkpoints",
    "read_trainer_state",
    "tmp_checkpoint_dir",
    "truncate_metrics",
]

ADAPTER_DIR = "adapter"
#: the router's choices at every logging step (`TaskAdapterModel.routing_state`), one JSON row per step
ROUTING_FILE = "routing.jsonl"
#: the run folder's logs with one row per step: cut back to the resumed step (`truncate_metrics`)
LOG_FILES = ("metrics.jsonl", ROUTING_FILE)
STATE_NAME = "trainer_state.json"
#: held by the process that writes the run folder (see :class:`RunLock`)
LOCK_NAME = ".lock"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class RunError(ValueError):
    """A run folder that cannot be used as asked (exists, has no checkpoint, in use, ...)."""


class NonFiniteError(MoreLoraError):
    """A loss or adapter tensor that is nan / inf: the run diverged."""


class DiskFullError(CheckpointError):
    """A checkpoint that did not fit on the disk (the partial one is removed)."""


class TrainingStopped(MoreLoraError):
    """SIGTERM / SIGINT: the run saved a checkpoint at the current step and stops; ``exit_code`` 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunLock:
    """``RUN_DIR/.lock``: an exclusive ``flock`` on a file naming its holder (pid, host, boot, start time).

    :meth:`acquire` refuses (:class:`RunError` naming the holder) while another process holds it. A lock file
    that is present but not held was left by a process that died (``kill -9``, a lost machine): it is taken
    over, and :attr:`took_over` names that process for a warning. :meth:`release` removes the file."""

    def __init__(self, run_dir: Path, fd: int, created: bool, took_over: dict[str, Any] | None) -> None:
        self.run_dir, self._fd, self._created, self.took_over = run_dir, fd, created, took_over

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        import fcntl

        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"run folder {run_dir} is a file")
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunError(f"run folder {run_dir} is in use by {describe_holder(holder)} (lock file {path}); "
                               "wait for that run to end, or choose another --output-dir") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the holder removed the file between our open and our lock: lock the new one
        previous = _read_holder(fd)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        return cls(run_dir, fd, created, previous or None)

    def release(self) -> None:
        """Remove the lock file (and the run folder, when this lock made it and nothing else was written)."""
        if self._fd < 0:
            return
        path = self.run_dir / LOCK_NAME
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1
        if self._created:
            try:
                self.run_dir.rmdir()   # only when empty
            except OSError:
                pass


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h (since 2026-...)`` from a lock file's content."""
    if not holder:
        return "another process"
    since = f" (since {holder['since']})" if holder.get("since") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


def check_new_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to train into a non-empty folder unless resuming (which needs a checkpoint)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} is a file")
    non_empty = run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())
    if resume:
        if latest_checkpoint(run_dir) is None and non_empty and (run_dir / "config.yaml").exists():
            # a run killed before its first checkpoint: start again from scratch in place
            return
        if not non_empty:
            raise RunError(f"nothing to resume: {run_dir} has no checkpoint")
        if latest_checkpoint(run_dir) is None:
            raise RunError(f"nothing to resume: {run_dir} has no complete checkpoint-<step> folder")
    elif non_empty:
        raise RunError(
            f"run folder {run_dir} exists and is not empty; pass --resume to continue it "
            "or choose another --output-dir"
        )


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (``checkpoint-750`` -> 750), or None for any other name."""
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        step = checkpoint_step(p.name)
        if step is not None and p.is_dir() and (p / STATE_NAME).is_file() and (p / ADAPTER_DIR).is_dir():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint to load from a run folder: `checkpoint` if given, else the run's selected one
    (``train.select_best``: :func:`best_checkpoint`), else the newest complete one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    path = Path(checkpoint) if checkpoint else best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if path is None or not (path / ADAPTER_DIR).is_dir():
        raise RunError(f"no complete checkpoint in {run_dir}" if checkpoint is None
                       else f"{checkpoint} is not a complete checkpoint folder")
    return path


#: ``train.select_best``: the checkpoint with the best validation score, ``{"step", "metric", "score"}``
BEST_NAME = "best_checkpoint.json"


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``train.select_best`` chose (``RUN/best_checkpoint.json``), when it exists and is complete."""
    path = run_dir / BEST_NAME
    if not path.is_file():
        return None
    step = json.loads(path.read_text())["step"]
    return next((p for s, p in list_checkpoints(run_dir) if s == step), None)


def tmp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """A fresh ``checkpoint-<step>.tmp`` folder (a stale one from a killed run is removed)."""
    tmp = run_dir / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finalize_checkpoint(tmp: Path, state: dict[str, Any]) -> Path:
    """Write ``trainer_state.json`` (fsynced) and atomically rename ``tmp`` to its final name."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    _write_json_synced(tmp / STATE_NAME, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def is_disk_full(error: BaseException) -> bool:
    """Whether writing a checkpoint failed for want of space: ``OSError`` ENOSPC / EDQUOT, or torch's zip writer's
    ``RuntimeError`` (``[enforce fail at inline_container.cc:...] . unexpected pos ...`` / ``file write failed``),
    which is what a full disk gives inside ``torch.save``."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "file write failed" in text
                                                or "No space left" in text)


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_full_message(run_dir: Path, step: int, needed: int) -> str:
    """One line: the folder, the space a checkpoint needs and the space left, what was kept and what to do."""
    free = shutil.disk_usage(run_dir).free
    older = list_checkpoints(run_dir)
    kept = f"the older {older[-1][1].name} is kept" if older else "no older checkpoint exists"
    return (f"no space left on the disk of {run_dir} for checkpoint-{step}: it needs about {_mb(needed)}, "
            f"{_mb(free)} free; the partial checkpoint was removed and {kept}; free some space (or lower "
            "train.save_total_limit) and continue with --resume")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def prune_checkpoints(run_dir: Path, keep: int | None, protect: int | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (None or <= 0: keep all), except that of step
    ``protect`` (the best one so far, ``train.select_best``), which is kept besides them."""
    if not keep or keep <= 0:
        return
    for step, path in list_checkpoints(run_dir)[:-keep]:
        if step != protect:
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_NAME).read_text())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a log with a ``step`` key (``metrics.jsonl``, ``routing.jsonl``) logged after ``step``
    (written before a kill, redone on resume)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _write_json_synced(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PROVENANCE_NAME = "provenance.jsonl"


@cache
def code_version() -> dict[str, Any]:
    """The code a run trains with: morelora / torch / transformers / peft versions, and the git commit of the
    morelora source (with ``dirty``: uncommitted changes under ``src/``) when it is a git checkout."""
    import peft
    import torch
    import transformers

    import morelora

    info: dict[str, Any] = {"morelora": morelora.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__}
    src = Path(morelora.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                                text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return info   # an installed package, not a checkout
    return {**info, "commit": commit, "dirty": bool(status.strip())}


def _boot_id() -> str | None:
    """This boot of this machine (Linux): it tells apart machines that share a host name, as cloned VMs do."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def record_provenance(run_dir: Path, event: str, step: int) -> dict[str, Any]:
    """Append one line to ``RUN_DIR/provenance.jsonl``: which code on which machine (host name and boot id)
    started or resumed the run, at which step."""
    row = {"event": event, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
           "boot": _boot_id(), **code_version()}
    with open(run_dir / PROVENANCE_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
