"""The training step, in our code: forward → the step check across ranks → the balancer → loss
scaling → ``backward()`` → the optimizer step; and the device side of the non-finite guard
(:class:`StepCheck`, :class:`UpdateSwitch`, :class:`GradGate`; the design and the host side,
``NonFiniteWatch``, are :mod:`mtl_dist.loop.guard`).

One batch through it (the same for the pipelined and the plain path):

1. ``ModelWithLoss.forward(batch)`` (:mod:`mtl_dist.loop.losses`, under DMP / DDP) returns the
   task losses ``[T]``, the aux losses ``[A]``, the loss mask ``[B, T]`` and the embedding
   penalty (:class:`~mtl_dist.loop.losses.TaskLosses`) with the detached
   :class:`~mtl_dist.loop.losses.StepOutput`;
2. :meth:`TrainStep.loss`: the step check (:class:`StepCheck`: every rank's label counts, loss
   finiteness and stop request, one all-gather), the gradient-conflict probe when armed, the
   balancer (``loss.balancer``) → one scalar, + Σ aux + penalty, × the fp16 loss scale; the
   balancer's weights join the guard's verdict;
3. :meth:`TrainStep.backward`: ``loss.backward()`` — the update gate at the head's input
   (:func:`apply_update_gate`) zeroes the tables' gradient of a step the guard closed, and the
   fused embedding optimizers update inside it;
4. the optimizer step (:class:`~mtl_dist.loop.optim.GuardedDense`: skipped where the guard
   closed the step).

With ``sharding.pipeline = true`` TorchRec's ``TrainPipelineSparseDist`` drives 1–4 and overlaps
the next batch's input distribution; :class:`StepPipeline` is our subclass whose ``_backward``
is :meth:`TrainStep.backward`. :class:`StepRunner` runs either path and yields each step's
complete :class:`~mtl_dist.loop.losses.StepOutput`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from mtl_dist.balancing.base import task_gradients
from mtl_dist.data.batch import Batch
from mtl_dist.distributed.collectives import all_mean
from mtl_dist.loop import preempt
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.loop.outputs import StepOutput, TaskLosses

ON_NONFINITE = ("stop", "skip", "off")  # train.on_nonfinite


class UpdateSwitch:
    """This step's verdict, shared by every update path (see :mod:`mtl_dist.loop.guard`).

    :meth:`start` launches the step's all-gather; :meth:`resolve` waits for it and sets
    ``open`` (0-dim bool on the device; ``None`` — everything applies — while the guard is off
    or before the first training step), fills this step's ``nonfinite [R, T + 1]`` and
    ``skipped`` (0-dim bool) buffers and advances ``tripped`` (a non-finite step was seen) and
    ``consecutive`` (non-finite steps in a row). Resolving twice is a no-op. ``mode``:
    ``train.on_nonfinite``; another raises ``ValueError``.
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


