"""What every multi-task head is built from: :class:`Towers`, the :class:`ExpertWatch` probes,
:func:`task_expert_index` and the auxiliary-loss helpers.

The heads themselves are in :mod:`mtl_dist.models.heads` (SharedBottom, MoE) and
:mod:`mtl_dist.models.ple` (PLE, STEM); see :mod:`mtl_dist.models.heads` for what a head returns
and keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.models.experts import StackedMLP, dead_units
from mtl_dist.models.gates import GateConfig

__all__ = ["ExpertWatch", "Towers", "gate_aux_names", "stack_aux", "task_expert_index"]


def gate_aux_names(cfg: GateConfig) -> list[str]:
    """The auxiliary losses gates configured by ``cfg`` add (a head's ``aux_names``)."""
    return [
        n
        for n, c in (
            ("gate_entropy", cfg.entropy_coef),
            ("load_balance", cfg.load_balance_coef),
            ("dselect_entropy", cfg.dselect_entropy_coef if cfg.dselect_k else 0.0),
        )
        if c > 0
    ]


def stack_aux(
    names: list[str], parts: list[dict[str, torch.Tensor]], like: torch.Tensor
) -> torch.Tensor:
    """Sum each named auxiliary loss over ``parts`` (one dict per gate module) → ``[A]``."""
    if not names:
        return like.new_zeros(0)
    return torch.stack([sum(p[n] for p in parts if n in p) for n in names])


class ExpertWatch:
    """The dead-activation probe every head carries (see :mod:`mtl_dist.models.heads`)."""

    watch_experts: bool = False
    last_dead: dict[str, torch.Tensor]

    def _watch(self, expert_set: str, h: torch.Tensor, *groups) -> None:
        """Record ``dead_units(h, *groups)`` for ``expert_set`` when armed, in training."""
        if self.watch_experts and self.training:
            self.last_dead[expert_set] = dead_units(h, *groups)

    def _watched(self) -> None:
        """The armed forward is over: disarm."""
        if self.training:
            self.watch_experts = False

    keep_shared: bool = False  # set by a representation-gradient balancer
    last_shared: torch.Tensor | None = None

    def _share(self, z: torch.Tensor) -> None:
        """Keep ``z``, the representation every task's loss reaches through its own modules only
        (experts' or bottom's output), when a balancer asked for it, in training."""
        if self.keep_shared and self.training:
            self.last_shared = z


def task_expert_index(tasks: int, shared: int, per_task: int) -> torch.Tensor:
    """``[T, Es + Et]``: the experts task t mixes — the shared ones, then its own — as rows of an
    expert output ``[Es + T·Et, B, H]`` laid out shared first, then task by task."""
    return torch.tensor(
        [
            list(range(shared)) + [shared + t * per_task + j for j in range(per_task)]
            for t in range(tasks)
        ]
    )


def mix_selected(weights: torch.Tensor, experts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each task's mix of the experts it selects: ``[B, T, K]`` weights over the ``K`` experts
    ``index`` ``[T, K]`` names, of experts ``[E, B, H]`` → ``[T, B, H]``.

    The weights are scattered into ``[B, T, E]`` (zeros for the experts a task does not read)
    and mixed over all E in one einsum: gathering ``experts[index]`` instead materialises
    ``[T, K, B, H]`` and its backward is an accumulating index_put, a fifth of a PLE step
    (issue 28); the scatter touches only the small weight tensor.
    """
    b, t, k = weights.shape
    full = weights.new_zeros(b, t, experts.shape[0]).scatter(2, index.expand(b, t, k), weights)
    return torch.einsum("bte,ebh->tbh", full, experts)


class Towers(nn.Module):
    """T task towers as one :class:`StackedMLP`: ``[T, B, H]`` → ``[B, T]`` (logit or value)."""

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        hidden: list[int],
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.mlp = StackedMLP(
            num_tasks,
            in_dim,
            [*hidden, 1],
            activate_last=False,
            dropout=dropout,
            batch_norm=batch_norm,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1).t()
