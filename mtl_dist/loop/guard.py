"""The non-finite guard: a step whose loss is not finite on some rank updates nothing, anywhere.

Here: the design and the host side (:class:`NonFiniteWatch`, read after each step). The device
side runs in the step and lives in :mod:`mtl_dist.loop.step` (its names import from here too).

Each training step, :class:`~mtl_dist.loop.step.StepCheck` all-gathers one small row per rank —
the labelled rows of every task, whether each task loss and the auxiliary losses are finite, and
whether the rank was asked to stop (SIGTERM, see :mod:`mtl_dist.loop.preempt`) — so every rank
holds the same ``labelled [R, T]``, ``nonfinite [R, T + 1]`` and stop request, and acts on them
alike. The all-gather is started asynchronously: with the ``fixed`` balancer nothing waits for
it until the backward reaches the head's input, so its latency hides behind the head's
backward; the other balancers read ``labelled`` before the backward (a task without labels over
all ranks must not move their state) and wait there. :class:`~mtl_dist.loop.step.UpdateSwitch`
turns the gathered flags (and the balancer's weights, identical on every rank) into this step's
verdict, read on the device by every update path, with no host synchronisation:

* the dense optimizer gets it as ``found_inf``: its fused kernel skips the update, the moments
  and the step count, as under a GradScaler (:class:`mtl_dist.loop.optim.GuardedDense`);
* :class:`~mtl_dist.loop.step.GradGate`, on the head's input, zeroes the gradient that flows
  into the embedding tables, so their fused optimizers (SGD, Adagrad, row-wise Adagrad: an
  update proportional to the gradient) leave rows and optimizer state as they were;
* the balancers leave their state as it was.

``train.on_nonfinite``: ``stop`` keeps the switch closed from the first non-finite step on, and
the train loop ends the run (non-zero exit, no checkpoint after it) when it next reads the flags;
``skip`` closes it for that step only and the loop stops after ``train.max_nonfinite``
consecutive ones; ``off`` (for measuring the guard's cost only) gates nothing. The loop reads
the flags every step where that costs no synchronisation (CPU, or CUDA with step timing on),
else every ``train.log_every`` steps and before every checkpoint or validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mtl_dist.loop.step import (  # the device side, at its old path
    ON_NONFINITE,
    GradGate,
    StepCheck,
    UpdateSwitch,
    apply_update_gate,
)

if TYPE_CHECKING:  # (annotations only)
    from mtl_dist.config import JobConfig
    from mtl_dist.distributed.setup import DistInfo

__all__ = [
    "ON_NONFINITE", "GradGate", "NonFiniteLoss", "NonFiniteWatch", "ScalarWriter", "StepCheck",
    "UpdateSwitch", "apply_update_gate",
]  # fmt: skip

# writes scalars for a step, as :meth:`mtl_dist.observe.telemetry.Monitor.scalars` does
ScalarWriter = Callable[[int, dict[str, float]], None]


class NonFiniteLoss(RuntimeError):
    """Training stopped on a non-finite loss (``train.on_nonfinite``); the message names the
    step(s), the task(s) and the rank(s)."""


class NonFiniteWatch:
    """The host side of the step check (:mod:`mtl_dist.loop.guard`): collects each step's
    ``nonfinite [R, T + 1]`` / ``skipped`` and stop request on the device, reads them on the host
    every step where that costs no synchronisation (CPU; CUDA with step timing, which syncs
    anyway), else every ``log_every`` steps and when ``force`` (before a checkpoint or
    validation); then reports on rank 0 and stops (``stop``, or ``skip`` after
    ``max_nonfinite`` in a row), and sets ``preempted`` when some rank got SIGTERM.

    Every rank reads the same gathered flags at the same steps, so every rank acts together.
    """

    def __init__(self, cfg: JobConfig, info: DistInfo, switch: UpdateSwitch, log) -> None:
        self.mode, self.max_in_row = cfg.train.on_nonfinite, cfg.train.max_nonfinite
        self.names = [t.name for t in cfg.tasks] + ["aux losses"]
        self.switch, self.log = switch, log
        cheap = info.device.type == "cpu" or cfg.monitor.step_timing
        self.every = 1 if cheap else cfg.train.log_every
        self.pending = torch.zeros((), dtype=torch.int64, device=info.device)
        self.where: torch.Tensor | None = None  # [R, T + 1] OR of the pending steps' flags
        self.total = 0  # skipped steps so far (host)
        self.last_read = 0  # the step the flags were last read at
        self.stop = torch.zeros((), dtype=torch.bool, device=info.device)  # SIGTERM seen
        self.preempted = False  # (host) stop after this step, every rank alike

    def step(
        self,
        step: int,
        nonfinite: torch.Tensor,
        skipped: torch.Tensor,
        scalars: ScalarWriter,
        force: bool = False,
    ) -> None:
        """Collect step ``step``'s flags (``nonfinite [R, T + 1]``, ``skipped []``, as in
        :class:`~mtl_dist.loop.losses.StepOutput`); read them when due (see the class)."""
        self.switch.resolve()  # (the optimizer step has already)
        self.stop |= self.switch.stop_requested().to(self.stop.device)
        if self.mode != "off":
            self.pending += skipped
            bad = nonfinite & skipped
            self.where = bad if self.where is None else self.where | bad
        if force or step % self.every == 0:
            self.preempted = bool(self.stop)
            if self.mode != "off":
                self._read(step, scalars)

    def _read(self, step: int, scalars: ScalarWriter) -> None:
        first, self.last_read = self.last_read, step
        n = int(self.pending)
        if not n:
            return
        where = self.where.cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
        self.pending.zero_()
        self.where.zero_()
        self.total += n
        scalars(step, {"train/nonfinite_steps": float(self.total)})
        tasks = [name for j, name in enumerate(self.names) if where[:, j].any()]
        ranks = [str(r) for r in range(where.shape[0]) if where[r].any()]
        at = (
            f"step {step}" if n == 1 and step - first == 1 else f"{n} step(s) in {first + 1}-{step}"
        )
        what = (
            f"non-finite loss at {at}: task(s) {', '.join(tasks) or '(balancer weights)'} on "
            f"rank(s) {', '.join(ranks) or 'all'}"
        )
        if self.mode == "stop":
            raise NonFiniteLoss(
                f"{what}; stopping (train.on_nonfinite = stop): no update of that step applied "
                "and no checkpoint is written after it; the last saved checkpoint is kept"
            )
        in_row = int(self.switch.consecutive)
        self.log(
            f"[nonfinite] {what}; the update was skipped on every rank ({self.total} skipped "
            f"so far, {in_row} in a row)"
        )
        if in_row >= self.max_in_row:
            raise NonFiniteLoss(
                f"{what}; stopping after {in_row} consecutive non-finite steps "
                f"(train.max_nonfinite = {self.max_in_row})"
            )
