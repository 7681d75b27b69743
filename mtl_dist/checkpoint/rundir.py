"""The run directory: one owner at a time, and what it already holds is never thrown away.

* :func:`claim_run_dir` — rank 0 takes an exclusive ``flock`` on ``<output_dir>/.owner`` for the
  job's lifetime and records its host, pid, job id (Slurm's, else torchrun's run id) and start
  time in it; a job that ends (finished, or failed with an error) clears the record. A second
  job on the same directory stops, naming that holder. The kernel drops the lock when its
  holder dies, so a record whose lock can be taken is stale (its holder was killed): reported
  and taken over (a torchrun restart or a Slurm requeue of the same job gets in, and is named
  as such). The lock needs a filesystem whose ``flock`` every host honours (local disks, NFSv4,
  Lustre mounted with ``-o flock``).
* :func:`clean_partials` — ``step_N.partial`` directories a crash left behind are removed at
  the next start, by name.
* :func:`set_aside` — a fresh start (``checkpoint.resume = never``) in a directory that holds
  checkpoints moves them to ``checkpoints/previous-<time>/`` and says where; nothing is
  deleted.
* :func:`find_resume` — the checkpoint to resume from: the newest complete and verified one
  (``latest`` first), saying loudly which ones were skipped and why; when checkpoints exist
  but none verifies, the run stops naming them rather than training from step 0 over them.

* :func:`run_ended` — a run that ended (early stop, ``max_steps``, all epochs) records it in
  ``<checkpoint dir>/finished.json`` (:func:`record_finished`); relaunched with the same
  command (a scheduler's retry) it stays ended: nothing is trained or written. A larger budget
  (``max_steps``, ``epochs``) or ``checkpoint.continue_finished = true`` trains on.

Every rank calls these at start-up; rank 0 acts and every rank gets the same outcome (an
error raised on rank 0 is raised on all, so no rank trains alone).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from mtl_dist.checkpoint.store import latest_target, list_checkpoints, verify_checkpoint
from mtl_dist.distributed.collectives import broadcast_object, is_main


class RunDirBusy(RuntimeError):
    """Another job holds the run directory; the message names it."""


class NoVerifiedCheckpoint(RuntimeError):
    """The run directory holds checkpoints but none is complete and verified."""


def _on_main(fn, *args) -> Any:
    """Run ``fn`` on rank 0; return its result on every rank, or raise its error on every rank
    (the same exception type and message)."""
    result: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            result = ("ok", fn(*args))
        except (RunDirBusy, NoVerifiedCheckpoint, FileNotFoundError, ValueError, OSError) as e:
            result = (type(e).__name__, str(e))
    kind, value = broadcast_object(result)
    if kind == "ok":
        return value
    errors = {c.__name__: c for c in (RunDirBusy, NoVerifiedCheckpoint, FileNotFoundError)}
    raise errors.get(kind, RuntimeError)(value)


def job_id() -> str:
    """The scheduler's job id (Slurm: ``JOBID`` or ``JOBID_TASK`` of an array), else torchrun's
    run id (the same across its restarts), else ``pid-<pid>``."""
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return (
            f"slurm:{os.environ.get('SLURM_ARRAY_JOB_ID', slurm)}_{task}"
            if task
            else f"slurm:{slurm}"
        )
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run}" if run else f"pid-{os.getpid()}"


class RunLock:
    """rank 0's exclusive ``flock`` on ``<dir>/.owner`` (see the module docstring). Held until
    the process exits (or :meth:`release`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".owner"
        self.fd: int | None = None
        self.previous: dict[str, Any] = {}  # the record found in the file (a stale holder's)

    def acquire(self) -> str:
        """Take the lock or raise :class:`RunDirBusy`; returns what to report (may be '')."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by job {holder.get('job', '?')} (host "
                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                f"{holder.get('started', '?')}); use another train.output_dir, or stop that job"
            ) from None
        self.fd = fd
        self.previous = _read_record(fd)
        me = {
            "job": job_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        if not self.previous:
            return ""
        old = self.previous
        if old.get("job") == me["job"]:
            return f"[run] {self.path.parent}: restart of job {me['job']} (previous pid {old.get('pid')} is gone)"
        return (
            f"[run] {self.path.parent}: stale lock of job {old.get('job', '?')} (host "
            f"{old.get('host', '?')}, pid {old.get('pid', '?')}, since {old.get('started', '?')}): "
            "its holder is gone; taking over"
        )

    def release(self) -> None:
        """The job is over (finished or failed with an error): clear the record and unlock, so
        the next job finds no stale holder. A killed job never gets here: its record stays."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_record(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"job": "unreadable lock record"}


_LOCKS: dict[Path, RunLock] = {}  # held for the process's lifetime


def claim_run_dir(run_dir: str | Path, log=print) -> None:
    """Rank 0 locks ``run_dir`` for this job (:class:`RunLock`); on every rank, raise
    :class:`RunDirBusy` when another job holds it."""
    path = Path(run_dir).resolve()

    def take() -> str:
        if path in _LOCKS:  # this process holds it already
            return ""
        lock = RunLock(path)
        note = lock.acquire()
        _LOCKS[path] = lock
        return note

    note = _on_main(take)
    if note:
        log(note)


def release_run_dirs() -> None:
    """Release every run directory this process claimed (at the end of ``main``)."""
    for lock in _LOCKS.values():
        lock.release()
    _LOCKS.clear()


def clean_partials(root: Path, log=print) -> list[str]:
    """Remove ``step_N.partial`` directories under ``root`` (rank 0); returns their names."""

    def clean() -> list[str]:
        gone = sorted(p.name for p in root.glob("step_*.partial") if p.is_dir())
        for name in gone:
            shutil.rmtree(root / name, ignore_errors=True)
        return gone

    gone = _on_main(clean) if root.is_dir() else []
    if gone:
        log(
            f"[checkpoint] removed {len(gone)} unfinished save(s) a crash left in {root}: {', '.join(gone)}"
        )
    return gone


def set_aside(root: Path, log=print) -> Path | None:
    """A fresh start in ``root``: move its checkpoints (and ``latest``) to
    ``root/previous-<time>/`` (rank 0) and say where; returns that directory."""

    def move() -> str:
        found = [p for p in root.glob("step_*")] + [p for p in (root / "latest",) if p.exists()]
        if not found:
            return ""
        dest = root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir()
        for p in found:
            os.replace(p, dest / p.name)
        return str(dest)

    dest = _on_main(move) if root.is_dir() else ""
    if dest:
        log(
            f"[checkpoint] checkpoint.resume = never: the checkpoints already in {root} were moved "
            f"to {dest} (nothing deleted); this run starts from step 0"
        )
    return Path(dest) if dest else None


def find_resume(mode: str, root: Path, log=print) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume`` (``auto`` | ``latest`` | a path;
    ``never`` is handled by :func:`set_aside`), identical on every rank.

    ``auto`` / ``latest``: the newest complete and verified checkpoint, ``latest``'s target
    first; every one skipped is named with the reason. Checkpoints present but none verified:
    :class:`NoVerifiedCheckpoint` naming them. ``latest`` with no checkpoint at all:
    ``FileNotFoundError``. A path: it must verify.
    """

    def choose() -> tuple[str, list[str]]:
        if mode not in ("auto", "latest"):
            path = Path(mode)
            problem = verify_checkpoint(path)
            if problem:
                raise FileNotFoundError(f"checkpoint.resume: {path} cannot be resumed: {problem}")
            return str(path), []
        candidates = list_checkpoints(root)  # latest's target first, then newest first
        skipped = []
        target = latest_target(root)
        if (root / "latest").exists() and not (target and (root / target).is_dir()):
            skipped.append(f"latest points at {target or 'nothing (empty)'}: no such checkpoint")
        for path in candidates:
            problem = verify_checkpoint(path)
            if not problem:
                return str(path), skipped
            skipped.append(f"{path.name}: {problem}")
        if skipped:
            raise NoVerifiedCheckpoint(
                f"{root} holds checkpoints but none is complete and verified ("
                + "; ".join(skipped)
                + "): move them away or repair them to start afresh, or set "
                "checkpoint.resume = never (they are then moved aside, not deleted)"
            )
        if mode == "latest":
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        return "", []

    path, skipped = _on_main(choose)
    for reason in skipped:
        log(f"[resume] WARNING: skipping {reason}")
    return Path(path) if path else None


def open_run_dir(cfg, ckpt_root: Path, log=print) -> Path | None:
    """Start-up of a run directory, on every rank, before anything is written into it: claim
    ``train.output_dir`` (and ``checkpoint.dir`` when it lies outside), remove unfinished
    saves, then either set the old checkpoints aside (``checkpoint.resume = never``) or find
    the checkpoint to resume from (``None``: a fresh run)."""
    claim_run_dir(cfg.train.output_dir, log)
    out = Path(cfg.train.output_dir).resolve()
    if ckpt_root.resolve() != out and out not in ckpt_root.resolve().parents:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        claim_run_dir(ckpt_root, log)
    clean_partials(ckpt_root, log)
    if cfg.checkpoint.resume == "never":
        set_aside(ckpt_root, log)
        return None
    return find_resume(cfg.checkpoint.resume, ckpt_root, log)


FINISHED = "finished.json"  # in the checkpoint directory: how and where the run ended


def record_finished(root: Path, record: dict[str, Any]) -> None:
    """Rank 0: record that the run ended (``reason``: early stop | max_steps | all epochs,
    ``step``, the budget it ran under, ``latest``'s checkpoint), atomically."""
    if not is_main():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{FINISHED}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / FINISHED)


def clear_finished(root: Path) -> None:
    """Rank 0: the run trains (again): it has not ended any more."""
    if is_main():
        (root / FINISHED).unlink(missing_ok=True)


def read_finished(root: Path) -> dict[str, Any]:
    """The record of :func:`record_finished` (``{}``: the run has not ended), same on every rank."""

    def read() -> dict[str, Any]:
        try:
            record = json.loads((root / FINISHED).read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"reason": "unreadable record", "step": -1}
        return record if isinstance(record, dict) else {}

    return _on_main(read)


def run_ended(cfg, root: Path) -> tuple[dict[str, Any], bool]:
    """``(record, ended)``: how the run in ``root`` ended (``{}``: it has not) and whether it
    stays ended under ``cfg`` — the same budget (a relaunch of the same command), no
    ``checkpoint.continue_finished``, resuming this run (``checkpoint.resume`` auto | latest)."""
    if cfg.checkpoint.resume not in ("auto", "latest"):
        return {}, False  # a fresh start (never), or a checkpoint named explicitly
    record = read_finished(root)
    if not record or cfg.checkpoint.continue_finished:
        return record, False
    reason, step = record.get("reason"), int(record.get("step", 0))
    if reason == "max_steps":  # a larger max_steps (or none) trains on
        ended = 0 < cfg.train.max_steps <= step
    elif reason == "all epochs":  # more epochs train on
        ended = cfg.train.epochs <= int(record.get("epochs", 0))
    else:  # early stop: only continue_finished trains on
        ended = True
    return record, ended
