"""The non-finite guard: a step whose loss is not finite on some rank updates nothing, anywhere.

Each training forward, :class:`StepCheck` all-gathers one small row per rank — the labelled
rows of every task, whether each task loss and the auxiliary losses are finite, and whether the
rank was asked to stop (SIGTERM, see :mod:`mtl_dist.loop.preempt`) — so every rank holds the same
``labelled [R, T]``, ``nonfinite [R, T + 1]`` and stop request, and acts on them alike. The all-gather is started
asynchronously: with the ``fixed`` balancer nothing waits for it until the backward reaches the
head's input, so its latency hides behind the head's backward; the other balancers read
``labelled`` in the forward (a task without labels over all ranks must not move their state)
and wait there. :class:`UpdateSwitch` turns the gathered flags (and the balancer's weights,
identical on every rank) into this step's verdict, read on the device by every update path,
with no host synchronisation:

* the dense optimizer gets it as ``found_inf``: its fused kernel skips the update, the moments
  and the step count, as under a GradScaler (:class:`mtl_dist.loop.optim.GuardedDense`);
* :class:`GradGate`, on the head's input, zeroes the gradient that flows into the embedding
  tables, so their fused optimizers (SGD, Adagrad, row-wise Adagrad: an update proportional to
  the gradient) leave rows and optimizer state as they were;
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
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # (annotations only)
    from mtl_dist.config import JobConfig
    from mtl_dist.distributed.setup import DistInfo

# writes scalars for a step, as :meth:`mtl_dist.observe.telemetry.Monitor.scalars` does
ScalarWriter = Callable[[int, dict[str, float]], None]

ON_NONFINITE = ("stop", "skip", "off")
# (the host side, :class:`NonFiniteWatch`, is at the end of this module)


class UpdateSwitch:
    """This step's verdict, shared by every update path (see the module docstring).

    :meth:`start` launches the step's all-gather; :meth:`resolve` waits for it and sets
    ``open`` (0-dim bool on the device; ``None`` — everything applies — while the guard is off
    or before the first training step), fills this step's ``nonfinite [R, T + 1]`` and
    ``skipped`` (0-dim bool) buffers and advances ``tripped`` (a non-finite step was seen) and
    ``consecutive`` (non-finite steps in a row). Resolving twice is a no-op.
    """

    def __init__(self, mode: str = "stop") -> None:
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {mode!r}")
        self.mode = mode
        self.open: torch.Tensor | None = None
        self.tripped: torch.Tensor | None = None
        self.consecutive: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None
        self._work = None  # the all-gather in flight
        self._rows: torch.Tensor | None = None  # [R, 2T + 2] once gathered
        self._weights_ok: torch.Tensor | None = None
        self._decided = True
        self.scaler = None  # a LossScaler under fp16: gradients arrive scaled
        self.grad_overflow: torch.Tensor | None = None  # fp16: the tables' gradient overflowed

    def start(self, row: torch.Tensor, gather: bool) -> None:
        """A training step begins: gather ``row`` ``[2T + 2]`` from every rank (async): label
        counts ``[T]``, task losses not finite ``[T]``, aux not finite, stop requested."""
        self.resolve()  # a previous step nobody resolved (no backward ran): settle it first
        world = dist.get_world_size() if gather and dist.is_initialized() else 1
        self._rows = row.new_empty(world, row.numel())
        if world > 1:
            self._work = dist.all_gather(list(self._rows.split(1)), row.unsqueeze(0), async_op=True)
        else:
            self._rows.copy_(row.unsqueeze(0))
        T = (row.numel() - 2) // 2
        self.nonfinite = torch.zeros(world, T + 1, dtype=torch.bool, device=row.device)
        self.skipped = torch.zeros((), dtype=torch.bool, device=row.device)
        self._weights_ok = None
        self._decided = False

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the all-gather: ``(labelled [R, T], nonfinite [R, T + 1])``."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        T = (self._rows.shape[1] - 2) // 2
        return self._rows[:, :T], self._rows[:, T:-1] > 0

    def stop_requested(self) -> torch.Tensor:
        """0-dim bool: some rank was asked to stop before this step (once gathered)."""
        if self._rows is None:
            return torch.zeros((), dtype=torch.bool)
        self.gathered()
        return (self._rows[:, -1] > 0).any()

    def weights(self, weights: torch.Tensor) -> None:
        """The balancer's weights of this step (identical on every rank) count too."""
        self._weights_ok = torch.isfinite(weights).all()

    def resolve(self) -> None:
        """Decide this step (waiting for the all-gather if it is still in flight)."""
        if self._decided:
            return
        self._decided = True
        _, nonfinite = self.gathered()
        self.nonfinite.copy_(nonfinite)
        finite = ~nonfinite.any()
        if self._weights_ok is not None:
            finite = finite & self._weights_ok
        if self.mode == "off":
            return
        if self.tripped is None:
            self.tripped = torch.zeros_like(finite)
            self.consecutive = torch.zeros((), dtype=torch.int64, device=finite.device)
        ok = finite & ~self.tripped if self.mode == "stop" else finite
        self.tripped = self.tripped | ~finite
        self.consecutive = torch.where(finite, 0, self.consecutive + 1)
        self.skipped.copy_(~ok)
        self.open = ok


