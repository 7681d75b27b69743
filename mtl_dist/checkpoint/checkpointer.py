"""One run's checkpoints, as torchtitan's ``CheckpointManager``: when a save is due, saving and
loading (resume), in one class the train loop calls.

* :meth:`Checkpointer.open_run` (before anything is built): the run directory claimed, crash
  leftovers removed, the checkpoint to resume from chosen, and whether the run already ended
  and stays ended (:func:`~mtl_dist.checkpoint.rundir.run_ended`: the same budget, no
  ``checkpoint.continue_finished``) — then nothing is trained or written;
* :meth:`Checkpointer.due`: every ``checkpoint.every`` steps, at the run's end
  (``checkpoint.at_end``: its last step or an early stop) and on preemption (SIGTERM);
* :meth:`Checkpointer.save`: DCP on every rank, the manifest with its digests, ``latest``,
  pruning to ``checkpoint.keep`` (:func:`~mtl_dist.checkpoint.store.save_checkpoint`);
  :meth:`~Checkpointer.mark_best` moves ``best``, :meth:`~Checkpointer.finish` writes
  ``finished.json``;
* :meth:`Checkpointer.load`: the loop's state, fresh or from the chosen checkpoint (model,
  optimizers, RNG, the reader placed where it stopped, the best-model tracker and the history).

Example::

    start = Checkpointer.open_run(cfg, log)
    if start.ended:
        return  # the run ended: nothing to do
    ckpt = Checkpointer(start.root, cfg, States(model, optimizer, reader, runner.trained), start)
    state = ckpt.load()
    ...
    if ckpt.due(step, end=step == total):
        ckpt.save(state, step, epoch, epoch_done=False)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_dist.checkpoint.manifest import checkpoint_dir, latest_target, point
from mtl_dist.checkpoint.rundir import clear_finished, open_run_dir, record_finished, run_ended
from mtl_dist.checkpoint.store import load_checkpoint, save_checkpoint
from mtl_dist.config import JobConfig
from mtl_dist.data.reader import ParquetBatchReader, describe
from mtl_dist.distributed.collectives import is_main
from mtl_dist.loop.selection import BestTracker
from mtl_dist.loop.state import LoopState

Log = Callable[..., None]


@dataclass
class RunStart:
    """What :meth:`Checkpointer.open_run` found: the checkpoint root, the checkpoint to resume
    from (``None``: a fresh run), the finished-run record (``{}``: the run has not ended) and
    whether the run stays ended (nothing to do)."""

    root: Path
    resume: Path | None = None
    finished: dict[str, Any] = field(default_factory=dict)
    ended: bool = False


@dataclass
class States:
    """What a checkpoint holds besides the loop's state: the (sharded) model, its optimizers,
    the training reader and the rows trained per global worker (``StepRunner.trained``, read at
    each save: a pipeline holds batches the reader has already handed out)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    reader: ParquetBatchReader
    trained: dict[int, int]


