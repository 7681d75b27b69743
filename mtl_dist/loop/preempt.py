"""Preemption: SIGTERM (a scheduler's time limit, a preemption, ``kill``) ends a run at a step
every rank agrees on, with a checkpoint of that step, and exit code 75 — "requeue me".

The signal handler only records the request. The request rides on the all-gather every
training step already makes (:class:`mtl_dist.loop.step.StepCheck`), so a SIGTERM that reaches one
rank stops them all after the same step; the loop then saves a checkpoint with the exact reader
position of that step and exits with :data:`REQUEUE_EXIT_CODE` (``EX_TEMPFAIL``). Resuming
from it continues exactly where the run stopped. The save must finish within the launcher's
grace period (torchrun sends SIGKILL 30 s after SIGTERM; Slurm after ``KillWait``); a request
is read once per training step, so a validation pass in progress finishes first.
"""

from __future__ import annotations

import signal
import threading

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again

STOP_REQUESTED = threading.Event()  # set by the SIGTERM handler; the step check reads it


class Preempted(Exception):
    """Raised by the train loop once the preemption checkpoint is written."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped at step {step} on SIGTERM; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def install() -> None:
    """Record SIGTERM instead of dying at once (the main thread's handler)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())


def requested() -> bool:
    """Whether this process has been asked to stop."""
    return STOP_REQUESTED.is_set()
