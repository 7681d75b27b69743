"""Multi-task heads: from the shared input ``[B, Din]`` to one output per task ``[B, T]``.

Every head returns ``(outputs [B, T], aux [A])``: task logits (binary) or values (regression),
and its auxiliary losses stacked in the order of ``head.aux_names`` (empty when none is on). The
gate weights of the last forward are kept in ``head.last_gates`` (``{name: [B, E]}``) for
monitoring, at no extra cost; ``head.gate_experts`` maps each gate to its expert set and the
set's expert ids it mixes (``{name: (set, [ids])}``), and ``head.shared_parameters()`` are the
parameters every task trains (for the gradient-conflict probe). ``head.compute_dtype`` (see
:func:`mtl_dist.loop.precision.set_head_precision`) runs the head under autocast; outputs and aux
come back float32. Set ``head.watch_experts`` and
the next training forward keeps, per expert set, the share of each expert's output units that
are 0 on the whole batch (``head.last_dead``: ``{set: [E]}``, see
:func:`mtl_dist.models.experts.dead_units`) — from the activations it computes anyway.

Heads: :class:`SharedBottom`, :class:`MoE` (MMoE, or OMoE with one shared gate), :class:`PLE`
(CGC with one level) and :class:`STEM`. SharedBottom and MoE take other ``towers`` (DBMTL's
:class:`~mtl_dist.models.dependent.DependentTowers`). Experts and towers are
:class:`StackedMLP` s: one batched op per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.models.experts import (
    PLAIN_EXPERTS,
    ExpertStyle,
    StackedMLP,
    dead_units,
    fused_first_layer,
)
from mtl_dist.models.gates import GateConfig, Gates, SelfGates
from mtl_dist.models.precision import in_precision


def _aux_names(cfg: GateConfig) -> list[str]:
    return [
        n
        for n, c in (
            ("gate_entropy", cfg.entropy_coef),
            ("load_balance", cfg.load_balance_coef),
            ("dselect_entropy", cfg.dselect_entropy_coef if cfg.dselect_k else 0.0),
        )
        if c > 0
    ]


def _stack_aux(
    names: list[str], parts: list[dict[str, torch.Tensor]], like: torch.Tensor
) -> torch.Tensor:
    """Sum each named auxiliary loss over ``parts`` (one dict per gate module) → ``[A]``."""
    if not names:
        return like.new_zeros(0)
    return torch.stack([sum(p[n] for p in parts if n in p) for n in names])


class ExpertWatch:
    """The dead-activation probe every head carries (see the module docstring)."""

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


class SharedBottom(ExpertWatch, nn.Module):
    """One shared MLP, one tower per task.

    Example::

        head = SharedBottom(in_dim=32, num_tasks=2, bottom_hidden=[64, 16], tower_hidden=[8])
        out, aux = head(torch.randn(5, 32))   # [5, 2], []
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
        self.last_gates: dict[str, torch.Tensor] = {}
        self.gate_experts: dict[str, tuple[str, list[int]]] = {}
        self.last_dead: dict[str, torch.Tensor] = {}

    def shared_layer(self) -> torch.Tensor:
        """The last layer every task reads (GradNorm measures task gradients on it)."""
        return self.bottom.weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    @in_precision
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.bottom(x)  # [1, B, H]
        self._share(shared)
        return self.towers(shared.expand(self.num_tasks, -1, -1)), x.new_zeros(0)


