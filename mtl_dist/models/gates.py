"""Gates over experts: softmax (with temperature), top-k, noisy top-k, Gumbel straight-through,
DSelect-k, and the polarization cures (expert dropout, entropy regularisation, near-uniform
init).

G gates over E experts are computed together: one linear layer (or small MLP) gives all logits
``[B, G, E]``. Auxiliary losses come back separately (a dict) so the trainer adds and logs them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.config.model import GateConfig  # the [model.gate] section, read as is
from mtl_dist.models.experts import StackedMLP

__all__ = ["GateConfig", "Gates", "SelfGates", "expert_dropout", "smooth_step"]


class Gates(nn.Module):
    """G gates over E experts.

    Args:
        in_dim: gate input width Din.
        num_gates: G (tasks, or 1 for OMoE's single gate).
        num_experts: E.
        cfg: :class:`GateConfig`.

    The input is ``[B, Din]`` (shared by all gates) or ``[G, B, Din]`` (one per gate, as in PLE).

    ``forward`` returns weights ``[B, G, E]`` (rows sum to 1; zeros outside the top-k) and a dict
    of auxiliary losses (already scaled by their coefficients).

    Example::

        gates = Gates(in_dim=32, num_gates=2, num_experts=4, cfg=GateConfig(top_k=2))
        w, aux = gates(torch.randn(8, 32))   # [8, 2, 4], two non-zeros per row
    """

    def __init__(
        self,
        in_dim: int,
        num_gates: int,
        num_experts: int,
        cfg: GateConfig,
    ) -> None:
        super().__init__()
        if cfg.top_k < 0 or cfg.top_k > num_experts:
            raise ValueError(f"gate top_k={cfg.top_k} must lie in [0, {num_experts}]")
        self.num_gates = num_gates
        self.num_experts = num_experts
        self.cfg = cfg
        if cfg.dselect_k:  # per gate: k selectors' m code logits, then k selector logits
            self.code_bits = max(1, math.ceil(math.log2(num_experts)))
            widths = [*cfg.hidden, cfg.dselect_k * (self.code_bits + 1)]
            # all 2^m codes: a selector is a distribution over every code, used or not
            codes = (torch.arange(2**self.code_bits)[:, None] >> torch.arange(self.code_bits)) & 1
            self.register_buffer("codes", codes.bool(), persistent=False)  # [2^m, m]
        else:
            widths = [*cfg.hidden, num_experts]
        # all gates' logits at once: one StackedMLP with a group per gate
        self.logits = StackedMLP(num_gates, in_dim, widths, activate_last=False)
        self.noise = (
            StackedMLP(num_gates, in_dim, [num_experts], activate_last=False) if cfg.noisy else None
        )
        if cfg.uniform_init:
            with torch.no_grad():
                last_w, last_b = self.logits.weights[-1], self.logits.biases[-1]
                last_w.normal_(0.0, 1e-3)
                last_b.zero_()

    def forward(
        self, x: torch.Tensor, first: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x``: ``[B, Din]`` or ``[G, B, Din]``; ``first``: the logits MLP's layer-0
        pre-activation when a fused matmul computed it (see ``fused_first_layer``)."""
        logits = self.logits(x, first).transpose(0, 1)  # [B, G, E]
        cfg = self.cfg
        if self.noise is not None and self.training:
            std = F.softplus(self.noise(x).transpose(0, 1))
            logits = logits + torch.randn_like(logits) * std
        logits = logits / cfg.temperature
        aux: dict[str, torch.Tensor] = {}
        if cfg.dselect_k:
            weights, selectors = self.dselect(logits)
            probs = weights
            if cfg.dselect_entropy_coef > 0:
                p = selectors / selectors.sum(-1, keepdim=True).clamp_min(1e-9)
                entropy = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
                aux["dselect_entropy"] = cfg.dselect_entropy_coef * entropy
        elif cfg.gumbel:
            if self.training:
                weights = F.gumbel_softmax(logits, tau=1.0, hard=True, dim=-1)
            else:
                weights = F.one_hot(logits.argmax(-1), self.num_experts).to(logits.dtype)
            probs = torch.softmax(logits, -1)
        elif cfg.top_k and cfg.top_k < self.num_experts:
            top, idx = logits.topk(cfg.top_k, dim=-1)
            weights = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
            probs = torch.softmax(logits, -1)
        else:
            weights = probs = torch.softmax(logits, -1)
        if cfg.expert_dropout > 0 and self.training:
            weights = expert_dropout(weights, cfg.expert_dropout)
        if cfg.entropy_coef > 0:
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
            aux["gate_entropy"] = -cfg.entropy_coef * entropy  # minimising it raises entropy
        if cfg.load_balance_coef > 0:
            routed = (weights > 0).float().mean(0)  # [G, E] share of samples sent to each expert
            aux["load_balance"] = (
                cfg.load_balance_coef * self.num_experts * (routed * probs.mean(0)).sum(-1).mean()
            )
        return weights, aux

    def dselect(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DSelect-k (Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of
        Experts", NeurIPS 2021), per example: ``logits`` ``[B, G, k·(m+1)]`` → weights
        ``[B, G, E]`` and the k selectors' distributions ``[B, G, k, E]``.

        Selector i reads its m = ⌈log2 E⌉ code logits through the smooth step S (cubic on
        ``[-γ/2, γ/2]``, exactly 0 below and 1 above) and puts ``Π_j S(z_ij)^{b_j(e)}
        (1 − S(z_ij))^{1 − b_j(e)}`` on expert e (b(e): e's binary code); the gate mixes the
        selectors by a softmax of their own logits. Once a selector's logits leave
        ``[-γ/2, γ/2]`` it picks exactly one expert, so the gate ends with at most k non-zero
        weights while training stays differentiable.

        With E not a power of 2 the selector's distribution covers all 2^m codes (it sums to 1:
        ``Π_j (S + 1 − S)``) and the mass on the 2^m − E unused codes is shared equally among
        the E experts. So every selector's weights sum to 1 for every sample — also one
        saturated on an unused code (it then mixes all experts evenly), where dropping that
        mass and renormalising would leave 0/0 and zero gradient — and each unused code's
        probability keeps a gradient pointing to the experts that do better than the average.
        Near S = ½ every expert still gets 1/E. E = 1 (m = 1) puts weight 1 on the expert.
        """
        k, m, e = self.cfg.dselect_k, self.code_bits, self.num_experts
        z = logits[..., : k * m].unflatten(-1, (k, m))  # [B, G, k, m]
        s = smooth_step(z, self.cfg.dselect_gamma).unsqueeze(-2)  # [B, G, k, 1, m]
        codes = torch.where(self.codes, s, 1 - s).prod(-1)  # [B, G, k, 2^m], sums to 1
        selectors = codes[..., :e] + codes[..., e:].sum(-1, keepdim=True) / e  # [B, G, k, E]
        mix = torch.softmax(logits[..., k * m :], -1).unsqueeze(-1)  # [B, G, k, 1]
        weights = (mix * selectors).sum(-2)  # sums to 1 up to rounding: remove that
        return weights / weights.sum(-1, keepdim=True), selectors


class SelfGates(nn.Module):
    """HoME's self-gate (Wang et al. 2024, "HoME: Hierarchy of Multi-Gate Experts for
    Multi-Task Learning at Kuaishou"), against expert underfitting: a sparse task's softmax
    gate starves its own experts in favour of the shared ones that dense tasks train. Each task
    also weighs its own Et experts with independent sigmoids, ``σ(x_t W_t + b_t)`` ``[B, Et]``,
    and adds that mix to its softmax mix, so its own experts always receive its gradient.

    ``forward(x, own)``: ``x`` ``[B, Din]`` or ``[T, B, Din]`` (each task's gate input), ``own``
    ``[T, Et, B, H]`` (task t's own experts' outputs) → ``[T, B, H]``; :meth:`weights` gives
    the sigmoid weights ``[T, B, Et]`` it mixes with.

    Example::

        gate = SelfGates(in_dim=32, num_tasks=2, task_experts=2)
        gate(torch.randn(8, 32), torch.randn(2, 2, 8, 16)).shape   # [2, 8, 16]
    """

    def __init__(self, in_dim: int, num_tasks: int, task_experts: int) -> None:
        super().__init__()
        self.logits = StackedMLP(num_tasks, in_dim, [task_experts], activate_last=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each task's independent weights of its own experts: ``[T, B, Et]`` in (0, 1)."""
        return torch.sigmoid(self.logits(x))

    def forward(self, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        w = self.weights(x)  # [T, B, Et]
        # the heads' mix einsum, which export rewrites batch-free (serving._BatchedMixes)
        return torch.einsum("bte,tebh->tbh", w.transpose(0, 1), own)


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth step: 0 for ``t ≤ −γ/2``, 1 for ``t ≥ γ/2``, and
    ``−2t³/γ³ + 3t/(2γ) + 1/2`` between (continuously differentiable)."""
    cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic))


def expert_dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Mask each (sample, gate, expert) weight with probability ``p`` and renormalise.

    The YouTube cure for polarization: an expert a gate relies on is sometimes missing, so the
    gate must keep others useful. A row whose every selected expert was dropped keeps its weights.
    Every row sums to 1: a row whose kept mass is below 1e-12 (tiny softmax weights of a
    near-hard gate) keeps its weights too, since dividing by such a mass gives the backward
    a 1/mass² factor that overflows (inf / NaN gradients).
    """
    keep = (torch.rand_like(weights) >= p).to(weights.dtype)
    kept = weights * keep
    total = kept.sum(-1, keepdim=True)
    some = total > 1e-12
    return torch.where(some, kept / torch.where(some, total, 1.0), weights)
