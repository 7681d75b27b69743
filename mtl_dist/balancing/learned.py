"""Loss-only balancers with learned state: weights that follow the losses through an
optimiser of their own (no gradient beyond the training loss's)."""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.balancing.base import Balancer, GlobalLossRule, present_tasks


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

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> None:
        self._frozen = ~present_tasks(labelled, losses)

    def current(self, losses: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.exp(-self.log_vars.detach())

    def total(
        self, losses: torch.Tensor, weights: torch.Tensor, labelled: torch.Tensor | None
    ) -> torch.Tensor:
        """The weights again, with their graph to ``s`` (on the tasks with labels), + ``s / 2``."""
        present = present_tasks(labelled, losses)
        s = torch.where(present, self.log_vars, self.log_vars.detach())
        w = self.scale * torch.exp(-s)
        return (w * losses).sum() + 0.5 * torch.where(present, s, 0.0).sum()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        def before(*_) -> None:
            self._before = self.log_vars.detach().clone()

        @torch.no_grad()
        def after(*_) -> None:
            if self._frozen is not None and self._before is not None:
                self.log_vars.copy_(torch.where(self._frozen, self._before, self.log_vars))

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


class FAMO(GlobalLossRule):
    """FAMO (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023): decrease
    every task's loss at an equal rate, at the cost of one loss evaluation per step.

    Logits ``ξ [T]``, ``z = softmax(ξ)``; with ``D_t = L̄_t + ε`` (the task's loss averaged over
    the ranks with labels; the paper's minimum loss is 0 for BCE and MSE), the step's loss is
    ``Σ_t (z_t / c) log D_t``, ``c = Σ_s z_s / D_s``, i.e. weight ``z_t / (c D_t)`` on ``L_t``
    — reported and applied scaled by T (``Σ_t w_t L_t``, same gradient, weights summing to T).
    ``ξ`` then learns from the change of each log loss, ``δ_t = log D_t(before) − log D_t(after)``:
    gradient ``J_softmax(ξ)ᵀ δ`` plus weight decay ``γ ξ``, one Adam step (``lr``).

    What "after" is: the paper evaluates the losses again on the same batch after the update (an
    extra forward); here the next step's losses stand in for them — free, but a batch apart. A
    task without labels in either of the two steps has ``δ_t = 0``; a non-finite step changes
    nothing. Every number comes from losses averaged over ranks, so ξ is the same everywhere;
    ξ, the Adam moments and the previous losses are buffers (checkpointed: exact resume).

    Args:
        num_tasks: T.
        lr: Adam's step size for ξ (the paper's 0.025).
        weight_decay: γ (the paper's 0.001).
    """

    eps = 1e-8
    betas = (0.9, 0.999)

    def __init__(self, num_tasks: int, lr: float, weight_decay: float) -> None:
        super().__init__(num_tasks)
        self.lr, self.weight_decay = lr, weight_decay
        for name in ("logits", "exp_avg", "exp_avg_sq", "previous"):
            self.register_buffer(name, torch.zeros(num_tasks))
        self.register_buffer("has_previous", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("adam_steps", torch.zeros(()))

    def rule(self, mean: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Learn ξ from the losses ``mean [T]`` (``ok``: labelled and finite), then return this
        step's weights. Nothing changes when no task is ok."""
        if not bool(ok.any()):
            return self.weights
        log_d = torch.log(mean + self.eps)
        both = ok & self.has_previous
        if bool(both.any()):
            delta = torch.where(both, self.previous - log_d, 0.0)
            z = torch.softmax(self.logits, 0)
            grad = z * (delta - (z * delta).sum()) + self.weight_decay * self.logits
            self._adam_step(grad)
        z = torch.softmax(self.logits, 0)
        share = torch.where(ok, z / (mean + self.eps), 0.0)
        self.previous.copy_(torch.where(ok, log_d, self.previous))
        self.has_previous |= ok
        return len(z) * share / share.sum()

    def _adam_step(self, grad: torch.Tensor) -> None:
        """One Adam step (Kingma & Ba 2015, bias-corrected) of ξ on ``grad``."""
        b1, b2 = self.betas
        self.adam_steps += 1
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m = self.exp_avg / (1 - b1**self.adam_steps)
        v = self.exp_avg_sq / (1 - b2**self.adam_steps)
        self.logits -= self.lr * m / (v.sqrt() + self.eps)
