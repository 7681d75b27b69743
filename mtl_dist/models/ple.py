"""The heads with shared and task-specific experts: :class:`PLE` (CGC with one level) and
:class:`STEM`. What a head returns: see :mod:`mtl_dist.models.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mtl_dist.models.experts import PLAIN_EXPERTS, ExpertStyle, StackedMLP, fused_first_layer
from mtl_dist.models.gates import GateConfig, Gates, SelfGates
from mtl_dist.models.head_parts import (
    ExpertWatch,
    Probe,
    Towers,
    gate_aux_names,
    in_precision,
    mix_selected,
    stack_aux,
    task_expert_index,
)
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes

__all__ = ["PLE", "STEM", "MixedExperts"]


@dataclass(frozen=True)
class MixedExperts:
    """What PLE and STEM are both built from: ``shared_experts`` (Es) shared and
    ``task_experts`` (Et) per-task experts of widths ``expert_hidden`` (their style and, with
    ``self_gate``, HoME's self-gates on each task's own experts), the gates over them (``gate``)
    and the towers (``tower_hidden``, ``tower_dropout``, ``tower_batch_norm``).

    Example::

        MixedExperts(shared_experts=2, task_experts=1, expert_hidden=[16], tower_hidden=[8])
    """

    shared_experts: int
    task_experts: int
    expert_hidden: list[int]
    tower_hidden: list[int]
    gate: GateConfig = field(default_factory=GateConfig)
    tower_dropout: float = 0.0
    tower_batch_norm: bool = False
    style: ExpertStyle = PLAIN_EXPERTS
    self_gate: bool = False


def _start(head: ExpertWatch, task_names: list[str], mix: MixedExperts) -> None:
    """What PLE's and STEM's constructors begin with (after ``nn.Module``'s): the task names
    and the aux names of the gates."""
    head.task_names = list(task_names)
    head.aux_names = gate_aux_names(mix.gate)


def _finish(head: nn.Module, mix: MixedExperts, dim: int) -> None:
    """What they end with, once the experts are built: ``task_index`` (which experts task t
    mixes) and the towers on the ``dim``-wide mixes."""
    T = len(head.task_names)
    index = task_expert_index(T, mix.shared_experts, mix.task_experts)
    head.register_buffer("task_index", index, persistent=False)
    head.towers = Towers(T, dim, mix.tower_hidden, mix.tower_dropout, mix.tower_batch_norm)


class PLE(ExpertWatch, nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); one level is CGC.

    Each level has ``shared_experts`` shared and ``task_experts`` per-task experts, all run as one
    StackedMLP (a group per expert, each reading its own input). Task t's gate mixes its own
    experts with the shared ones; every level but the last has a shared gate over all experts that
    feeds the next level's shared input.

    Example::

        mix = MixedExperts(shared_experts=2, task_experts=1, expert_hidden=[16], tower_hidden=[8])
        head = PLE(32, ["a", "b"], levels=2, experts=mix)
        out = head(torch.randn(5, 32))   # HeadOutput: logits [5, 2], aux [0]
    """

    def __init__(
        self, in_dim: int, task_names: list[str], levels: int, experts: MixedExperts
    ) -> None:
        super().__init__()
        _start(self, task_names, experts)
        gate, style, expert_hidden = experts.gate, experts.style, experts.expert_hidden
        self_gate = experts.self_gate
        T, Es, Et = len(task_names), experts.shared_experts, experts.task_experts
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
        _finish(self, experts, dim)
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
    def forward(self, x: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        probe = Probe(probes, self.training)
        Es, Et = self.shared_experts, self.task_experts
        task_in, shared_in = x, x  # level 0: every expert and gate reads x ([B, Din])
        auxes = []
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
            probe.watch(f"level{level}", out)
            probe.share(out)  # the last level's stays
            w, aux = mods["task_gates"](task_in, first[1])  # [B, T, Es+Et]
            auxes.append(aux)
            next_task = mix_selected(w, out, self.task_index)  # [T, B, H]
            if "self_gates" in mods:  # + each task's own experts, sigmoid-weighted
                own = out[Es:].unflatten(0, (self.num_tasks, Et))  # [T, Et, B, H]
                next_task = next_task + mods["self_gates"](task_in, own)
            for i, t in enumerate(self.task_names):
                probe.gate(f"{t}/level{level}", w[:, i])
            if "shared_gate" in mods:
                ws, aux = mods["shared_gate"](
                    shared_in if shared_in.dim() == 2 else shared_in[0], first[2]
                )
                auxes.append(aux)
                probe.gate(f"shared/level{level}", ws[:, 0])
                shared_in = torch.einsum("be,ebh->bh", ws[:, 0], out).unsqueeze(0)  # [1, B, H]
            task_in = next_task
        return probe.output(self.towers(task_in), stack_aux(self.aux_names, auxes, x))


class STEM(ExpertWatch, nn.Module):
    """Shared and task-specific embeddings (Su et al., AAAI 2024: "all forward, task-specific backward").

    Every task has its own embedding tables beside the shared ones (``own`` ``[T, B, Dt]``, looked
    up by the ranker). Task t's experts and gate read ``[x, e_1 … e_T]`` where every other task's
    embedding has its gradient stopped, so task t's loss trains only its own and the shared tables.
    Shared experts read the shared input x; the gate mixes shared and task t's experts.

    Example::

        mix = MixedExperts(shared_experts=1, task_experts=1, expert_hidden=[16], tower_hidden=[8])
        head = STEM(32, 4, ["a", "b"], experts=mix)
        out = head(torch.randn(5, 32), torch.randn(2, 5, 4))   # logits [5, 2]
    """

    def __init__(
        self, in_dim: int, task_dim: int, task_names: list[str], experts: MixedExperts
    ) -> None:
        super().__init__()
        _start(self, task_names, experts)
        gate, style, expert_hidden = experts.gate, experts.style, experts.expert_hidden
        T, Es, Et = len(task_names), experts.shared_experts, experts.task_experts
        self.task_experts = Et
        z_dim = in_dim + T * task_dim
        self.shared = StackedMLP(Es, in_dim, expert_hidden, **style.kwargs()) if Es else None
        self.task = StackedMLP(T * Et, z_dim, expert_hidden, **style.kwargs())
        self.gates = Gates(z_dim, T, Es + Et, gate)
        self.self_gates = SelfGates(z_dim, T, Et) if experts.self_gate else None
        _finish(self, experts, expert_hidden[-1])
        self.register_buffer("own_mask", torch.eye(T).view(T, T, 1, 1), persistent=False)
        self.gate_experts = {
            t: ("experts", self.task_index[i].tolist()) for i, t in enumerate(self.task_names)
        }

    def shared_layer(self) -> torch.Tensor:
        """The shared experts' last layer (the task experts' when there are none)."""
        return (self.shared or self.task).weights[-1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list((self.shared or self.task).parameters())

    @in_precision
    def forward(self, x: torch.Tensor, own: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        """``x``: shared input ``[B, Din]``; ``own``: task embeddings ``[T, B, Dt]``."""
        probe = Probe(probes, self.training)
        T = own.shape[0]
        stopped = own.detach()
        # every[t, s] = e_s in value; the gradient reaches e_s only from task s (t == s)
        every = stopped.unsqueeze(0) + self.own_mask * (own - stopped).unsqueeze(0)  # [T, T, B, Dt]
        # z_t = [x, e_1 … e_T]: [T, B, Din + T·Dt] (concatenated, not reshaped: no batch-size test)
        z = torch.cat([x.expand(T, -1, -1), *every.unbind(1)], -1)
        task_out = self.task(z.repeat_interleave(self.task_experts, 0))  # [T*Et, B, H]
        out = task_out if self.shared is None else torch.cat([self.shared(x), task_out])
        probe.watch("experts", out)
        probe.share(out)
        w, aux = self.gates(z)  # [B, T, Es+Et], gate t reads z_t
        for i, t in enumerate(self.task_names):
            probe.gate(t, w[:, i])
        mixed = mix_selected(w, out, self.task_index)
        if self.self_gates is not None:  # + each task's own experts, sigmoid-weighted
            mixed = mixed + self.self_gates(z, task_out.unflatten(0, (T, self.task_experts)))
        return probe.output(self.towers(mixed), stack_aux(self.aux_names, [aux], x))