class _GateGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: UpdateSwitch) -> torch.Tensor:
        ctx.switch = switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        switch = ctx.switch
        switch.resolve()
        if switch.scaler is not None:  # fp16: unscale before the fused table update
            grad, switch.grad_overflow = switch.scaler.unscale_input(grad)
            is_open = (
                ~switch.grad_overflow
                if switch.open is None
                else switch.open & ~switch.grad_overflow
            )
            return torch.where(is_open, grad, 0.0), None
        if switch.open is None:
            return grad, None
        if grad.device.type == "cpu":  # reading the verdict costs no device sync here
            return (grad if bool(switch.open) else torch.zeros_like(grad)), None
        return torch.where(switch.open, grad, 0.0), None  # a NaN gradient becomes 0


class GradGate(nn.Module):
    """Identity in the forward; in training, its backward passes the gradient only while the
    step's :class:`UpdateSwitch` is open (a NaN gradient becomes 0, not NaN × 0). ``x``: any
    shape, returned as a view."""

    def __init__(self, switch: UpdateSwitch | None = None) -> None:
        super().__init__()
        self.switch = switch if switch is not None else UpdateSwitch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return x
        return _GateGrad.apply(x, self.switch)


def apply_update_gate(model: nn.Module, switch: UpdateSwitch) -> None:
    """Put a :class:`GradGate` reading ``switch`` at ``model.grad_gate`` (the head's input of a
    :class:`~mtl_dist.models.ranker.Ranker`, an identity until then), from outside the model as
    parallelism is applied: the gradient into the embedding tables of a step whose update the
    guard closed becomes 0, so their fused optimizers (which update inside the backward) leave
    rows and state as they were. A model without ``grad_gate`` is left as it is."""
    if hasattr(model, "grad_gate"):
        model.grad_gate = GradGate(switch)


class StepCheck(nn.Module):
    """Starts this step's check over all ranks (one all-gather of ``2T + 2`` floats per rank,
    in training; this rank's row alone in evaluation). ``stop`` says whether this process was
    asked to stop (read as the row is built).

    ``forward(losses [T], aux [A], loss_mask [B, T])`` → ``(labelled [R, T]`` rows with a loss
    weight > 0 per rank and task, ``finite`` 0-dim bool: every rank's losses are finite)``
    when ``wait`` (a balancer needs them in the forward), else ``(None, None)`` and the
    all-gather completes in the background until :meth:`UpdateSwitch.resolve`.
    """

    def __init__(
        self,
        switch: UpdateSwitch,
        wait: bool = True,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__()
        self.switch, self.wait, self.stop = switch, wait, stop

    def forward(
        self, losses: torch.Tensor, aux: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        T = losses.numel()
        row = torch.cat(
            [(loss_mask > 0).sum(0).to(losses.dtype), (~torch.isfinite(losses)).to(losses.dtype),
             (~torch.isfinite(aux)).any().unsqueeze(0).to(losses.dtype),
             losses.new_full((1,), float(self.stop()))]
        )  # fmt: skip
        if not (self.training and torch.is_grad_enabled()):
            return row[:T].unsqueeze(0), ~(row[T:-1] > 0).any()
        self.switch.start(row.detach(), gather=True)
        if not self.wait:
            return None, None
        labelled, nonfinite = self.switch.gathered()
        return labelled, ~nonfinite.any()


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
