"""What every multi-task head is built from: :class:`Towers`, the :class:`ExpertWatch` probes,
:func:`task_expert_index`, the auxiliary-loss helpers, :func:`in_precision` (every head's
forward runs in its compute dtype through it) and :class:`Probe`, which gathers the extras a
forward returns.

The heads themselves are in :mod:`mtl_dist.models.heads` (SharedBottom, MoE) and
:mod:`mtl_dist.models.ple` (PLE, STEM); see :mod:`mtl_dist.models.heads` for what a head returns
and keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from mtl_dist.models.experts import StackedMLP, dead_units
from mtl_dist.models.gates import GateConfig
from mtl_dist.models.outputs import HeadOutput, Probes

__all__ = [
    "ExpertWatch",
    "HeadOutput",
    "Probe",
    "Probes",
    "Towers",
    "gate_aux_names",
    "in_precision",
    "stack_aux",
    "task_expert_index",
]


def in_precision(forward: Callable) -> Callable:
    """Decorate a head's ``forward`` returning a
    :class:`~mtl_dist.models.outputs.HeadOutput`: run it under autocast in the head's
    ``compute_dtype`` (set by :func:`set_head_precision`; None = fp32) and return its logits and
    aux in float32, so losses, metrics and balancers never see reduced precision (the probes'
    extras stay as computed)."""

    @functools.wraps(forward)
    def wrapped(self, x: torch.Tensor, *args, **kwargs):
        dtype = getattr(self, "compute_dtype", None)
        if dtype is None:
            return forward(self, x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=dtype):
            out = forward(self, x, *args, **kwargs)
        return out._replace(logits=out.logits.float(), aux=out.aux.float())

    return wrapped


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
    """The heads' common base (old exported models name it). What a head probes lives in the
    :class:`Probe` its forward makes, and comes back in its :class:`HeadOutput`."""


class Probe:
    """One forward's extras, as ``probes`` asked for: the head records into it while it
    computes and returns :meth:`output` (see :class:`~mtl_dist.models.outputs.Probes`)."""

    def __init__(self, probes: Probes, training: bool) -> None:
        self.probes, self.training = probes, training
        self.gates: dict[str, torch.Tensor] | None = {} if probes.gates else None
        self.dead: dict[str, torch.Tensor] | None = {} if probes.dead_units and training else None
        self.shared: torch.Tensor | None = None

    def gate(self, name: str, w: torch.Tensor) -> None:
        """Keep gate ``name``'s weights ``[B, E]`` (detached) when asked for."""
        if self.gates is not None:
            self.gates[name] = w.detach()

    def watch(self, expert_set: str, h: torch.Tensor, *groups) -> None:
        """Keep ``dead_units(h, *groups)`` ``[E]`` for ``expert_set`` when asked for."""
        if self.dead is not None:
            self.dead[expert_set] = dead_units(h, *groups)

    def share(self, z: torch.Tensor) -> None:
        """Keep ``z``, the representation every task's loss reaches through its own modules only
        (experts' or bottom's output), when asked for, in training (the last call's stays)."""
        if self.probes.shared and self.training:
            self.shared = z

    def output(self, logits: torch.Tensor, aux: torch.Tensor) -> HeadOutput:
        """The head's :class:`HeadOutput`: ``logits [B, T]``, ``aux [A]`` and the extras."""
        return HeadOutput(logits, aux, self.gates, self.dead, self.shared)


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

    In training the weights are scattered into ``[B, T, E]`` (zeros for the experts a task does not read)
    and mixed over all E in one einsum: gathering ``experts[index]`` instead materialises
    ``[T, K, B, H]`` and its backward is an accumulating index_put, a fifth of a PLE step
    (issue 28); the scatter touches only the small weight tensor. Without gradients (scoring)
    and in ``torch.export`` (whose batch-size guards the scatter would change: B = 1 would be
    specialised) the gather runs, with the same values (``tests/models/test_fast_paths.py``).
    """
    if not torch.is_grad_enabled() or torch.compiler.is_exporting():  # no backward to pay for
        return torch.einsum("bte,tebh->tbh", weights, experts[index])
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
