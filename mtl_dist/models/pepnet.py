"""PEPNet — Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information", KDD 2023 (Kuaishou).

Two kinds of Gate Neural Unit (:class:`GateNU`) personalise a plain per-task DNN:

* **EPNet** scales the head's input per sample from the domain (scenario) features:
  ``O_ep = δ_domain ⊙ x`` with ``δ_domain = GateNU(E(F_d) ⊕ ∅(x))`` (∅: stop-gradient).
* **PPNet** scales the input of every tower layer of every task from the personal prior
  features (user / item / author ids): ``δ^l = GateNU^l(E(F_p) ⊕ ∅(O_ep))`` ``[B, T·d_l]``, and
  task t's layer l computes ``f((δ^l_t ⊙ H^l_t) W^l_t + b^l_t)``.

The prior features are column blocks of the head's input ``x`` (given by index); their
embeddings keep their gradient through the gates, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.models.experts import ACTIVATIONS, PLAIN_EXPERTS, ExpertStyle, StackedMLP
from mtl_dist.models.head_parts import ExpertWatch, Probe, in_precision
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes


class GateNU(nn.Module):
    """Gate Neural Unit: ``δ = γ · σ(W₂ ReLU(W₁ z + b₁) + b₂)``, ``[B, Din]`` → ``[B, Dout]`` in
    ``(0, γ)`` (γ = 2: a gate can double a unit as well as silence it). ``W₂, b₂`` start at 0,
    so every δ starts at 1 and the network starts as the plain one."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.sigmoid(self.out(torch.relu(self.hidden(z))))


class PEPNet(ExpertWatch, nn.Module):
    """PEPNet head: EPNet over the input, PPNet over T task towers: ``[B, Din]`` → ``[B, T]``.

    Args:
        in_dim: Din.
        task_names: the tasks, in output order.
        domain_columns: columns of ``x`` holding the domain features (EPNet's input; empty:
            no EPNet).
        prior_columns: columns of ``x`` holding the prior features (PPNet's input; empty: no
            PPNet).
        tower_hidden: each task tower's hidden widths before its output unit.
        gate_hidden: the Gate NUs' hidden width.

    Raises:
        ValueError: neither domain nor prior columns, or a column outside ``[0, Din)``.

    Example::

        head = PEPNet(32, ["click", "conversion"], domain_columns=[0, 1],
                      prior_columns=list(range(2, 10)), tower_hidden=[16], gate_hidden=8)
        out, aux, *_ = head(torch.randn(5, 32))   # [5, 2], []
    """

    aux_names: list[str] = []

    def __init__(
        self,
        in_dim: int,
        task_names: list[str],
        domain_columns: list[int],
        prior_columns: list[int],
        tower_hidden: list[int],
        gate_hidden: int = 64,
        style: ExpertStyle = PLAIN_EXPERTS,
    ) -> None:
        super().__init__()
        cols = [*domain_columns, *prior_columns]
        if not cols or not all(0 <= c < in_dim for c in cols):
            raise ValueError(
                f"PEPNet needs domain or prior columns within [0, {in_dim}), got "
                f"domain {domain_columns}, prior {prior_columns}"
            )
        self.task_names = list(task_names)
        self.num_tasks = T = len(task_names)
        self.register_buffer("domain_columns", torch.tensor(domain_columns), persistent=False)
        self.register_buffer("prior_columns", torch.tensor(prior_columns), persistent=False)
        self.epnet = (
            GateNU(len(domain_columns) + in_dim, in_dim, gate_hidden) if domain_columns else None
        )
        widths = [*tower_hidden, 1]
        self.towers = StackedMLP(T, in_dim, widths, activate_last=False)
        self.act = ACTIVATIONS[style.activation]
        layer_in = [in_dim, *tower_hidden]
        self.ppnet = (
            nn.ModuleList(GateNU(len(prior_columns) + in_dim, T * d, gate_hidden) for d in layer_in)
            if prior_columns
            else None
        )
        self.gate_experts: dict[str, tuple[str, list[int]]] = {}

    def shared_layer(self) -> torch.Tensor:
        """EPNet's output layer (every task reads its gate), else PPNet's first gate's."""
        return (self.epnet or self.ppnet[0]).out.weight

    def shared_parameters(self) -> list[nn.Parameter]:
        """The Gate NUs' parameters (every task's output depends on each of them)."""
        return [
            p for gate in (self.epnet, self.ppnet) if gate is not None for p in gate.parameters()
        ]

    @in_precision
    def forward(self, x: torch.Tensor, probes: Probes = NO_PROBES) -> HeadOutput:
        probe = Probe(probes, self.training)
        o_ep = x
        if self.epnet is not None:  # δ_domain from the domain features and ∅(x)
            o_ep = x * self.epnet(torch.cat([x[:, self.domain_columns], x.detach()], 1))
        probe.share(o_ep)
        prior = (
            torch.cat([x[:, self.prior_columns], o_ep.detach()], 1)
            if self.ppnet is not None
            else None
        )
        h = o_ep.expand(self.num_tasks, -1, -1)  # [T, B, Din]
        last = len(self.towers.weights) - 1
        for layer, (w, b) in enumerate(zip(self.towers.weights, self.towers.biases)):
            if self.ppnet is not None:  # δ^l: [B, T·d_l] → [T, B, d_l]
                delta = self.ppnet[layer](prior).view(h.shape[1], self.num_tasks, -1)
                h = h * delta.transpose(0, 1)
            h = torch.baddbmm(b, h, w)
            if layer < last:
                h = self.act(h)
                if layer == last - 1:
                    probe.watch("towers", h)
        return probe.output(h.squeeze(-1).t(), x.new_zeros(0))
