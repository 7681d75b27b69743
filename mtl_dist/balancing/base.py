"""What every balancer shares: the interface and the cross-rank reductions."""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.distributed.collectives import all_mean, all_sum

__all__ = ["all_mean", "all_sum"]  # (re-exported: the balancers' reductions)


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
    """``forward(losses [T], labelled [R, T] | None, finite [] | None)`` →
    ``(loss, weights [T])`` (see the module docstring); :meth:`attach` hooks the dense
    optimizer where a balancer's learnable state needs it."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the dense (torch) optimizer; nothing by default."""

    def before_step(self) -> None:
        """Called by the dense optimizer first thing in each step, after DDP averaged the
        gradients and before clipping (parameter-gradient balancers write theirs); nothing by
        default."""


class GlobalLossRule(Balancer):
    """A balancer whose weights are a function of this step's losses averaged over ranks
    (:func:`global_losses`): ``weights(L̄ [T], ok [T]) → [T]`` on the tasks labelled somewhere
    this step; the others keep their last weight (their loss is 0). A non-finite step changes
    nothing. The training loss ``Σ_t w_t L_t`` (``w`` detached) has the method's gradient."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.register_buffer("weights", torch.ones(num_tasks))

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if training_step(self):
            mean, present = global_losses(losses.detach(), labelled)
            ok = present & all_finite(finite, losses)
            with torch.no_grad():
                new = torch.where(ok, self.rule(mean, ok), self.weights)
                keep = ok.any() & torch.isfinite(new).all()
                self.weights.copy_(torch.where(keep, new, self.weights))
        w = self.weights.clone()
        return (w * losses).sum(), w

    def rule(self, mean: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
