"""Loss balancing: how T task losses ``[T]`` become one training loss, and the weights used.

Every balancer maps ``losses [T]`` to ``(Σ_t w_t · loss_t [+ its own terms], weights [T])``.
The weights that drive training are identical on every rank: learnable ones are dense
parameters (averaged by DDP); rule-based ones are computed from all-reduced statistics.

In training each balancer also gets ``labelled [R, T]`` — the rows with a label per rank and
task in this step, identical on every rank (see :class:`mtl_dist.guard.StepCheck`) — and
``finite`` (every rank's losses are finite). A task without a labelled row on any rank, and
every task in a non-finite step, leaves the balancer's state exactly as it was: no log-variance
drift, no GradNorm step, no DWA period statistic. Weights stay finite and > 0.

* :class:`FixedWeights`: ``tasks[].weight``.
* :class:`UncertaintyWeighting`: Kendall, Gal & Cipolla (CVPR 2018), learnable ``s_t = log σ_t²``.
* :class:`GradNorm`: Chen et al. (ICML 2018), on the head's last shared layer.
* :class:`DynamicWeightAverage`: Liu, Johns & Davison (CVPR 2019), from per-period loss ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtl_dist.config import LossConfig, TaskSpec


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (``x`` itself without a process group); a new tensor."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)  # SUM: gloo has no AVG
        x /= dist.get_world_size()
    return x


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks (``x`` itself without a process group); a new tensor."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _present(labelled: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the task has a labelled row on some rank (all, without ``labelled``)."""
    if labelled is None:
        return torch.ones_like(losses, dtype=torch.bool)
    return labelled.sum(0) > 0


