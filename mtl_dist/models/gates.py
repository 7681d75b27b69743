"""Gates over experts: softmax (with temperature), top-k, noisy top-k, Gumbel straight-through,
and the polarization cures (expert dropout, entropy regularisation, near-uniform init).

G gates over E experts are computed together: one linear layer (or small MLP) gives all logits
``[B, G, E]``. Auxiliary losses come back separately (a dict) so the trainer adds and logs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.models.experts import StackedMLP


@dataclass
class GateConfig:
    """Gate options shared by every head (mirrors ``ModelConfig``'s gate keys)."""

    temperature: float = 1.0
    hidden: tuple[int, ...] = ()
    top_k: int = 0  # 0: dense softmax over all experts
    noisy: bool = False
    gumbel: bool = False
    expert_dropout: float = 0.0
    entropy_coef: float = 0.0
    load_balance_coef: float = 0.0
    uniform_init: bool = False


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
        if cfg.gumbel:
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


def expert_dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Mask each (sample, gate, expert) weight with probability ``p`` and renormalise.

    The YouTube cure for polarization: an expert a gate relies on is sometimes missing, so the
    gate must keep others useful. A row whose every selected expert was dropped keeps its weights.
    """
    keep = (torch.rand_like(weights) >= p).to(weights.dtype)
    kept = weights * keep
    total = kept.sum(-1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(1e-12), weights)