class MoE(ExpertWatch, nn.Module):
    """MMoE (one gate per task; Ma et al., KDD 2018) or OMoE (``shared_gate=True``: one gate).

    E experts run as one StackedMLP whose first layer shares one matmul with the gates' logits;
    the per-task mix is one einsum ``[B,T,E] × [E,B,H]``. With top-k gating the experts run only
    on the rows some task routed to them (sparse dispatch: one grouped GEMM per layer), unless
    more than ``sparse_max_fraction`` of the (sample, expert) pairs are selected, where a dense
    compute with zeroed weights is faster; ``last_dispatch`` says which ran (``dense``,
    ``sparse/grouped_mm`` or ``sparse/loop`` where the device has no grouped GEMM).

    Example::

        head = MoE(in_dim=32, task_names=["click", "conv", "watch"], num_experts=4,
                   expert_hidden=[64, 16], tower_hidden=[8])
        out, aux = head(torch.randn(5, 32))   # out [5, 3]; head.last_gates["click"]: [5, 4]
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
        self.aux_names = _aux_names(gate)
        self.sparse = 0 < gate.top_k < num_experts or gate.gumbel
        self.last_gates: dict[str, torch.Tensor] = {}
        self.gate_experts = {t: ("experts", list(range(num_experts))) for t in self.task_names}
        self.last_dispatch = "dense"
        self.last_dead: dict[str, torch.Tensor] = {}

    def shared_layer(self) -> torch.Tensor:
        """The experts' last layer ``[E, H', H]``, shared by every task's mix."""
        return self.experts.weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    @in_precision
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts = None
        if self.sparse:  # gates first: they decide which experts run on which rows
            weights, aux = self.gates(x)  # [B, G, E]
        else:  # experts' first layer and the gate logits: one matmul
            first_e, first_g = fused_first_layer(x, [self.experts, self.gates.logits])
            weights, aux = self.gates(x, first_g)
            experts = self.experts(x, first_e)  # [E, B, H]
        self.last_gates = {
            t: weights[:, 0 if self.shared_gate else i].detach()
            for i, t in enumerate(self.task_names)
        }
        mixed = None
        if self.sparse:
            selected = (weights > 0).any(1)  # [B, E]
            if selected.float().mean().item() <= self.sparse_max_fraction:
                mixed = self._sparse_mix(x, weights, selected)
                self.last_dispatch = f"sparse/{self.experts.last_grouped}"
        if mixed is None:
            experts = self.experts(x) if experts is None else experts
            self._watch("experts", experts)
            self._share(experts)
            mixed = torch.einsum("bge,ebh->gbh", weights, experts)  # [G, B, H]
            self.last_dispatch = "dense"
        self._watched()
        if self.shared_gate:  # OMoE: one mix, read by every tower
            mixed = mixed.expand(self.num_tasks, -1, -1)
        return self.towers(mixed), _stack_aux(self.aux_names, [aux], x)

    def _sparse_mix(
        self, x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
    ) -> torch.Tensor:
        """Each expert on its routed rows only, weighted results scattered back: ``[G, B, H]``.

        ``weights`` ``[B, G, E]``, ``selected`` ``[B, E]`` (some gate routed row b to expert e).
        """
        expert, row = selected.t().nonzero(as_tuple=True)  # [N] pairs, sorted by expert
        h = self.experts.forward_grouped(x.index_select(0, row), expert)  # [N, H]
        self._share(h)
        self._watch("experts", h, expert, self.experts.groups)
        w = weights[row, :, expert]  # [N, G]
        mixed = x.new_zeros(x.shape[0], weights.shape[1], h.shape[1])
        mixed = mixed.index_add(0, row, w.unsqueeze(-1) * h.unsqueeze(1))  # [B, G, H]
        return mixed.transpose(0, 1)


