"""Loss balancing: how T task losses ``[T]`` become one training loss, and the weights used.

Every balancer maps ``losses [T]`` to ``(Σ_t w_t · loss_t [+ its own terms], weights [T])``.
The weights that drive training are identical on every rank: learnable ones are dense
parameters (averaged by DDP); rule-based ones are computed from all-reduced statistics.

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


class FixedWeights(nn.Module):
    """``loss = Σ_t w_t · loss_t`` with constant weights."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weights * losses).sum(), self.weights


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting with learnable ``s_t = log σ_t²`` (init 0).

    Classification: ``e^{-s} L + s/2`` (from ``L/σ² + log σ``); regression:
    ``½ e^{-s} L + s/2`` (from ``L/(2σ²) + log σ``). The weight reported is ``c_t e^{-s_t}``.
    """

    def __init__(self, is_binary: list[bool]) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(len(is_binary)))
        self.register_buffer("scale", torch.tensor([1.0 if b else 0.5 for b in is_binary]))

    def forward(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.scale * torch.exp(-self.log_vars)
        return (w * losses).sum() + 0.5 * self.log_vars.sum(), w.detach()


class GradNorm(nn.Module):
    """GradNorm: tune weights so each task's gradient norm on the shared layer W tracks its
    relative training rate.

    Per training step, with ``g_t = ‖∇_W loss_t‖`` (gradients averaged over ranks first),
    ``G_t = w_t g_t``, ``r_t = (L_t / L_t(0)) / mean_i(L_i / L_i(0))`` (losses averaged over
    ranks) and the target ``Ḡ · r_t^α`` held constant, the GradNorm loss ``Σ_t |G_t − target_t|``
    has gradient ``sign(G_t − target_t) · g_t`` in ``w_t``: one step of size ``lr``, then the
    weights are renormalised to sum to T. This step's loss uses the weights from before it.
    Every rank computes the update from the same all-reduced numbers, so weights stay equal.

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

    def forward(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.clone()
        if self.training and torch.is_grad_enabled():
            self.update(losses)
        return (w * losses).sum(), w

    def update(self, losses: torch.Tensor) -> None:
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
        L = all_mean(losses)
        with torch.no_grad():
            # a task's reference loss is its first non-zero one (a batch may lack its labels)
            self.initial_losses.copy_(torch.where(self.initial_losses > 0, self.initial_losses, L))
            ratio = L / self.initial_losses.clamp_min(1e-12)
            r = ratio / ratio.mean().clamp_min(1e-12)
            G = self.weights * g
            target = G.mean() * r.pow(self.alpha)
            w = (self.weights - self.lr * torch.sign(G - target) * g).clamp_min(1e-3)
            self.weights.copy_(w * len(w) / w.sum())


class DynamicWeightAverage(nn.Module):
    """DWA: ``w_t = T · softmax_t(r_t / temperature)``, ``r_t = L̄_t(k−1) / L̄_t(k−2)``, where
    ``L̄(k)`` is the mean loss of period k (``period`` steps, averaged over ranks: the paper's
    epoch). Weights are 1 for the first two periods and change once per period.
    """

    def __init__(self, num_tasks: int, temperature: float, period: int) -> None:
        super().__init__()
        self.temperature, self.period = temperature, period
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("loss_sum", torch.zeros(num_tasks))
        self.register_buffer("history", torch.zeros(2, num_tasks))  # L̄(k−2), L̄(k−1)
        self.steps = 0  # steps into the current period (checkpointed via extra state)
        self.periods = 0

    def forward(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.clone()
        if self.training and torch.is_grad_enabled():
            self.loss_sum += losses.detach()
            self.steps += 1
            if self.steps == self.period:
                self._end_period()
        return (w * losses).sum(), w

    @torch.no_grad()
    def _end_period(self) -> None:
        mean = all_mean(self.loss_sum) / self.period
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.loss_sum.zero_()
        self.steps = 0
        self.periods += 1
        if self.periods >= 2:
            r = self.history[1] / self.history[0].clamp_min(1e-12)
            self.weights.copy_(len(r) * torch.softmax(r / self.temperature, 0))

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "periods": self.periods}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps, self.periods = int(state["steps"]), int(state["periods"])


def build_balancer(
    cfg: LossConfig, tasks: list[TaskSpec], shared: Callable[[], torch.Tensor]
) -> nn.Module:
    """The configured balancer; ``shared`` returns the head's last shared layer (GradNorm)."""
    weights = [t.weight for t in tasks]
    if cfg.balancer == "uncertainty":
        return UncertaintyWeighting([t.kind == "binary" for t in tasks])
    if cfg.balancer == "gradnorm":
        return GradNorm(weights, cfg.gradnorm_alpha, cfg.gradnorm_lr, shared)
    if cfg.balancer == "dwa":
        return DynamicWeightAverage(len(tasks), cfg.dwa_temperature, cfg.dwa_period)
    return FixedWeights(weights)
