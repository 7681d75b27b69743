"""Loss-only balancers driven by rules: the weights are a function of the losses (averaged over
ranks first), the step, or constants — about free. The constant one, :class:`FixedWeights` (the
default), is in :mod:`mtl_dist.balancing.base` and imports from here too."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mtl_dist.balancing.base import Balancer, FixedWeights, GlobalLossRule, all_sum

__all__ = [
    "DynamicWeightAverage", "FixedWeights", "GeometricLoss", "RandomLossWeighting",
    "SmoothTchebycheff",
]  # fmt: skip


class DynamicWeightAverage(Balancer):
    """DWA: ``w_t = T · softmax_t(r_t / temperature)``, ``r_t = L̄_t(k−1) / L̄_t(k−2)``, where
    ``L̄(k)`` is the mean loss of period k (``period`` steps: the paper's epoch) over the steps
    and ranks where the task had labels (and every loss was finite). Weights are 1 for the first
    two periods and change once per period.

    A task with no labelled step in one of the two periods has no ratio: it stays neutral
    (``r_t = 1``) — a ratio over a near-zero mean would hand it all the weight and the others
    exactly 0. No weight falls below ``min_weight`` (1% of the neutral weight).
    """

    min_weight = 0.01

    def __init__(self, num_tasks: int, temperature: float, period: int) -> None:
        super().__init__()
        self.temperature, self.period = temperature, period
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("loss_sum", torch.zeros(num_tasks))  # this rank's, this period
        self.register_buffer("loss_count", torch.zeros(num_tasks))  # over all ranks
        self.register_buffer("history", torch.zeros(2, num_tasks))  # L̄(k−2), L̄(k−1); NaN: none
        self.steps = 0  # steps into the current period (checkpointed via extra state)
        self.periods = 0

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> torch.Tensor:
        """Count this step into the period (ending it after ``period`` steps); the step's loss
        uses the weights from before."""
        w = self.weights.clone()
        if labelled is None:  # one process: every task counts
            mine = counted = finite.expand_as(losses)
        else:  # this rank's labels, and how many ranks had them
            rank = dist.get_rank() if labelled.shape[0] > 1 else 0
            mine = (labelled[rank] > 0) & finite
            counted = ((labelled > 0) & finite).sum(0)
        self.loss_sum += torch.where(mine, losses.detach(), 0.0)
        self.loss_count += counted
        self.steps += 1
        if self.steps == self.period:
            self._end_period()
        return w

    @torch.no_grad()
    def _end_period(self) -> None:
        total = all_sum(self.loss_sum)
        mean = torch.where(self.loss_count > 0, total / self.loss_count.clamp_min(1), torch.nan)
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.steps = 0
        self.periods += 1
        if self.periods >= 2:
            prev, last = self.history[0], self.history[1]
            formed = torch.isfinite(prev) & torch.isfinite(last) & (prev > 0)
            r = torch.where(formed, last / prev.clamp_min(1e-12), 1.0)
            w = len(r) * torch.softmax(r / self.temperature, 0)
            w = w.clamp_min(self.min_weight)
            self.weights.copy_(len(w) * w / w.sum())

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "periods": self.periods}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps, self.periods = int(state["steps"]), int(state["periods"])


class RandomLossWeighting(Balancer):
    """RLW (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022): each training
    step weighs the tasks by ``T · softmax(z)``, ``z ~ N(0, I_T)`` drawn anew (scaled by T so the
    weights average 1, as fixed weights do). ``z`` comes from a generator seeded with the step
    number: the same draw on every rank, and a resumed run draws what the uninterrupted one
    would (the step count is checkpointed). Outside training the weights are 1.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.steps = 0

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> torch.Tensor:
        w = self.draw(self.steps).to(losses.device)
        self.steps += 1
        return w

    def current(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)

    def draw(self, step: int) -> torch.Tensor:
        """The weights ``[T]`` of training step ``step``."""
        z = torch.randn(self.num_tasks, generator=torch.Generator().manual_seed(step))
        return self.num_tasks * torch.softmax(z, 0)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class GeometricLoss(GlobalLossRule):
    """GLS (Chennupati et al., "MultiNet++", CVPR Workshops 2019): the geometric mean of the task
    losses, ``(Π_t L_t)^{1/T}``, whose gradient weighs task t by ``G / (T · L_t)`` (G the
    geometric mean): a task's weight falls as its loss grows, so no task's scale dominates.
    Computed at the losses averaged over ranks (identical weights everywhere) over the tasks
    labelled this step, scaled by T (equal losses weigh 1 each): ``w_t = G / L̄_t``.
    """

    eps = 1e-8

    def rule(self, mean: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        log = torch.log(mean.clamp_min(self.eps))
        g = torch.exp(torch.where(ok, log, 0.0).sum() / ok.sum().clamp_min(1))
        return g / mean.clamp_min(self.eps)


class SmoothTchebycheff(GlobalLossRule):
    """STCH (Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML 2024): ``μ · log Σ_t exp(λ_t (L_t − z*_t) / μ)``, a smooth maximum of the weighted
    losses (the Tchebycheff scalarisation as μ → 0). Here the ideal point ``z* = 0`` (the
    losses are ≥ 0) and the preference ``λ_t = 1 / L̄_t(0)``, the task's first loss averaged over
    ranks, so the tasks start on one scale. Its gradient weighs task t by
    ``softmax_t(λ L̄ / μ) · λ_t`` (over the tasks labelled this step), scaled by their count T.

    Args:
        num_tasks: T.
        mu: the smoothing μ (> 0): small follows the worst task, large averages.
    """

    def __init__(self, num_tasks: int, mu: float) -> None:
        super().__init__(num_tasks)
        self.mu = mu
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def rule(self, mean: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        first = ok & (self.initial_losses <= 0)
        self.initial_losses.copy_(torch.where(first, mean, self.initial_losses))
        lam = 1.0 / self.initial_losses.clamp_min(1e-8)
        scores = torch.where(ok, lam * mean / self.mu, -torch.inf)
        return ok.sum() * torch.softmax(scores, 0) * lam
