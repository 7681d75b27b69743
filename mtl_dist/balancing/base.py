"""What every balancer shares: the template :class:`Balancer` (``forward`` written once, calling
a subclass's ``update`` / ``current`` / ``total``), the helpers its steps use (tasks present,
finiteness, rank-averaged losses, per-task gradients) and the cross-rank reductions; and the
default balancer, :class:`FixedWeights` (``loss.balancer = fixed``), so that a default run's step
needs no other balancing file."""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.distributed.collectives import all_mean, all_sum

__all__ = ["Balancer", "FixedWeights", "GlobalLossRule", "all_mean", "all_sum"]


def present_tasks(labelled: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the task has a labelled row on some rank (all, without ``labelled``)."""
    if labelled is None:
        return torch.ones_like(losses, dtype=torch.bool)
    return labelled.sum(0) > 0


def all_finite(finite: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(losses).all() if finite is None else finite


def global_losses(
    losses: torch.Tensor, labelled: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L̄ [T], present [T])``: each task's loss averaged over the ranks that had labels for it
    this step (identical on every rank; a collective), and whether any rank had."""
    ranks = (labelled > 0).sum(0) if labelled is not None else torch.ones_like(losses)
    return all_sum(losses) / ranks.clamp_min(1), present_tasks(labelled, losses)


def task_gradients(losses: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Each task's gradient on ``inputs``, flattened and concatenated: ``[T, Σ numel]`` float32
    (zeros where a loss does not reach an input, or has no graph: a task without labels). The
    graph is kept for the training backward."""
    rows = []
    for loss in losses:
        grads = (
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            if loss.requires_grad
            else [None] * len(inputs)
        )
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(x) if g is None else g).flatten().float()
                    for x, g in zip(inputs, grads)
                ]
            )  # fmt: skip
        )
    return torch.stack(rows)


def training_step(module: nn.Module) -> bool:
    """A training forward with autograd on: the only time a balancer updates its state (and
    runs collectives: validation forwards differ in number between ranks)."""
    return module.training and torch.is_grad_enabled()


class Balancer(nn.Module):
    """The template every balancer fills in (as LibMTL's ``AbsWeighting``): :meth:`forward` is
    written here once and a subclass says only what differs about it —

    * :meth:`update` ``(losses, labelled, finite)``: the state change of one training step (a
      training forward with autograd on, :func:`training_step`: the only time a balancer moves
      its state or runs a collective); nothing by default. It may return the step's weights
      where they are not :meth:`current`'s after it (drawn anew, or those from before it);
    * :meth:`current` ``(losses)``: the weights as they stand, moving nothing — what every
      forward outside a training step returns; a copy of the ``weights`` buffer by default;
    * :meth:`total` ``(losses, weights, labelled)``: the training loss; ``Σ_t w_t · L_t`` by
      default, with the method's own terms (or another combination) where it has them.

    :meth:`attach` and :meth:`before_step` hook the dense optimizer where a balancer's learnable
    state or gradient edit needs it."""

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``losses [T]``, ``labelled [R, T] | None`` (rows with a label per rank and task, the
        same on every rank; None: one process, every task labelled), ``finite [] | None`` (every
        rank's losses are finite; None: this rank's) → ``(loss, weights [T])``."""
        weights = None
        if training_step(self):
            weights = self.update(losses, labelled, all_finite(finite, losses))
        if weights is None:
            weights = self.current(losses)
        return self.total(losses, weights, labelled), weights

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> torch.Tensor | None:
        """One training step's state change (``finite``: a bool ``[]``, resolved); the same
        collectives in the same order on every rank, none skipped on one of them. Returns the
        step's weights, or None for :meth:`current` after it; nothing changes by default."""
        return None

    def current(self, losses: torch.Tensor) -> torch.Tensor:
        """The weights ``[T]`` as they stand (a copy: the state stays the balancer's)."""
        return self.weights.clone()

    def total(
        self, losses: torch.Tensor, weights: torch.Tensor, labelled: torch.Tensor | None
    ) -> torch.Tensor:
        """The training loss from ``losses [T]`` and this forward's ``weights [T]``."""
        return (weights * losses).sum()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the dense (torch) optimizer; nothing by default."""

    def before_step(self) -> None:
        """Called by the dense optimizer first thing in each step, after DDP averaged the
        gradients and before clipping (parameter-gradient balancers write theirs); nothing by
        default."""


class FixedWeights(Balancer):
    """``loss = Σ_t w_t · loss_t`` with constant weights ``[T]`` (``tasks[].weight``): the
    default balancer. Moves no state and runs no collective.

    Example::

        >>> loss, w = FixedWeights([1.0, 0.5])(torch.tensor([2.0, 4.0]))
        >>> float(loss), w.tolist()
        (4.0, [1.0, 0.5])
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))


class GlobalLossRule(Balancer):
    """A balancer whose weights are a function of this step's losses averaged over ranks
    (:func:`global_losses`): ``weights(L̄ [T], ok [T]) → [T]`` on the tasks labelled somewhere
    this step; the others keep their last weight (their loss is 0). A non-finite step changes
    nothing. The training loss ``Σ_t w_t L_t`` (``w`` detached: this step's, after the rule) has
    the method's gradient."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.register_buffer("weights", torch.ones(num_tasks))

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> None:
        mean, present = global_losses(losses.detach(), labelled)
        ok = present & finite
        with torch.no_grad():
            new = torch.where(ok, self.rule(mean, ok), self.weights)
            keep = ok.any() & torch.isfinite(new).all()
            self.weights.copy_(torch.where(keep, new, self.weights))

    def rule(self, mean: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