class Checkpointer:
    """One run's checkpoints under ``root`` (see the module docstring).

    Args:
        root: the checkpoint directory (:func:`~mtl_dist.checkpoint.manifest.checkpoint_dir`).
        cfg: the job's config (``checkpoint.*``: every, at_end, keep; the schema a load checks).
        states: what is saved and loaded (``None``: only :meth:`due` and :meth:`next_due` work).
        start: :meth:`open_run`'s result (``None``: a fresh run, nothing to resume).
        log: prints on rank 0 (a no-op elsewhere).

    Example::

        >>> from mtl_dist.config import JobConfig
        >>> cfg = JobConfig()
        >>> cfg.checkpoint.every = 10
        >>> ckpt = Checkpointer(Path("/tmp/ckpt"), cfg, None)
        >>> [s for s in range(1, 26) if ckpt.due(s, end=s == 25)], ckpt.next_due(12)
        ([10, 20, 25], 20)
    """

    def __init__(
        self, root: Path, cfg: JobConfig, states: States | None, start: RunStart | None = None,
        log: Log = lambda *a, **k: None,
    ) -> None:  # fmt: skip
        self.root, self.cfg, self.states, self.log = root, cfg, states, log
        self.start = start or RunStart(root)

    @property
    def resumed(self) -> Path | None:
        """The checkpoint this run resumed from (``None``: a fresh run)."""
        return self.start.resume

    @staticmethod
    def open_run(cfg: JobConfig, log: Log = print) -> RunStart:
        """Start-up, on every rank, before anything is built or written: claim the run
        directory, remove unfinished saves, set old checkpoints aside (``checkpoint.resume =
        never``) or choose the one to resume from, and decide whether a run that ended stays
        ended (``ended``: a relaunch of the same command, nothing to do; logged). A run that
        trains is not ended any more (``finished.json`` removed).

        Raises:
            RunDirBusy: another job holds the run directory.
            NoVerifiedCheckpoint: checkpoints exist but none is complete and verified.
            FileNotFoundError, ValueError, OSError: a named checkpoint is missing or wrong.
        """
        root = checkpoint_dir(cfg)
        resume = open_run_dir(cfg, root, log)
        finished, ended = run_ended(cfg, root)
        if finished:
            how = f"[resume] run ended at step {finished.get('step')} ({finished.get('reason')})"
            if ended:
                log(
                    f"{how}: nothing to do (checkpoint.continue_finished = true, or a larger "
                    "train.max_steps / train.epochs, trains on)"
                )
                return RunStart(root, resume, finished, ended=True)
            log(f"{how}: training on (checkpoint.continue_finished or a larger budget)")
        clear_finished(root)  # it trains: not ended until it ends again
        return RunStart(root, resume, finished)

    def due(self, step: int, *, end: bool = False, preempted: bool = False) -> bool:
        """Whether step ``step`` is saved: every ``checkpoint.every`` steps, at the run's
        ``end`` (its last step, or an early stop) with ``checkpoint.at_end``, and when
        ``preempted`` (some rank got SIGTERM: the run saves and exits)."""
        every = self.cfg.checkpoint.every
        return bool(
            (every and step % every == 0) or (end and self.cfg.checkpoint.at_end) or preempted
        )

    def next_due(self, step: int) -> int | None:
        """The next ``checkpoint.every`` step after ``step`` (``None``: no periodic saves): a
        training segment ends there."""
        every = self.cfg.checkpoint.every
        return (step // every + 1) * every if every else None

    def save(self, state: LoopState, step: int, epoch: int, epoch_done: bool) -> Path:
        """A checkpoint of step ``step`` on every rank (a collective); ``epoch``: the epoch a
        resume starts in, ``epoch_done``: the step ends an epoch (no reader position: the next
        epoch starts afresh). Returns its path.

        Raises:
            OSError: the disk is full (ENOSPC), naming where, what is free and what is kept.
        """
        s = self._states()
        position = {} if epoch_done else s.reader.position(s.trained)
        loop_state = {"best": state.tracker.state(), "history": state.history,
                      "multi_epoch": {"reinit_epoch": state.reinit_epoch}}  # fmt: skip
        path = save_checkpoint(
            self.root, step=step, epoch=epoch, model=s.model, optimizer=s.optimizer,
            reader_position=position, cfg=self.cfg, keep=self.cfg.checkpoint.keep,
            run_id=state.run_id, loop_state=loop_state,
        )  # fmt: skip
        self.log(f"[checkpoint] step {step}: {path}")
        return path

    def mark_best(self, path: Path) -> None:
        """Rank 0: ``best`` names checkpoint ``path`` (kept whatever ``checkpoint.keep``)."""
        if is_main():
            point(self.root, path.name, "best")

    def finish(self, state: LoopState, reason: str) -> None:
        """Rank 0: record that the run ended (``reason``: early stop | max_steps | all epochs)
        in ``finished.json``, so a relaunch of the same command does nothing."""
        cfg = self.cfg
        record_finished(self.root, {
            "reason": reason, "step": state.step, "epochs": cfg.train.epochs,
            "max_steps": cfg.train.max_steps, "latest": latest_target(self.root),
            "run_id": state.run_id, "metrics": "metrics.json",
        })  # fmt: skip

    def load(self) -> LoopState:
        """The loop's state: fresh (a new run id), or from the checkpoint :meth:`open_run`
        chose, at any world size — model and optimizers loaded in place, the reader placed where
        it left off, the tracker and the history restored.

        Raises:
            ValueError: the checkpoint was written for another schema (features, tasks, model),
                or holds managed-collision tables and the world size changed.
        """
        cfg = self.cfg
        state = LoopState(0, 0, uuid.uuid4().hex, BestTracker(cfg.train))
        if self.resumed is None:
            return state
        s = self._states()
        r = load_checkpoint(self.resumed, s.model, s.optimizer, cfg)
        state.step, state.epoch, state.run_id = r.step, r.epoch, r.run_id or state.run_id
        # a checkpoint taken at an epoch's end holds no position: the next epoch starts afresh
        exact = s.reader.resume_pass(r.positions) if any(r.positions) else True
        self.log(
            f"[resume] {self.resumed} at step {state.step}, epoch {state.epoch}: saved by "
            f"{r.saved_world_size} ranks, "
            f"{'continuing each reader exactly' if exact else 're-splitting the rows not yet trained'}"
        )
        if r.table_dtype != cfg.embedding.data_type:
            self.log(
                f"[resume] tables saved as {r.table_dtype}, loaded as {cfg.embedding.data_type}"
            )
        self.log(f"[data] train: {describe(s.reader)}")
        state.tracker.load(r.loop_state.get("best", {}))
        state.history = list(r.loop_state.get("history", []))
        # a checkpoint of before train.multi_epoch: a mid-epoch one's epoch counts as begun
        begun = state.epoch if any(r.positions) else 0
        state.reinit_epoch = r.loop_state.get("multi_epoch", {}).get("reinit_epoch", begun)
        if self.start.finished.get("reason") == "early stop":  # continued: patience starts over
            state.tracker.since = 0
        return state

    def unvalidated(self, state: LoopState, val_every: int) -> bool:
        """The resumed checkpoint's step is a validation step whose validation never ran (it
        failed, or a preemption came between the save and it): the loop runs it first."""
        h = state.history
        return bool(
            self.resumed is not None and state.step and state.step % val_every == 0
            and (not h or h[-1]["step"] < state.step)
        )  # fmt: skip

    def _states(self) -> States:
        if self.states is None:
            raise RuntimeError("Checkpointer: no states to save or load (built with states=None)")
        return self.states
