"""Multi-task heads: from the shared input ``[B, Din]`` to one output per task ``[B, T]``.

Every head's ``forward(x [B, Din], probes=NO_PROBES)`` returns a
:class:`~mtl_dist.models.outputs.HeadOutput`: ``logits [B, T]`` (task logits, or values for
regression tasks), ``aux [A]`` (its auxiliary losses stacked in the order of
``head.aux_names``; empty when none is on) and the extras ``probes``
(:class:`~mtl_dist.models.outputs.Probes`) asks for, None otherwise: the gate weights
``gates`` (``{name: [B, E]}``, detached, at no extra cost), per expert set the share of each
expert's output units that are 0 on the whole batch (``dead``: ``{set: [E]}``, see
:func:`mtl_dist.models.experts.dead_units`; training only, from the activations the forward
computes anyway) and the ``shared`` representation (training only). ``head.gate_experts`` maps
each gate to its expert set and the set's expert ids it mixes (``{name: (set, [ids])}``), and
``head.shared_parameters()`` are the parameters every task trains (for the gradient-conflict
probe). ``head.compute_dtype`` (see :func:`mtl_dist.loop.precision.set_head_precision`) runs the
head under autocast; logits and aux come back float32.

Heads: :class:`SharedBottom`, :class:`MoE` (MMoE, or OMoE with one shared gate), and in
:mod:`mtl_dist.models.ple` :class:`PLE` (CGC with one level) and :class:`STEM`; the pieces they
share (towers, the expert probes) are in :mod:`mtl_dist.models.head_parts`. SharedBottom and MoE
take other ``towers`` (DBMTL's :class:`~mtl_dist.models.dependent.DependentTowers`). Experts and
towers are :class:`StackedMLP` s: one batched op per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.models.experts import PLAIN_EXPERTS, ExpertStyle, StackedMLP, fused_first_layer
from mtl_dist.models.gates import GateConfig, Gates
from mtl_dist.models.head_parts import (
    ExpertWatch,
    Probe,
    Towers,
    gate_aux_names,
    in_precision,
    stack_aux,
    task_expert_index,
)
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes
from mtl_dist.models.ple import PLE, STEM

# the old path of what moved stays: imports, and exported models pickled as mtl_dist.models.heads.PLE
__all__ = [
    "PLE", "STEM", "ExpertWatch", "MoE", "SharedBottom", "Towers", "task_expert_index",
]  # fmt: skip


class SharedBottom(ExpertWatch, nn.Module):
    """One shared MLP, one tower per task.

    Example::

        head = SharedBottom(in_dim=32, num_tasks=2, bottom_hidden=[64, 16], tower_hidden=[8])
        out, aux, *_ = head(torch.randn(5, 32))   # [5, 2], []
    """

    aux_names: list[str] = []

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        bottom_hidden: list[int],
        tower_hidden: list[int],
        tower_dropout: float = 0.0,
        tower_batch_norm: bool = False,
        style: ExpertStyle = PLAIN_EXPERTS,
        towers: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.bottom = StackedMLP(1, in_dim, bottom_hidden, **style.kwargs())
        self.towers = towers or Towers(
            num_tasks, bottom_hidden[-1], tower_hidden, tower_dropout, tower_batch_norm
        )
        self.gate_experts: dict[str, tuple[str, list[int]]] = {}

    def shared_layer(self) -> torch.Tensor:
        """The last layer every task reads (GradNorm measures task gradients on it)."""
        return self.bottom.weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    @in_precision
    def forward(self, x: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        probe = Probe(probes, self.training)
        shared = self.bottom(x)  # [1, B, H]
        probe.share(shared)
        return probe.output(self.towers(shared.expand(self.num_tasks, -1, -1)), x.new_zeros(0))


class MoE(ExpertWatch, nn.Module):
    """MMoE (one gate per task; Ma et al., KDD 2018) or OMoE (``shared_gate=True``: one gate).

    E experts run as one StackedMLP whose first layer shares one matmul with the gates' logits;
    the per-task mix is one einsum ``[B,T,E] × [E,B,H]``. With top-k gating the experts run only
    on the rows some task routed to them (sparse dispatch: one grouped GEMM per layer), unless
    more than ``sparse_max_fraction`` of the (sample, expert) pairs are selected, where a dense
    compute with zeroed weights is faster; :meth:`dispatch` says which runs on a batch
    (``dense``, ``sparse/grouped_mm`` or ``sparse/loop`` where the device has no grouped GEMM).

    Example::

        head = MoE(in_dim=32, task_names=["click", "conv", "watch"], num_experts=4,
                   expert_hidden=[64, 16], tower_hidden=[8])
        out = head(torch.randn(5, 32), Probes(gates=True))
        out.logits.shape, out.gates["click"].shape   # [5, 3], [5, 4]
    """

    def __init__(
        self,
        in_dim: int,
        task_names: list[str],
        num_experts: int,
        expert_hidden: list[int],
        tower_hidden: list[int],
        gate: GateConfig | None = None,
        shared_gate: bool = False,
        tower_dropout: float = 0.0,
        tower_batch_norm: bool = False,
        sparse_max_fraction: float = 0.5,
        style: ExpertStyle = PLAIN_EXPERTS,
        towers: nn.Module | None = None,
    ) -> None:
        super().__init__()
        gate = gate or GateConfig()
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.shared_gate = shared_gate
        self.sparse_max_fraction = sparse_max_fraction
        self.experts = StackedMLP(num_experts, in_dim, expert_hidden, **style.kwargs())
        self.gates = Gates(in_dim, 1 if shared_gate else self.num_tasks, num_experts, gate)
        self.towers = towers or Towers(
            self.num_tasks, expert_hidden[-1], tower_hidden, tower_dropout, tower_batch_norm
        )
        self.aux_names = gate_aux_names(gate)
        self.sparse = 0 < gate.top_k < num_experts or gate.gumbel
        self.gate_experts = {t: ("experts", list(range(num_experts))) for t in self.task_names}

    def shared_layer(self) -> torch.Tensor:
        """The experts' last layer ``[E, H', H]``, shared by every task's mix."""
        return self.experts.weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    @in_precision
    def forward(self, x: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        probe = Probe(probes, self.training)
        experts = None
        if self.sparse:  # gates first: they decide which experts run on which rows
            weights, aux = self.gates(x)  # [B, G, E]
        else:  # experts' first layer and the gate logits: one matmul
            first_e, first_g = fused_first_layer(x, [self.experts, self.gates.logits])
            weights, aux = self.gates(x, first_g)
            experts = self.experts(x, first_e)  # [E, B, H]
        for i, t in enumerate(self.task_names):
            probe.gate(t, weights[:, 0 if self.shared_gate else i])
        if self.sparse and self._routes_sparse(weights):
            mixed = self._sparse_mix(x, weights, (weights > 0).any(1), probe)
        else:
            experts = self.experts(x) if experts is None else experts
            probe.watch("experts", experts)
            probe.share(experts)
            mixed = torch.einsum("bge,ebh->gbh", weights, experts)  # [G, B, H]
        if self.shared_gate:  # OMoE: one mix, read by every tower
            mixed = mixed.expand(self.num_tasks, -1, -1)
        return probe.output(self.towers(mixed), stack_aux(self.aux_names, [aux], x))

    def _routes_sparse(self, weights: torch.Tensor) -> bool:
        """Whether the gates' ``weights`` ``[B, G, E]`` select few enough (sample, expert)
        pairs (at most ``sparse_max_fraction``) for the sparse dispatch to pay."""
        return (weights > 0).any(1).float().mean().item() <= self.sparse_max_fraction

    @torch.no_grad()
    def dispatch(self, x: torch.Tensor) -> str:
        """What :meth:`forward` runs on ``x`` ``[B, Din]`` (the gates' routing decides, so the
        answer holds for this batch, and for a stochastic gate this draw):
        ``dense``, ``sparse/grouped_mm`` or ``sparse/loop``."""
        if self.sparse and self._routes_sparse(self.gates(x)[0]):
            return f"sparse/{self.experts.grouped_kernel(x)}"
        return "dense"

    def _sparse_mix(
        self, x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, probe: Probe
    ) -> torch.Tensor:
        """Each expert on its routed rows only, weighted results scattered back: ``[G, B, H]``.

        ``weights`` ``[B, G, E]``, ``selected`` ``[B, E]`` (some gate routed row b to expert e).
        """
        expert, row = selected.t().nonzero(as_tuple=True)  # [N] pairs, sorted by expert
        h = self.experts.forward_grouped(x.index_select(0, row), expert)  # [N, H]
        probe.share(h)
        probe.watch("experts", h, expert, self.experts.groups)
        w = weights[row, :, expert]  # [N, G]
        mixed = x.new_zeros(x.shape[0], weights.shape[1], h.shape[1])
        mixed = mixed.index_add(0, row, w.unsqueeze(-1) * h.unsqueeze(1))  # [B, G, H]
        return mixed.transpose(0, 1)
