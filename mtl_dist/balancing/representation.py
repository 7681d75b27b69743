"""Balancers that read gradients on the shared representation (one extra backward per task
through the head's last shared layer; none through the experts' inputs or the tables)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtl_dist.balancing.base import (
    Balancer,
    all_finite,
    all_mean,
    all_sum,
    present_tasks,
    training_step,
)


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
        if training_step(self):
            self.update(losses, labelled, all_finite(finite, losses))
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
        present = present_tasks(labelled, losses)
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
