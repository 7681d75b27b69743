"""Balancers that edit the gradient of the shared dense parameters from the tasks' own gradients
on them (PCGrad, CAGrad): T extra backward passes through the head per step, and one
all-reduce of ``[T, n]`` (n: the shared parameters' size).

Only the head's shared dense parameters (``head.shared_parameters()``: its experts, or bottom)
take part: the embedding tables are updated by fbgemm's fused optimizers inside backward, which
never materialise a table's gradient, so no method here can see or change it; task-specific
parameters get their own task's gradient as always. Each task's gradient is averaged over ranks
before it is combined, so every rank writes the same gradient; it replaces the one DDP averaged
just before the dense optimizer's step (and before gradient clipping, which then clips it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtl_dist.balancing.base import (
    Balancer,
    all_mean,
    present_tasks,
    task_gradients,
)


class ParameterBalancer(Balancer):
    """Per-task gradients ``g [T, n]`` on the shared parameters (averaged over ranks) →
    :meth:`combine` → the shared parameters' gradient, written by :meth:`before_step`. The loss
    is ``Σ_t L_t``; tasks without labels anywhere this step (zero gradient) are left out; a
    non-finite step writes nothing. ``weights`` are the tasks' effective weights in the
    combination where it has them (else 1)."""

    def __init__(self, num_tasks: int, parameters: Callable[[], list[nn.Parameter]]) -> None:
        super().__init__()
        self.parameters_of = parameters
        self.register_buffer("weights", torch.ones(num_tasks))
        self.steps = 0
        self._pending: tuple[list[nn.Parameter], torch.Tensor] | None = None

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> None:
        """The tasks' gradients (a collective), :meth:`combine`, kept for :meth:`before_step`."""
        params = [p for p in self.parameters_of() if p.requires_grad]
        g = all_mean(task_gradients(losses, params))  # [T, n], the same on every rank
        ok = present_tasks(labelled, losses) & finite
        with torch.no_grad():
            combined = self.combine(g, ok)
        self._pending = (params, combined) if bool(ok.any()) else None
        self.steps += 1

    def total(
        self, losses: torch.Tensor, weights: torch.Tensor, labelled: torch.Tensor | None
    ) -> torch.Tensor:
        """``Σ_t L_t``: the combination is in the gradient :meth:`before_step` writes."""
        return losses.sum()

    def combine(self, g: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self) -> None:
        """Write the combined gradient into the shared parameters (once per training step)."""
        if self._pending is None:
            return
        params, flat = self._pending
        self._pending = None
        if not bool(torch.isfinite(flat).all()):
            return
        offset = 0
        for p in params:
            part = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class PCGrad(ParameterBalancer):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): each task's
    gradient, for every other task in random order whose gradient conflicts with it
    (negative inner product), loses its projection onto that one:
    ``g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j``; the shared gradient is the sum of the projected ones.
    The order comes from a generator seeded with the step: the same on every rank, and on resume.
    In float64, and a task with a zero gradient is projected out of nothing: an absolute floor
    on ``‖g_j‖²`` (float32's) would under-project onto a task whose gradient is ≤ 1e-10, as a
    large scale gap between tasks makes the small ones'.
    """

    def combine(self, g: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        idx = ok.nonzero().squeeze(1).tolist()
        gen = torch.Generator().manual_seed(self.steps)
        g64 = g.double()
        norms = (g64 * g64).sum(1)  # [T]
        out = torch.zeros_like(g64[0])
        for i in idx:
            gi = g64[i].clone()
            for j in torch.randperm(len(idx), generator=gen).tolist():
                j = idx[j]
                if j != i and bool(norms[j] > 0):
                    dot = (gi * g64[j]).sum()
                    gi = gi - torch.clamp(dot, max=0.0) / norms[j] * g64[j]
            out += gi
        return out.to(g.dtype)


class CAGrad(ParameterBalancer):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
    2021): with ``g_0`` the mean task gradient, find ``w`` on the simplex minimising
    ``g_w·g_0 + √φ ‖g_w‖`` (``g_w = Σ w_i g_i``, ``φ = c² ‖g_0‖²``) — here by exponentiated
    gradient on the Gram matrix, a fixed number of steps (deterministic) — and move along
    ``d = (g_0 + √φ / ‖g_w‖ · g_w) / (1 + c²)`` (the paper's rescaled update), times T so it
    matches the sum of the losses. ``weights``: each task's coefficient in that combination.

    Args:
        num_tasks: T.
        parameters: the shared parameters (called each step).
        c: the conflict-aversion radius c ∈ [0, 1) (0: the plain mean).
    """

    iterations = 200

    def __init__(
        self, num_tasks: int, parameters: Callable[[], list[nn.Parameter]], c: float
    ) -> None:
        super().__init__(num_tasks, parameters)
        self.c = c

    def combine(self, g: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        idx = ok.nonzero().squeeze(1)
        if idx.numel() == 0:
            return torch.zeros_like(g[0])
        sub = g[idx].double()
        t = sub.shape[0]
        gram = sub @ sub.t()
        top = gram.diagonal().max()
        if not bool(top > 0):  # no task has a gradient: the plain mean (of zeros)
            coef = torch.full((t,), 1.0 / t, dtype=sub.dtype, device=sub.device)
        else:  # the coefficients are invariant to the Gram's scale: floors below are relative
            coef = self.coefficients((gram / top).cpu()).to(sub.device)  # [T']
        self.weights[idx] = (t * coef).to(self.weights.dtype)
        return ((t * coef) @ sub).to(g.dtype)

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """The tasks' coefficients ``[T']`` in ``d`` from their Gram matrix ``[T', T']`` (scaled
        to a largest diagonal entry of 1 by :meth:`combine`, so the 1e-20 floors are relative)."""
        t = gram.shape[0]
        mean = torch.full((t,), 1.0 / t, dtype=gram.dtype)
        phi = self.c**2 * float(mean @ gram @ mean)
        w = mean.clone()
        for _ in range(self.iterations):
            gw_norm = math.sqrt(max(float(w @ gram @ w), 1e-20))
            grad = gram @ mean + math.sqrt(phi) * (gram @ w) / gw_norm  # ∇F(w)
            w = w * torch.exp(-grad / grad.abs().max().clamp_min(1e-20))
            w = w / w.sum()
        gw_norm = math.sqrt(max(float(w @ gram @ w), 1e-20))
        lam = math.sqrt(phi) / gw_norm
        return (mean + lam * w) / (1 + self.c**2)
