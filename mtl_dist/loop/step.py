"""The training step, in our code: forward → the step check across ranks → the balancer → loss
scaling → ``backward()`` → the optimizer step.

One batch through it (the same for the pipelined and the plain path):

1. ``ModelWithLoss.forward(batch)`` (:mod:`mtl_dist.loop.losses`, under DMP / DDP) returns the
   task losses ``[T]``, the aux losses ``[A]``, the loss mask ``[B, T]`` and the embedding
   penalty (:class:`~mtl_dist.loop.losses.TaskLosses`) with the detached
   :class:`~mtl_dist.loop.losses.StepOutput`;
2. :meth:`TrainStep.loss`: the step check (:class:`~mtl_dist.loop.guard.StepCheck`: every
   rank's label counts, loss finiteness and stop request, one all-gather), the gradient-conflict
   probe when armed, the balancer (``loss.balancer``) → one scalar, + Σ aux + penalty, × the
   fp16 loss scale; the balancer's weights join the guard's verdict;
3. :meth:`TrainStep.backward`: ``loss.backward()`` — the update gate at the head's input
   (:func:`~mtl_dist.loop.guard.apply_update_gate`) zeroes the tables' gradient of a step the
   guard closed, and the fused embedding optimizers update inside it;
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
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from mtl_dist.balancing.base import task_gradients
from mtl_dist.data.batch import Batch
from mtl_dist.distributed.collectives import all_mean
from mtl_dist.loop import preempt
from mtl_dist.loop.guard import StepCheck, UpdateSwitch, apply_update_gate
from mtl_dist.loop.losses import ModelWithLoss, StepOutput, TaskLosses


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
    (:class:`~mtl_dist.loop.guard.UpdateSwitch`) is this step's verdict, read by the dense
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
            self.switch, wait=not loss_module.fixed_weights, stop=preempt.requested
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
