"""Task towers that read other tasks' hidden outputs.

:class:`DependentTowers` — DBMTL: Wang et al., "Deep Bayesian Multi-Target Learning for
Recommender Systems", arXiv:1902.09154 (Alibaba, 2019). The joint probability of the targets is
factorised along the task graph, ``p(y_1, …, y_T | x) = Π_t p(y_t | y_parents(t), x)``, and each
factor is a network that reads the shared representation and its parent tasks' hidden layers.
Over a Shared-Bottom or MMoE representation (``model.dbmtl.base``), as in TorchEasyRec's DBMTL.
"""

from __future__ import annotations

from graphlib import TopologicalSorter

import torch
from torch import nn

from mtl_dist.models.experts import StackedMLP


class DependentTowers(nn.Module):
    """DBMTL's towers: ``[T, B, H]`` (each task's view of the shared representation) → ``[B, T]``.

    Per task t: a tower MLP gives ``h_t = tower_t(x_t)`` ``[B, Ht]`` (all tasks in one batched
    op); then, parents first, the relation MLP reads ``[h_t, r_p for p in parents(t)]`` and gives
    ``r_t`` ``[B, Hr]``, and a linear unit maps ``r_t`` to the task's logit (or value). A task
    without parents reads ``h_t`` alone. The parents' ``r_p`` carry their gradient: a child's loss
    trains its parents' towers too (the Bayesian factor ``p(y_t | y_parents, x)`` shares them).

    Args:
        num_tasks: T.
        in_dim: H, the width of each task's input.
        tower_hidden: the tower MLP's widths (≥ 1 layer; the last is Ht).
        relation_hidden: the relation MLP's widths (≥ 1 layer; the last is Hr).
        parents: ``{task: [parent tasks]}`` by task index (acyclic).

    Raises:
        ValueError: empty widths or an unknown task index.
        graphlib.CycleError: the parents form a cycle.

    Example::

        towers = DependentTowers(2, 16, [8], [4], {1: [0]})   # task 1 reads task 0
        towers(torch.randn(2, 5, 16)).shape                   # [5, 2]
    """

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        tower_hidden: list[int],
        relation_hidden: list[int],
        parents: dict[int, list[int]],
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if not tower_hidden or not relation_hidden:
            raise ValueError("DBMTL needs at least one tower and one relation layer")
        bad = [i for i in [*parents, *sum(parents.values(), [])] if not 0 <= i < num_tasks]
        if bad:
            raise ValueError(f"DBMTL parents name unknown task indices {bad}")
        self.num_tasks = num_tasks
        self.parents = {t: list(parents.get(t, [])) for t in range(num_tasks)}
        self.order = list(TopologicalSorter(self.parents).static_order())  # raises CycleError
        self.towers = StackedMLP(
            num_tasks, in_dim, tower_hidden, dropout=dropout, batch_norm=batch_norm
        )
        h, r = tower_hidden[-1], relation_hidden[-1]
        self.relations = nn.ModuleList()
        for t in range(num_tasks):
            layers: list[nn.Module] = []
            width = h + r * len(self.parents[t])
            for out in relation_hidden:
                layers += [nn.Linear(width, out), nn.ReLU()]
                width = out
            self.relations.append(nn.Sequential(*layers))
        self.outputs = StackedMLP(num_tasks, r, [1], activate_last=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.towers(x)  # [T, B, Ht]
        r: list[torch.Tensor | None] = [None] * self.num_tasks
        for t in self.order:
            r[t] = self.relations[t](torch.cat([h[t], *(r[p] for p in self.parents[t])], -1))
        return self.outputs(torch.stack(r)).squeeze(-1).t()  # [B, T]
