"""Heads for funnel tasks (impression → click → conversion), where one task's positives are a
subset of the previous one's.

:class:`AITM` — Xi et al., "Modeling the Sequential Dependence among Audience Multi-step
Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtl_dist.models.experts import PLAIN_EXPERTS, ExpertStyle, StackedMLP
from mtl_dist.models.head_parts import ExpertWatch, Probe, Towers, in_precision
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes


class AITM(ExpertWatch, nn.Module):
    """Adaptive Information Transfer Multi-task: each task in the funnel ``chain`` attends over
    what the previous task passes on and its own representation.

    Per task t a tower MLP gives ``q_t`` ``[B, H]`` (all tasks in one batched op). Along the
    chain, ``p_{t−1} = transfer_{t−1}(z_{t−1})`` (one layer + ReLU) and
    ``z_t = Σ_{u ∈ {p_{t−1}, q_t}} softmax_u(⟨h₂(u), h₃(u)⟩ / √H) · h₁(u)`` (the AIT module:
    h₁, h₂, h₃ linear maps of task t); the first task of the chain and tasks outside it use
    ``z_t = q_t``. An output MLP per task maps ``z_t`` to its logit (or value).

    The behavioural-expectation calibrator (aux ``aitm_calibration``): a funnel's later
    probability should not exceed the earlier one, ``α · mean_B Σ_t max(ŷ_t − ŷ_{t−1}, 0)``
    over consecutive chain tasks (binary tasks, sigmoid of their logits; every row, labelled
    or not).

    With ``Probes(gates=True)`` the output's ``gates`` hold each chain task's attention
    ``"<task>/transfer"`` ``[B, 2]`` (weight on ``p_{t−1}``, on ``q_t``; rows sum to 1). They
    are not expert gates: ``gate_experts`` is empty, so gate health does not read them.

    Args:
        in_dim: Din.
        task_names: every task, in output order.
        chain: the funnel's tasks in order (a subsequence of ``task_names``' names, ≥ 2).
        tower_hidden: the representation tower's widths; the last is H.
        output_hidden: the output MLP's hidden widths before the logit.
        calibration: α (0: no calibrator).

    Example::

        head = AITM(32, ["click", "conversion"], ["click", "conversion"], [64, 32], [16])
        out, aux, *_ = head(torch.randn(8, 32))   # [8, 2], [1]
    """

    def __init__(
        self,
        in_dim: int,
        task_names: list[str],
        chain: list[str],
        tower_hidden: list[int],
        output_hidden: list[int],
        calibration: float = 0.6,
        output_dropout: float = 0.0,
        style: ExpertStyle = PLAIN_EXPERTS,
    ) -> None:
        super().__init__()
        unknown = [c for c in chain if c not in task_names]
        if len(chain) < 2 or unknown or len(set(chain)) != len(chain):
            raise ValueError(
                f"AITM chain {chain}: needs 2 or more distinct tasks of {task_names}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        self.task_names = list(task_names)
        self.num_tasks = T = len(task_names)
        self.chain = [task_names.index(c) for c in chain]
        self.calibration = calibration
        self.aux_names = ["aitm_calibration"] if calibration > 0 else []
        h = tower_hidden[-1]
        self.towers_in = StackedMLP(T, in_dim, tower_hidden, **style.kwargs())
        links = len(chain) - 1
        self.transfer = StackedMLP(links, h, [h])  # p_{t-1} from z_{t-1}
        # h1, h2, h3 of each chain task after the first: [links, H, 3H]
        self.attend = StackedMLP(links, h, [3 * h], activate_last=False)
        self.outputs = Towers(T, h, output_hidden, output_dropout)
        self.gate_experts: dict[str, tuple[str, list[int]]] = {}

    def shared_layer(self) -> torch.Tensor:
        """The first tower layer (every task's tower reads the shared input through it)."""
        return self.towers_in.weights[0]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.towers_in.parameters())

    @in_precision
    def forward(self, x: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        probe = Probe(probes, self.training)
        q = self.towers_in(x)  # [T, B, H]
        probe.watch("towers", q)
        probe.share(x)  # no layer is shared: the towers' common input
        z = list(q.unbind(0))
        h = q.shape[-1]
        for link, (prev, t) in enumerate(zip(self.chain, self.chain[1:])):
            p = self.transfer.forward_group(link, z[prev])  # [B, H]
            u = torch.stack([p, z[t]])  # [2, B, H]: the two candidates
            w, b = self.attend.weights[0][link], self.attend.biases[0][link]
            h1, h2, h3 = (u @ w + b).split(h, dim=-1)
            a = torch.softmax((h2 * h3).sum(-1) / math.sqrt(h), dim=0)  # [2, B]
            z[t] = (a.unsqueeze(-1) * h1).sum(0)
            probe.gate(f"{self.task_names[t]}/transfer", a.t())
        out = self.outputs(torch.stack(z))  # [B, T]
        if not self.aux_names:
            return probe.output(out, x.new_zeros(0))
        probs = torch.sigmoid(out[:, self.chain])  # [B, C]
        excess = torch.relu(probs[:, 1:] - probs[:, :-1]).sum(1).mean()
        return probe.output(out, (self.calibration * excess).unsqueeze(0))
