"""Balancers that read gradients on the shared representation (one extra backward per task
through the head's last shared layer; none through the experts' inputs or the tables)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtl_dist.balancing.base import (
    Balancer,
    all_mean,
    all_sum,
    present_tasks,
    task_gradients,
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

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> torch.Tensor:
        """One GradNorm step on ``self.weights`` from this step's task losses (with graph); the
        step's loss uses the weights from before it."""
        before = self.weights.clone()
        W = self.shared()
        g = all_mean(task_gradients(losses, [W])).norm(dim=1)  # [T]
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
        return before


class RepresentationBalancer(Balancer):
    """Weights from the task gradients on the head's shared representation ``Z`` (the experts'
    or bottom's output: the model's output's ``shared``, which ``representation()`` returns for
    the step; MultiBalance's idea of balancing there rather than
    on parameters), through one extra backward per task that stops at ``Z`` — through the towers
    and gates, never the experts or the tables.

    Under DDP every rank holds other rows of ``Z``: the gradients of different rows are
    orthogonal blocks of the global batch's gradient, so the Gram matrix of the whole batch is
    the sum over ranks of each rank's ``G_ij = ⟨∂L_i/∂Z, ∂L_j/∂Z⟩`` — one all-reduce of ``[T, T]``
    and every rank solves the same problem (``L_t`` here: this rank's loss; the global loss is
    their mean, a common factor every method below is invariant to or renormalises). Tasks
    without labels anywhere this step are left out (and keep their weight); a non-finite step
    changes nothing. The training loss ``Σ_t w_t L_t`` (``w`` detached) then moves the whole
    model along the balanced direction. Subclasses give :meth:`solve` ``(Gram [T', T'] of the
    present tasks) → weights [T']``; the Gram matrix is float64, and every method is invariant
    to its scale, so each solves on it divided by its largest diagonal entry: the tolerances
    below are then relative to the largest task gradient, not absolute float32 floors that a 1e4
    gap between the tasks' gradients crosses.
    """

    needs_representation = True

    def __init__(
        self, num_tasks: int, representation: Callable[[], torch.Tensor | None] | None
    ) -> None:
        super().__init__()
        self.representation = representation or (lambda: None)
        self.register_buffer("weights", torch.ones(num_tasks))

    def update(
        self, losses: torch.Tensor, labelled: torch.Tensor | None, finite: torch.Tensor
    ) -> None:
        """Per-task gradients on Z, the global Gram matrix, :meth:`solve` (a collective)."""
        ok = present_tasks(labelled, losses) & finite
        z = self.representation()
        if z is None or not z.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__} needs the head's shared representation: the model returned "
                "none (ModelWithLoss asks the model for it: probes.shared)"
            )
        flat = task_gradients(losses, [z]).double()  # [T, n]
        # float64: with one task's gradient 1e4× another's, their Gram entries are 1e8 apart
        gram = all_sum(flat @ flat.t())  # [T, T], the global batch's
        with torch.no_grad():
            idx = ok.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            sub = gram[idx][:, idx]
            new = self.solve(sub)
            if bool(torch.isfinite(new).all()):
                self.weights[idx] = new.to(self.weights.dtype)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MGDA(RepresentationBalancer):
    """MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018): the convex combination ``Σ_t α_t g_t`` of the task gradients on the shared
    representation with the smallest norm (a common descent direction). Solved exactly from the
    Gram matrix: the minimum lies on some face of the simplex, and on a face S the KKT system
    ``[G_SS 1; 1ᵀ 0] [α; μ] = [0; 1]`` gives it; the feasible face (α ≥ 0) with the least
    ``αᵀ G α`` wins (2^T − 1 faces: T ≤ 10 here; beyond, Frank-Wolfe as in the paper). Weights
    ``T · α`` (summing to T, as fixed weights do).
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        t = gram.shape[0]
        g = unit_scale(gram).cpu()  # T ≤ 10 small solves: on the host
        if g is None:  # no gradient at all: equal weights
            return torch.ones(t, dtype=gram.dtype, device=gram.device)
        best, best_value = None, float("inf")
        faces = range(1, 2**t) if t <= 10 else []
        for mask in faces:
            idx = [i for i in range(t) if mask >> i & 1]
            n = len(idx)
            kkt = torch.zeros(n + 1, n + 1, dtype=g.dtype)
            kkt[:n, :n] = g[idx][:, idx]
            kkt[:n, n] = kkt[n, :n] = 1.0
            rhs = torch.zeros(n + 1, dtype=g.dtype)
            rhs[n] = 1.0
            sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.squeeze(1)[:n]
            if bool((sol < -1e-9).any()):
                continue
            alpha = torch.zeros(t, dtype=g.dtype)
            alpha[idx] = sol.clamp_min(0) / sol.clamp_min(0).sum()
            value = float(alpha @ g @ alpha)
            if value < best_value * (1 - 1e-9):  # relative: the least may be ~1e-8
                best, best_value = alpha, value
        if best is None:
            best = self._frank_wolfe(g)
        return (t * best).to(gram.dtype).to(gram.device)

    @staticmethod
    def _frank_wolfe(g: torch.Tensor, iterations: int = 500) -> torch.Tensor:
        t = g.shape[0]
        alpha = torch.full((t,), 1.0 / t, dtype=g.dtype)
        for _ in range(iterations):
            grad = g @ alpha
            j = int(grad.argmin())
            vv, vj, jj = alpha @ grad, grad[j], g[j, j]
            den = vv - 2 * vj + jj
            gamma = torch.where(den > 0, (vv - vj) / torch.where(den > 0, den, 1.0), 0.0)
            gamma = gamma.clamp(0, 1)
            alpha = (1 - gamma) * alpha
            alpha[j] += gamma
        return alpha


class IMTLG(RepresentationBalancer):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the combination
    ``Σ_t α_t g_t`` (``Σ α = 1``) whose projections onto every unit task gradient ``u_t`` are
    equal: with ``D = [g_1 − g_t]_t`` and ``U = [u_1 − u_t]_t`` (t ≥ 2),
    ``α_{2:} = g_1 Uᵀ (D Uᵀ)⁻¹``, ``α_1 = 1 − Σ α_{2:}`` — inner products only, so from the Gram
    matrix. Weights ``T · α``; they can be negative for strongly conflicting tasks, as in the
    paper.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        t = gram.shape[0]
        g = unit_scale(gram)
        if t == 1 or g is None:
            return torch.ones(t, dtype=gram.dtype, device=gram.device)
        norm = g.diagonal().sqrt()
        if not bool((norm > 0).all()):  # a task without gradient has no direction u_t
            return torch.full((t,), torch.nan, dtype=gram.dtype, device=gram.device)
        gu = g / norm  # gu[a, b] = ⟨g_a, u_b⟩
        # rows of D: g_1 − g_i; of U: u_1 − u_j (i, j ≥ 2)
        du = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]  # [T−1, T−1]
        g1u = gu[0, 0] - gu[0, 1:]  # [T−1]
        rest, info = torch.linalg.solve_ex(du.t(), g1u)  # α_{2:} = g1u (DUᵀ)⁻¹
        if int(info) != 0:  # singular (parallel gradients): no solution, the weights stay
            return torch.full((t,), torch.nan, dtype=gram.dtype, device=gram.device)
        return (t * torch.cat([1 - rest.sum().unsqueeze(0), rest])).to(gram.dtype)


class AlignedMTL(RepresentationBalancer):
    """Aligned-MTL-UB (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023): align the task gradients' principal components so the linear system
    is well conditioned: with ``M = V Λ Vᵀ`` the Gram matrix (eigenvalues above tolerance),
    ``B = √λ_min · V Λ^{−1/2} Vᵀ`` and weights ``α = B 1`` (equal preferences). Orthogonal
    gradients of equal norm give weights 1.

    The rank tolerance is relative to the largest eigenvalue, ``rtol · λ_max``, and the
    eigendecomposition float64 (the paper's code: ``λ_max · T · eps`` of the float32 it runs in,
    ~4e-7 · λ_max). A task whose gradient is 1e4× the others' puts their eigenvalues at ~1e-8 ·
    λ_max: the float32 tolerance dropped them as rank deficiency and gave the small tasks weights
    ~0 (or slightly negative). ``rtol = 1e-10`` keeps components down to 1e-5 of the largest
    gradient's norm (float32 gradients are good to ~1e-7 of it, so what it drops is noise: two
    equal gradients stay one component). The weights are not clamped: for strongly conflicting
    tasks a weight can be negative (by up to ~10% of the largest on random conflicting
    gradients), which is the method's own answer, as in IMTL-G; at a pure scale gap they are
    all > 0 (the large task's ~1e-4, the others' O(1)).
    """

    rtol = 1e-10

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        t = gram.shape[0]
        g = unit_scale(gram)
        if g is None:
            return torch.ones(t, dtype=gram.dtype, device=gram.device)
        lam, vec = torch.linalg.eigh(g)
        keep = lam > lam.max() * self.rtol
        lam, vec = lam[keep], vec[:, keep]
        b = lam.min().sqrt() * (vec / lam.sqrt()) @ vec.t()
        return b.sum(0).to(gram.dtype)


def unit_scale(gram: torch.Tensor) -> torch.Tensor | None:
    """``gram`` in float64 divided by its largest diagonal entry (None when that is not > 0 or
    not finite: no task has a gradient)."""
    g = gram.double()
    top = g.diagonal().max()
    if not bool(torch.isfinite(top)) or not bool(top > 0):
        return None
    return g / top
