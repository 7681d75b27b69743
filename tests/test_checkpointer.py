"""The Checkpointer's decisions without a process group: which steps are saved, where a
training segment ends, which resumed step still needs its validation, a fresh start. Saving and
loading on 2 ranks under torchrun go through it in tests/test_checkpoint.py (an interrupted run
resumes exactly), tests/test_recipe.py (bit-identical parameters after a resume) and
tests/test_rundir_e2e.py (SIGTERM, fallbacks, disk full)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_dist.checkpoint import Checkpointer, RunStart
from mtl_dist.config import JobConfig
from mtl_dist.loop.selection import BestTracker
from mtl_dist.loop.state import LoopState


def checkpointer(every: int = 0, at_end: bool = True, resume: Path | None = None) -> Checkpointer:
    cfg = JobConfig()
    cfg.checkpoint.every, cfg.checkpoint.at_end = every, at_end
    root = Path("/nonexistent/checkpoints")
    return Checkpointer(root, cfg, None, RunStart(root, resume))


def test_due_every_n_steps_at_the_end_and_on_preemption():
    ckpt = checkpointer(every=10)
    total = 35
    assert [s for s in range(1, total + 1) if ckpt.due(s, end=s == total)] == [10, 20, 30, 35]
    assert ckpt.due(7, preempted=True)  # SIGTERM: saved whatever the step
    assert ckpt.due(12, end=True)  # an early stop at step 12 with checkpoint.at_end
    assert [ckpt.next_due(s) for s in (0, 9, 10, 11)] == [10, 10, 20, 20]


def test_due_without_periodic_saves_or_at_end():
    ckpt = checkpointer(every=0, at_end=False)
    assert not any(ckpt.due(s, end=s == 20) for s in range(1, 21))
    assert ckpt.due(5, preempted=True)  # preemption saves regardless
    assert ckpt.next_due(5) is None
    assert [s for s in range(1, 21) if checkpointer(at_end=True).due(s, end=s == 20)] == [20]


def test_a_fresh_run_loads_a_fresh_state_and_saving_needs_states():
    ckpt = checkpointer()
    state = ckpt.load()
    assert (state.step, state.epoch, state.history) == (0, 0, []) and len(state.run_id) == 32
    assert ckpt.resumed is None and not ckpt.unvalidated(state, val_every=10)
    with pytest.raises(RuntimeError, match="no states"):
        ckpt.save(state, 10, 0, epoch_done=False)


def test_a_resumed_validation_step_without_its_validation_is_validated_again():
    ckpt = checkpointer(resume=Path("/nonexistent/checkpoints/step_00000020"))
    state = LoopState(20, 0, "run", BestTracker(JobConfig().train))
    assert ckpt.unvalidated(state, val_every=10)  # saved before its validation ran
    state.history = [{"step": 20, "metrics": {}, "undefined": {}}]
    assert not ckpt.unvalidated(state, val_every=10)  # validated before the save was resumed
    state.step = 25
    assert not ckpt.unvalidated(state, val_every=10)  # not a validation step