class PLE(ExpertWatch, nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); one level is CGC.

    Each level has ``shared_experts`` shared and ``task_experts`` per-task experts, all run as one
    StackedMLP (a group per expert, each reading its own input). Task t's gate mixes its own
    experts with the shared ones; every level but the last has a shared gate over all experts that
    feeds the next level's shared input.

    Example::

        head = PLE(32, ["a", "b"], levels=2, shared_experts=2, task_experts=1,
                   expert_hidden=[16], tower_hidden=[8])
        out, aux = head(torch.randn(5, 32))   # [5, 2]
    """

    def __init__(
        self,
        in_dim: int,
        task_names: list[str],
        levels: int,
        shared_experts: int,
        task_experts: int,
        expert_hidden: list[int],
        tower_hidden: list[int],
        gate: GateConfig | None = None,
        tower_dropout: float = 0.0,
        tower_batch_norm: bool = False,
        style: ExpertStyle = PLAIN_EXPERTS,
        self_gate: bool = False,
    ) -> None:
        super().__init__()
        gate = gate or GateConfig()
        self.task_names = list(task_names)
        T, Es, Et = len(task_names), shared_experts, task_experts
        self.num_tasks, self.shared_experts, self.task_experts = T, Es, Et
        if self_gate and not Et:
            raise ValueError("the self-gate mixes each task's own experts: task_experts is 0")
        self.levels = nn.ModuleList()
        dim = in_dim
        for level in range(levels):
            mods = nn.ModuleDict(
                {
                    "experts": StackedMLP(Es + T * Et, dim, expert_hidden, **style.kwargs()),
                    "task_gates": Gates(dim, T, Es + Et, gate),
                }
            )
            if self_gate:
                mods["self_gates"] = SelfGates(dim, T, Et)
            if level < levels - 1:
                mods["shared_gate"] = Gates(dim, 1, Es + T * Et, gate)
            self.levels.append(mods)
            dim = expert_hidden[-1]
        self.register_buffer("task_index", task_expert_index(T, Es, Et), persistent=False)
        self.towers = Towers(T, dim, tower_hidden, tower_dropout, tower_batch_norm)
        self.aux_names = _aux_names(gate)
        self.last_gates: dict[str, torch.Tensor] = {}
        self.last_dead: dict[str, torch.Tensor] = {}
        self.gate_experts = {}
        for level in range(levels):
            for i, t in enumerate(self.task_names):
                self.gate_experts[f"{t}/level{level}"] = (
                    f"level{level}",
                    self.task_index[i].tolist(),
                )
            if level < levels - 1:
                self.gate_experts[f"shared/level{level}"] = (
                    f"level{level}",
                    list(range(Es + T * Et)),
                )

    def shared_layer(self) -> torch.Tensor:
        """The last level's experts' last layer (shared experts first)."""
        return self.levels[-1]["experts"].weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for mods in self.levels for p in mods["experts"].parameters()]

    @in_precision
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Es, Et = self.shared_experts, self.task_experts
        task_in, shared_in = x, x  # level 0: every expert and gate reads x ([B, Din])
        auxes, gates = [], {}
        for level, mods in enumerate(self.levels):
            first: list[torch.Tensor | None] = [None, None, None]  # experts, task / shared gates
            if task_in.dim() == 2:  # level 0: all experts and gates read x, one first matmul
                readers = [mods["experts"], mods["task_gates"].logits]
                if "shared_gate" in mods:
                    readers.append(mods["shared_gate"].logits)
                first[: len(readers)] = fused_first_layer(task_in, readers)
                out = mods["experts"](task_in, first[0])  # [G, B, H]
            else:  # shared experts read the shared input, task t's experts read task t's
                inputs = torch.cat([shared_in.expand(Es, -1, -1), task_in.repeat_interleave(Et, 0)])
                out = mods["experts"](inputs)
            self._watch(f"level{level}", out)
            self._share(out)  # the last level's stays
            w, aux = mods["task_gates"](task_in, first[1])  # [B, T, Es+Et]
            auxes.append(aux)
            next_task = torch.einsum("bte,tebh->tbh", w, out[self.task_index])  # [T, B, H]
            if "self_gates" in mods:  # + each task's own experts, sigmoid-weighted
                own = out[Es:].unflatten(0, (self.num_tasks, Et))  # [T, Et, B, H]
                next_task = next_task + mods["self_gates"](task_in, own)
            for i, t in enumerate(self.task_names):
                gates[f"{t}/level{level}"] = w[:, i].detach()
            if "shared_gate" in mods:
                ws, aux = mods["shared_gate"](
                    shared_in if shared_in.dim() == 2 else shared_in[0], first[2]
                )
                auxes.append(aux)
                gates[f"shared/level{level}"] = ws[:, 0].detach()
                shared_in = torch.einsum("be,ebh->bh", ws[:, 0], out).unsqueeze(0)  # [1, B, H]
            task_in = next_task
        self._watched()
        self.last_gates = gates
        return self.towers(task_in), _stack_aux(self.aux_names, auxes, x)


class STEM(ExpertWatch, nn.Module):
    """Shared and task-specific embeddings (Su et al., AAAI 2024: "all forward, task-specific backward").

    Every task has its own embedding tables beside the shared ones (``own`` ``[T, B, Dt]``, looked
    up by the ranker). Task t's experts and gate read ``[x, e_1 … e_T]`` where every other task's
    embedding has its gradient stopped, so task t's loss trains only its own and the shared tables.
    Shared experts read the shared input x; the gate mixes shared and task t's experts.

    Example::

        head = STEM(32, 4, ["a", "b"], shared_experts=1, task_experts=1, expert_hidden=[16],
                    tower_hidden=[8])
        out, aux = head(torch.randn(5, 32), torch.randn(2, 5, 4))   # [5, 2]
    """

    def __init__(
        self,
        in_dim: int,
        task_dim: int,
        task_names: list[str],
        shared_experts: int,
        task_experts: int,
        expert_hidden: list[int],
        tower_hidden: list[int],
        gate: GateConfig | None = None,
        tower_dropout: float = 0.0,
        tower_batch_norm: bool = False,
        style: ExpertStyle = PLAIN_EXPERTS,
        self_gate: bool = False,
    ) -> None:
        super().__init__()
        gate = gate or GateConfig()
        self.task_names = list(task_names)
        T, Es, Et = len(task_names), shared_experts, task_experts
        self.task_experts = Et
        z_dim = in_dim + T * task_dim
        self.shared = StackedMLP(Es, in_dim, expert_hidden, **style.kwargs()) if Es else None
        self.task = StackedMLP(T * Et, z_dim, expert_hidden, **style.kwargs())
        self.gates = Gates(z_dim, T, Es + Et, gate)
        self.self_gates = SelfGates(z_dim, T, Et) if self_gate else None
        self.towers = Towers(T, expert_hidden[-1], tower_hidden, tower_dropout, tower_batch_norm)
        self.register_buffer("task_index", task_expert_index(T, Es, Et), persistent=False)
        self.register_buffer("own_mask", torch.eye(T).view(T, T, 1, 1), persistent=False)
        self.aux_names = _aux_names(gate)
        self.last_gates: dict[str, torch.Tensor] = {}
        self.last_dead: dict[str, torch.Tensor] = {}
        self.gate_experts = {
            t: ("experts", self.task_index[i].tolist()) for i, t in enumerate(self.task_names)
        }

    def shared_layer(self) -> torch.Tensor:
        """The shared experts' last layer (the task experts' when there are none)."""
        return (self.shared or self.task).weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list((self.shared or self.task).parameters())

    @in_precision
    def forward(self, x: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: shared input ``[B, Din]``; ``own``: task embeddings ``[T, B, Dt]``."""
        T = own.shape[0]
        stopped = own.detach()
        # every[t, s] = e_s in value; the gradient reaches e_s only from task s (t == s)
        every = stopped.unsqueeze(0) + self.own_mask * (own - stopped).unsqueeze(0)  # [T, T, B, Dt]
        # z_t = [x, e_1 … e_T]: [T, B, Din + T·Dt] (concatenated, not reshaped: no batch-size test)
        z = torch.cat([x.expand(T, -1, -1), *every.unbind(1)], -1)
        task_out = self.task(z.repeat_interleave(self.task_experts, 0))  # [T*Et, B, H]
        out = task_out if self.shared is None else torch.cat([self.shared(x), task_out])
        self._watch("experts", out)
        self._share(out)
        self._watched()
        w, aux = self.gates(z)  # [B, T, Es+Et], gate t reads z_t
        self.last_gates = {t: w[:, i].detach() for i, t in enumerate(self.task_names)}
        mixed = torch.einsum("bte,tebh->tbh", w, out[self.task_index])
        if self.self_gates is not None:  # + each task's own experts, sigmoid-weighted
            mixed = mixed + self.self_gates(z, task_out.unflatten(0, (T, self.task_experts)))
        return self.towers(mixed), _stack_aux(self.aux_names, [aux], x)