class StepCheck:
    """Starts a training step's check over all ranks: one all-gather of ``2T + 2`` floats per
    rank — label counts ``[T]``, task losses not finite ``[T]``, aux not finite, and ``stop()``
    (this process was asked to stop, read as the row is built) — on the step's
    :class:`UpdateSwitch`. :class:`TrainStep` calls it in training steps only.

    ``check(losses [T], aux [A], loss_mask [B, T])`` → ``(labelled [R, T]`` rows with a loss
    weight > 0 per rank and task, ``finite`` 0-dim bool: every rank's losses are finite)``
    when ``wait`` (a balancer needs them in the step), else ``(None, None)`` and the
    all-gather completes in the background until :meth:`UpdateSwitch.resolve`.
    """

    def __init__(
        self, switch: UpdateSwitch, wait: bool = True, stop: Callable[[], bool] = lambda: False
    ) -> None:
        self.switch, self.wait, self.stop = switch, wait, stop

    def __call__(
        self, losses: torch.Tensor, aux: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        row = torch.cat(
            [(loss_mask > 0).sum(0).to(losses.dtype), (~torch.isfinite(losses)).to(losses.dtype),
             (~torch.isfinite(aux)).any().unsqueeze(0).to(losses.dtype),
             losses.new_full((1,), float(self.stop()))]
        )  # fmt: skip
        self.switch.start(row.detach(), gather=True)
        if not self.wait:
            return None, None
        labelled, nonfinite = self.switch.gathered()
        return labelled, ~nonfinite.any()


class ConflictProbe:
    """Cosine similarity ``[T, T]`` of the task losses' gradients on the head's shared
    parameters (averaged over ranks first): negative means the tasks pull the shared experts
    apart (negative transfer). Measured once in the step after :meth:`arm`; ``[0, 0]``
    otherwise. One ``autograd.grad`` per task (:func:`~mtl_dist.balancing.base.task_gradients`,
    the graph retained for the backward)."""

    def __init__(self, shared: Callable[[], list[nn.Parameter]]) -> None:
        self.shared = shared
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            return losses.new_zeros(0, 0)
        self.armed = False
        g = F.normalize(all_mean(task_gradients(losses, self.shared())), dim=1)
        return g @ g.t()


@dataclasses.dataclass
class StepVerdict:
    """What the step adds to the forward's :class:`StepOutput`: weights ``[T]``, conflict
    ``[T, T]`` or ``[0, 0]``, nonfinite ``[R, T + 1]`` and skipped ``[]`` (filled on the device
    when the guard resolves, before any update)."""

    weights: torch.Tensor
    conflict: torch.Tensor
    nonfinite: torch.Tensor
    skipped: torch.Tensor


class TrainStep:
    """Steps 2–3 of the module docstring for ``loss_module`` (built before it is sharded: the
    update gate goes into its model here).

    ``on_nonfinite``: the guard's mode (``train.on_nonfinite``). ``switch``
    (:class:`UpdateSwitch`) is this step's verdict, read by the dense
    optimizer (:func:`mtl_dist.loop.optim.build_optimizer`) and the update gate; ``scaler`` on
    it (fp16) scales the loss here. ``conflict.arm()`` measures the gradient conflict in the
    next step.

    Example::

        step = TrainStep(loss_module)
        loss, out = step.loss(loss_module(batch))   # 0-dim, StepOutput with the verdict
        loss.backward()
    """

    def __init__(self, loss_module: ModelWithLoss, on_nonfinite: str = "stop") -> None:
        self.balancer = loss_module.balancer
        self.switch = UpdateSwitch(on_nonfinite)
        apply_update_gate(loss_module.model, self.switch)
        # a balancer that reads label counts waits for the all-gather in the step; with fixed
        # weights it completes behind the head's backward
        self.check = StepCheck(
            self.switch, wait=not loss_module.fixed_weights, stop=preempt.STOP_REQUESTED.is_set
        )
        self.conflict = ConflictProbe(lambda: loss_module.model.head.shared_parameters())

    def combine(self, tl: TaskLosses) -> tuple[torch.Tensor, StepVerdict]:
        """The scalar to differentiate (scaled under fp16) and the step's verdict."""
        conflict = self.conflict(tl.losses)
        labelled, finite = self.check(tl.losses, tl.aux, tl.mask)  # None, None: fixed weights
        weighted, weights = self.balancer(tl.losses, labelled, finite)
        loss = weighted + tl.aux.sum()
        if tl.penalty is not None:
            loss = loss + tl.penalty
        if self.switch.scaler is not None:  # fp16: the backward runs on the scaled loss
            loss = loss * self.switch.scaler.scale
        self.switch.weights(weights)  # the weights count towards the verdict too
        return loss, StepVerdict(weights, conflict, self.switch.nonfinite, self.switch.skipped)

    def loss(self, forward: tuple[TaskLosses, StepOutput]) -> tuple[torch.Tensor, StepOutput]:
        """A training forward's ``(TaskLosses, StepOutput)`` → ``(loss, StepOutput)`` with the
        verdict filled in; no backward."""
        loss, verdict = self.combine(forward[0])
        return loss, complete(forward[1], verdict)

    def backward(self, tl: TaskLosses) -> StepVerdict:
        """Combine and differentiate: after it the gradients are in place (DDP averaged the
        dense ones, the fused optimizers updated the tables) and the verdict is being filled."""
        loss, verdict = self.combine(tl)
        loss.backward()
        return verdict


def complete(out: StepOutput, verdict: StepVerdict) -> StepOutput:
    """``out`` with the step's verdict (a new object)."""
    return dataclasses.replace(out, **dataclasses.asdict(verdict))


class StepPipeline(TrainPipelineSparseDist):
    """TorchRec's sparse-dist train pipeline with our backward: ``_backward`` runs
    :meth:`TrainStep.backward` on the forward's :class:`TaskLosses` and keeps its verdict for
    :class:`StepRunner`."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
        step: TrainStep,
    ) -> None:  # fmt: skip
        super().__init__(model, optimizer, device, execute_all_batches=True)
        self.step = step
        self.verdict: StepVerdict | None = None

    def _backward(self, losses: TaskLosses) -> None:  # (TorchRec's name: the forward's first)
        with record_function("## backward ##"):
            self.verdict = self.step.backward(losses)


class StepRunner:
    """Runs training steps, through :class:`StepPipeline` or plainly (``pipelined``).

    The pipeline overlaps the next batch's sparse input distribution with this batch's
    forward/backward (and host→device copies on GPU). It holds batches in flight, so the reader
    position of the batch just trained is tracked here (``trained_position``), not the reader's.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        step: TrainStep,
        pipelined: bool,
    ) -> None:
        self.model, self.optimizer, self.device, self.step = model, optimizer, device, step
        self.pipeline = StepPipeline(model, optimizer, device, step) if pipelined else None
        self._in_flight: list[tuple[int, int]] = []
        self.trained_position: tuple[int, int] | None = None
        self.trained: dict[int, int] = {}  # global worker → rows consumed, as of trained batches

    def _track(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for b in batches:
            self._in_flight.append(b.position)
            yield b

    def _trained(self, out: StepOutput, verdict: StepVerdict) -> StepOutput:
        position = self._in_flight.pop(0)
        self.trained_position = position
        self.trained[position[0]] = position[1]
        return complete(out, verdict)

    def run(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """Train on every batch of ``batches``; yields each step's output."""
        tracked = self._track(batches)
        if self.pipeline is None:
            for batch in tracked:
                self.optimizer.zero_grad()
                tl, out = self.model(batch.to(self.device, non_blocking=True))
                verdict = self.step.backward(tl)
                self.optimizer.step()
                yield self._trained(out, verdict)
            return
        self.pipeline.attach(self.model)
        while True:
            try:
                out = self.pipeline.progress(tracked)
            except StopIteration:
                break
            yield self._trained(out, self.pipeline.verdict)
        self.pipeline.detach()  # restore plain forwards (validation calls the model directly)
        self.pipeline.reset()
