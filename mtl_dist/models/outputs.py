"""What a model computes besides its logits, asked for from outside and returned, never kept.

:class:`Probes` says which extras the next forwards compute: the loop (a representation
balancer's need) and the telemetry (gate health, heatmaps) set it on the ranker
(``ranker.probes = replace(ranker.probes, gates=True)``); the ranker hands it to its head. A
head returns a :class:`HeadOutput`, the ranker a :class:`~mtl_dist.models.ranker.RankerOutput`
holding the same extras (:func:`mtl_dist.models.ranker.model_body` is the part of the model
training and serving share). Both outputs are NamedTuples: what crosses DDP / TorchRec's DMP must be tuples,
dicts and lists of tensors, or DDP does not see the tensors in them.

Legend: ``B`` batch, ``E`` a gate's experts, ``H`` hidden, ``T`` tasks, ``A`` aux losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Probes:
    """Which extras a forward computes (all off: logits and aux only).

    Args:
        gates: each gate's weights ``{gate: [B, E]}`` (detached; free: the forward has them).
        dead_units: per expert set, the share of each expert's output units that are 0 on the
            whole batch (``{set: [E]}``, see :func:`mtl_dist.models.experts.dead_units`);
            training forwards only.
        shared: the representation every task's loss reaches through its own modules only (the
            experts' or bottom's output, with its graph: the representation balancers
            differentiate the task losses on it); training forwards only.
        head_input: the ranker's head input ``[B, Din]`` before the interaction (with its
            graph: feature attribution differentiates the outputs on it).
        attention: each behaviour sequence's attention weights and lengths
            ``{sequence: (w [B, L], lengths [B])}`` (detached; see ``models/sequence.py``).
    """

    gates: bool = False
    dead_units: bool = False
    shared: bool = False
    head_input: bool = False
    attention: bool = False


NO_PROBES = Probes()


class HeadOutput(NamedTuple):
    """What a multi-task head returns: ``logits [B, T]`` (values for regression tasks), ``aux
    [A]`` (its auxiliary losses in the order of ``head.aux_names``; empty when none is on) and
    the extras :class:`Probes` asked for, None when not asked for (or a head has none):
    ``gates`` ``{gate: [B, E]}`` (rows sum to 1), ``dead`` ``{set: [E]}``, ``shared`` (a head's
    shared representation, e.g. ``[E, B, H]``)."""

    logits: torch.Tensor
    aux: torch.Tensor
    gates: dict[str, torch.Tensor] | None = None
    dead: dict[str, torch.Tensor] | None = None
    shared: torch.Tensor | None = None


class RankerOutput(NamedTuple):
    """What :class:`~mtl_dist.models.ranker.Ranker` computes: ``logits [B, T]`` (values for regression tasks), the
    head's ``aux [A]`` losses, in training only ``penalty`` (0-dim, ``model.embedding.l2``'s
    ``λ/2 · mean_b ||pooled_b||²``; None without it) and ``imputation [B]`` (ESCM2-DR's imputed
    conversion logits; None without ``model.esmm.escm2_dr``), and what ``ranker.probes`` asked for
    (None otherwise): the head's ``gates`` ``{gate: [B, E]}``, ``dead`` ``{set: [E]}`` and
    ``shared`` representation (see :class:`~mtl_dist.models.outputs.HeadOutput`), and
    ``head_input`` ``[B, Din]``, the head's raw input before the interaction (its column blocks:
    :meth:`~mtl_dist.models.ranker.Ranker.input_blocks`); ``attention`` ``{sequence: (w [B, L],
    lengths [B])}``. :meth:`of_head` makes one of a bare head's output."""

    logits: torch.Tensor
    aux: torch.Tensor
    penalty: torch.Tensor | None = None
    imputation: torch.Tensor | None = None
    gates: dict[str, torch.Tensor] | None = None
    dead: dict[str, torch.Tensor] | None = None
    shared: torch.Tensor | None = None
    head_input: torch.Tensor | None = None
    attention: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def of_head(cls, out: HeadOutput, **extra) -> RankerOutput:
        """``out``'s logits, aux and extras (and the fields in ``extra``) as a RankerOutput."""
        return cls(out.logits, out.aux, gates=out.gates, dead=out.dead, shared=out.shared, **extra)
