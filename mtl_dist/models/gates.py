"""Per-task softmax gates over experts, all tasks' gate logits from one matmul."""

from __future__ import annotations

import torch
from torch import nn


class SoftmaxGates(nn.Module):
    """T gates over E experts: ``softmax(x @ W_t / temperature)`` for every task t at once.

    Args:
        in_dim: gate input width Din.
        num_tasks: T.
        num_experts: E.
        temperature: > 1 flattens the gates (a cure for early polarization), < 1 sharpens.

    Example::

        gates = SoftmaxGates(in_dim=32, num_tasks=2, num_experts=4)
        w = gates(torch.randn(8, 32))   # [8, 2, 4], rows sum to 1
    """

    def __init__(
        self, in_dim: int, num_tasks: int, num_experts: int, temperature: float = 1.0
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.temperature = temperature
        self.proj = nn.Linear(in_dim, num_tasks * num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, Din]``. Returns gate weights ``[B, T, E]``."""
        logits = self.proj(x).view(-1, self.num_tasks, self.num_experts)
        return torch.softmax(logits / self.temperature, dim=-1)
