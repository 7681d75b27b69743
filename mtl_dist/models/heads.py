"""Multi-task heads: from the shared input ``[B, Din]`` to one output per task ``[B, T]``."""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.models.experts import StackedMLP
from mtl_dist.models.gates import SoftmaxGates


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    E experts run as one :class:`StackedMLP`; each task's softmax gate mixes them (one einsum for
    all tasks), and T towers — also one StackedMLP — map each task's mix to a logit or value.

    Args:
        in_dim: Din.
        num_tasks: T.
        num_experts: E.
        expert_hidden: expert widths; the last is H.
        tower_hidden: tower widths before the output unit.
        gate_temperature: softmax temperature.

    Example::

        head = MMoE(in_dim=32, num_tasks=3, num_experts=4, expert_hidden=[64, 16], tower_hidden=[8])
        out, gates = head(torch.randn(5, 32))   # out [5, 3], gates [5, 3, 4]
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_experts: int,
        expert_hidden: list[int],
        tower_hidden: list[int],
        gate_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.experts = StackedMLP(num_experts, in_dim, expert_hidden)
        self.gates = SoftmaxGates(in_dim, num_tasks, num_experts, gate_temperature)
        self.towers = StackedMLP(
            num_tasks, expert_hidden[-1], [*tower_hidden, 1], activate_last=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[B, Din]``. Returns task outputs ``[B, T]`` and gate weights ``[B, T, E]``."""
        experts = self.experts(x)  # [E, B, H]
        gates = self.gates(x)  # [B, T, E]
        mixed = torch.einsum("bte,ebh->tbh", gates, experts)  # [T, B, H]
        out = self.towers(mixed).squeeze(-1).t()  # [B, T]
        return out, gates