def _finite(finite: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(losses).all() if finite is None else finite


class Balancer(nn.Module):
    """``forward(losses [T], labelled [R, T] | None, finite [] | None)`` →
    ``(loss, weights [T])`` (see the module docstring); :meth:`attach` hooks the dense
    optimizer where a balancer's learnable state needs it."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the dense (torch) optimizer; nothing by default."""


class FixedWeights(Balancer):
    """``loss = Σ_t w_t · loss_t`` with constant weights."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weights * losses).sum(), self.weights


class UncertaintyWeighting(Balancer):
    """Homoscedastic uncertainty weighting with learnable ``s_t = log σ_t²`` (init 0).

    Classification: ``e^{-s} L + s/2`` (from ``L/σ² + log σ``); regression:
    ``½ e^{-s} L + s/2`` (from ``L/(2σ²) + log σ``). The weight reported is ``c_t e^{-s_t}``.

    A task without a labelled row on any rank this step has ``L = 0``: its term would still
    pull ``s`` down by ½ per step (weight growing until ``inf × 0 = NaN``). Its term is left
    out (no gradient), and :meth:`attach` restores its ``s`` after the optimizer step, so
    momentum from earlier steps does not move it either.
    """

    def __init__(self, is_binary: list[bool]) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(len(is_binary)))
        self.register_buffer("scale", torch.tensor([1.0 if b else 0.5 for b in is_binary]))
        self._frozen: torch.Tensor | None = None  # [T] tasks kept as they are this step
        self._before: torch.Tensor | None = None

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        present = _present(labelled, losses)
        if self.training and torch.is_grad_enabled():
            self._frozen = ~present
        s = torch.where(present, self.log_vars, self.log_vars.detach())
        w = self.scale * torch.exp(-s)
        loss = (w * losses).sum() + 0.5 * torch.where(present, s, 0.0).sum()
        return loss, w.detach()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        def before(*_) -> None:
            self._before = self.log_vars.detach().clone()

        @torch.no_grad()
        def after(*_) -> None:
            if self._frozen is not None and self._before is not None:
                self.log_vars.copy_(torch.where(self._frozen, self._before, self.log_vars))

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


class GradNorm(Balancer):
    """GradNorm: tune weights so each task's gradient norm on the shared layer W tracks its
    relative training rate.

    Per training step, with ``g_t = ‖∇_W loss_t‖`` (gradients averaged over ranks first),
    ``G_t = w_t g_t``, ``r_t = (L_t / L_t(0)) / mean_i(L_i / L_i(0))`` (``L_t``: the mean loss
    of the ranks with labels for t) and the target ``Ḡ · r_t^α`` held constant, the GradNorm
    loss ``Σ_t |G_t − target_t|`` has gradient ``sign(G_t − target_t) · g_t`` in ``w_t``: one
    step of size ``lr``, then the weights are renormalised to sum to T. This step's loss uses
    the weights from before it. Every rank computes the update from the same all-reduced
    numbers, so weights stay equal. Only tasks with labels this step (on some rank) take part:
    the others keep their weight and are left out of the means (a label-less task's ``L = 0``
    would otherwise read as "trained fastest"); a non-finite step changes nothing.

    Args:
        weights: initial weights (renormalised to sum to T).
        alpha: the asymmetry α; 0 pulls all gradient norms together.
        lr: step size of the weight update.
        shared: returns the last shared layer's weight W (e.g. the experts' last layer).
    """

    def __init__(
        self,
        weights: list[float],
        alpha: float,
        lr: float,
        shared: Callable[[], torch.Tensor],
    ) -> None:
        super().__init__()
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w * len(weights) / w.sum())
        self.register_buffer("initial_losses", torch.zeros(len(weights)))
        self.alpha, self.lr, self.shared = alpha, lr, shared

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.clone()
        if self.training and torch.is_grad_enabled():
            self.update(losses, labelled, _finite(finite, losses))
        return (w * losses).sum(), w

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> None:
        """One GradNorm step on ``self.weights`` from this step's task losses (with graph)."""
        W = self.shared()

        def grad(loss: torch.Tensor) -> torch.Tensor:
            g = (
                torch.autograd.grad(loss, W, retain_graph=True, allow_unused=True)[0]
                if loss.requires_grad
                else None
            )
            return torch.zeros_like(W) if g is None else g

        grads = torch.stack([grad(loss) for loss in losses])  # [T, *W.shape]
        g = all_mean(grads.flatten(1)).norm(dim=1)  # [T]
        present = _present(labelled, losses)
        ranks = (labelled > 0).sum(0) if labelled is not None else torch.ones_like(losses)
        L = all_sum(losses) / ranks.clamp_min(1)  # the mean over ranks with labels
        with torch.no_grad():
            ok = present & finite
            # a task's reference loss is its first one with labels
            first = ok & (self.initial_losses <= 0)
            self.initial_losses.copy_(torch.where(first, L, self.initial_losses))
            n = ok.sum().clamp_min(1)
            ratio = torch.where(ok, L / self.initial_losses.clamp_min(1e-12), 0.0)
            r = ratio / ((ratio.sum() / n).clamp_min(1e-12))
            G = torch.where(ok, self.weights * g, 0.0)
            target = (G.sum() / n) * r.pow(self.alpha)
            stepped = (self.weights - self.lr * torch.sign(G - target) * g).clamp_min(1e-3)
            w = torch.where(ok, stepped, self.weights)
            # renormalise the tasks that took part so the weights still sum to T
            fixed = torch.where(ok, 0.0, w).sum()
            moved = torch.where(ok, w, 0.0)
            scale = (len(w) - fixed) / moved.sum().clamp_min(1e-12)
            new = torch.where(ok, w * scale, w)
            self.weights.copy_(torch.where(ok.any() & torch.isfinite(new).all(), new, self.weights))


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

    def forward(
        self,
        losses: torch.Tensor,
        labelled: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.clone()
        if self.training and torch.is_grad_enabled():
            ok = _finite(finite, losses)
            if labelled is None:  # one process: every task counts
                mine = counted = ok.expand_as(losses)
            else:  # this rank's labels, and how many ranks had them
                rank = dist.get_rank() if labelled.shape[0] > 1 else 0
                mine = (labelled[rank] > 0) & ok
                counted = ((labelled > 0) & ok).sum(0)
            self.loss_sum += torch.where(mine, losses.detach(), 0.0)
            self.loss_count += counted
            self.steps += 1
            if self.steps == self.period:
                self._end_period()
        return (w * losses).sum(), w

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


def build_balancer(
    cfg: LossConfig, tasks: list[TaskSpec], shared: Callable[[], torch.Tensor]
) -> Balancer:
    """The configured balancer; ``shared`` returns the head's last shared layer (GradNorm)."""
    weights = [t.weight for t in tasks]
    if cfg.balancer == "uncertainty":
        return UncertaintyWeighting([t.kind == "binary" for t in tasks])
    if cfg.balancer == "gradnorm":
        return GradNorm(weights, cfg.gradnorm_alpha, cfg.gradnorm_lr, shared)
    if cfg.balancer == "dwa":
        return DynamicWeightAverage(len(tasks), cfg.dwa_temperature, cfg.dwa_period)
    return FixedWeights(weights)
