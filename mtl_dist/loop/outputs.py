"""What a training forward returns to the step: :class:`TaskLosses` (with the graph) and
:class:`StepOutput` (detached, for the telemetry and the metrics); made by
:class:`mtl_dist.loop.losses.ModelWithLoss`, read by :mod:`mtl_dist.loop.step`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["StepOutput", "TaskLosses"]


class TaskLosses(NamedTuple):
    """What a training forward hands the step (:class:`mtl_dist.loop.step.TrainStep`), which
    turns it into one scalar and runs the backward: ``losses [T]`` (unweighted task losses; the
    CVR task's is the CTCVR loss under ESMM), ``aux [A]`` (the head's auxiliary losses),
    ``mask [B, T]`` (each row's loss weight per task, as the losses used it: labelled rows are
    those with weight > 0) and ``penalty`` (0-dim: ``model.embedding.l2``'s penalty in
    training, else None). Not detached: the graph of this step hangs on them. A named tuple,
    so DDP (static graph) finds these tensors in the forward's output: a dataclass would hide
    them from its output traversal and its gradient sync would go wrong."""

    losses: torch.Tensor
    aux: torch.Tensor
    mask: torch.Tensor
    penalty: torch.Tensor | None


@dataclass
class StepOutput:
    """What a train / eval step returns besides the loss (all detached).

    From the forward: losses ``[T]`` (task losses, unweighted; the CVR task's is the CTCVR loss
    under ESMM); aux ``[A]`` (the head's auxiliary losses, see ``head.aux_names``); preds,
    labels, mask, truth ``[B, T]`` (preds: pCTR / pCVR / values on the true scale — pCVR stays
    available under ESMM); group ``[B]`` (GAUC ids). From the training step
    (:class:`mtl_dist.loop.step.TrainStep`; None after an evaluation forward): weights ``[T]``
    (the balancer's task weights), conflict ``[T, T]`` (task-gradient cosines on probe steps,
    else ``[0, 0]``), nonfinite ``[R, T + 1]`` and skipped ``[]`` (bool, the guard's verdict).
    What the model's probes (``ranker.probes``) asked for, else None: gates ``{gate: [B, E]}``
    and dead ``{set: [E]}`` (read by the telemetry's gate health) and shared, the head's shared
    representation (the one field with its graph: the representation balancers differentiate
    the task losses on it), and attention ``{sequence: (weights [B, L], lengths [B])}``
    (read by the telemetry's attention health; see :mod:`mtl_dist.models.sequence`). A dataclass, so DDP's output traversal leaves these alone (it would
    pass ``shared`` through its sink and cut it off the losses' graph).
    """

    losses: torch.Tensor
    aux: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor
    group: torch.Tensor
    weights: torch.Tensor | None = None
    conflict: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    skipped: torch.Tensor | None = None
    gates: dict[str, torch.Tensor] | None = None
    dead: dict[str, torch.Tensor] | None = None
    shared: torch.Tensor | None = None
    attention: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
