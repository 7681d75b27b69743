"""Per-task losses with label masks, and the model-with-loss the training step calls.

Binary tasks: BCE on logits; regression tasks: MSE. The mask is each row's weight for a task:
a missing label (mask 0) contributes nothing, a task with no label in the batch contributes 0,
not NaN, and sample weights make the mean a weighted one: every loss here is ``Σ w·loss / Σ w``
over its rows (see :func:`weighted_mean`), so scaling every weight by the same factor changes
neither the loss nor its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.balancing import build_balancer
from mtl_dist.config import JobConfig, LossConfig, TaskSpec
from mtl_dist.data.batch import Batch
from mtl_dist.loop.funnel import (  # re-exported: the funnel losses' old home
    MIN_PROPENSITY,
    ctcvr_weights,
    escm2_dr_risk,
    escm2_ips_risk,
    esmm_ctcvr_loss,
    observed_conversions,
    weighted_mean,
)
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, RankerOutput

__all__ = [
    "MIN_PROPENSITY", "ctcvr_weights", "escm2_dr_risk", "escm2_ips_risk", "esmm_ctcvr_loss",
    "observed_conversions", "weighted_mean", "task_losses", "predictions", "task_predictions",
    "downsample_negatives", "TaskLosses", "StepOutput", "ModelWithLoss", "build_model_with_loss",
]  # fmt: skip


def task_losses(
    outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, is_binary: torch.Tensor
) -> torch.Tensor:
    """Weighted mean loss per task: ``Σ_i m_it · loss_it / Σ_i m_it`` (0 where ``Σ_i m_it = 0``,
    see :func:`weighted_mean`).

    Args:
        outputs: ``[B, T]`` logits (binary tasks) or values (regression tasks).
        labels: ``[B, T]``.
        mask: ``[B, T]`` each row's weight for each task: 0 for a missing label, else its
            sample weight (1 without weights); only ratios matter, not the scale.
        is_binary: ``[T]`` bool.

    Returns:
        ``[T]`` losses.
    """
    bce = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
    mse = (outputs - labels).square()
    per_row = torch.where(is_binary, bce, mse) * mask
    return weighted_mean(per_row.sum(0), mask.sum(0))


def predictions(
    outputs: torch.Tensor, is_binary: torch.Tensor, negative_rate: torch.Tensor | None = None
) -> torch.Tensor:
    """Probabilities for binary tasks, values for regression: ``[B, T]``.

    A task trained with its negatives kept at rate r predicts p on the sampled scale; the
    true-scale probability is ``p / (p + (1 − p) / r)`` (``negative_rate`` ``[T]``, 1 = none).
    """
    p = torch.sigmoid(outputs)
    if negative_rate is not None:
        p = p / (p + (1 - p) / negative_rate)
    return torch.where(is_binary, p, outputs)


def task_predictions(
    outputs: torch.Tensor,
    is_binary: torch.Tensor,
    negative_rate: torch.Tensor | None = None,
    ctcvr: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`predictions` ``[B, T]``, and with ``ctcvr = (ctr, cvr)`` task indices (ESMM on a
    CTCVR label) the CVR column replaced by pCTR × pCVR. Shared by scoring and the served
    program (:mod:`mtl_dist.serve.program`), so both compute the same numbers."""
    preds = predictions(outputs, is_binary, negative_rate)
    if ctcvr is not None:
        c, v = ctcvr
        product = preds[:, c] * preds[:, v]
        preds = torch.cat([preds[:, :v], product.unsqueeze(1), preds[:, v + 1 :]], 1)
    return preds


def downsample_negatives(
    labels: torch.Tensor, mask: torch.Tensor, negative_rate: torch.Tensor
) -> torch.Tensor:
    """Training mask ``[B, T]`` keeping each task's negatives (label 0) with its rate ``[T]``.

    Per task, not per row: a click negative dropped from the click loss still trains the
    other tasks. Draws from the global RNG (seeded; part of a checkpoint's RNG state).
    """
    keep = (labels > 0) | (torch.rand_like(mask) < negative_rate)
    return mask * keep


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
    the task losses on it). A dataclass, so DDP's output traversal leaves these alone (it would
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


class ModelWithLoss(nn.Module):
    """``forward(batch) -> (TaskLosses, StepOutput)``: the model and its task losses, what
    TorchRec's train pipelines call; the step (:mod:`mtl_dist.loop.step`) combines the losses
    and runs the backward.

    ``esmm=(ctr_index, cvr_index)`` trains the CVR task through pCTCVR on all exposures (see
    :func:`esmm_ctcvr_loss`), plus ``escm2_ips`` times ESCM2's counterfactual risk
    (:func:`escm2_ips_risk`) or ``escm2_dr`` times its doubly robust form plus the imputation
    tower's loss (:func:`escm2_dr_risk`; the ranker's ``imputation`` tower). Tasks with
    ``negative_rate < 1`` see their negatives downsampled in training; predictions are
    corrected back to the true scale. ``balancer`` (``mtl_dist.balancing``, per ``loss``) is
    held here so its learnable state trains and checkpoints with the model; the step calls it.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: list[TaskSpec],
        esmm: tuple[int, int] | None = None,
        loss: LossConfig | None = None,
        esmm_ctcvr_preds: bool = False,
        escm2_ips: float = 0.0,
        escm2_dr: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.esmm = esmm
        self.escm2_ips = escm2_ips
        self.escm2_dr = escm2_dr
        self.esmm_ctcvr_preds = esmm_ctcvr_preds
        loss = loss or LossConfig()
        self.balancer = build_balancer(
            loss, tasks, lambda: self.model.head, lambda: self._step_shared
        )
        self.fixed_weights = loss.balancer == "fixed"  # reads no label counts in the forward
        # representation-gradient balancers differentiate on the head's shared representation:
        # the model returns it (probes.shared); the step's output and the balancer get it
        self._step_shared: torch.Tensor | None = None
        if getattr(self.balancer, "needs_representation", False):
            model.probes = replace(getattr(model, "probes", NO_PROBES), shared=True)
        self.register_buffer(
            "is_binary", torch.tensor([t.kind == "binary" for t in tasks]), persistent=False
        )
        rates = [t.negative_rate for t in tasks]
        self.register_buffer(
            "negative_rate",
            torch.tensor(rates) if min(rates) < 1 else None,
            persistent=False,
        )

    def forward(self, batch: Batch) -> tuple[TaskLosses, StepOutput]:
        ranked = self.model(batch)
        if isinstance(ranked, HeadOutput):  # a bare head
            ranked = RankerOutput.of_head(ranked)
        elif not isinstance(ranked, RankerOutput):  # a plain (logits, aux)
            ranked = RankerOutput(*ranked)
        # this step's representation, for the balancer the step calls: what reaches the step
        # (TaskLosses) crosses DDP, whose output hook would cut it off the graph
        self._step_shared = ranked.shared
        outputs, aux = ranked.logits, ranked.aux
        mask = batch.mask
        if self.training and self.negative_rate is not None:
            mask = downsample_negatives(batch.labels, mask, self.negative_rate)
        losses = task_losses(outputs, batch.labels, mask, self.is_binary)
        if self.esmm is not None:
            losses, mask = self._esmm(outputs, ranked.imputation, batch, losses, mask)
        out = StepOutput(
            losses=losses.detach(),
            aux=aux.detach(),
            preds=self.predict(outputs.detach()),
            labels=batch.labels,
            mask=batch.mask,
            truth=batch.truth,
            group=batch.group,
            gates=ranked.gates,
            dead=ranked.dead,
            shared=ranked.shared,
            attention=ranked.attention,
        )
        return TaskLosses(losses, aux, mask, ranked.penalty if self.training else None), out

    def _esmm(
        self,
        outputs: torch.Tensor,
        imputation: torch.Tensor | None,
        batch: Batch,
        losses: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CVR task's loss replaced by ESMM's CTCVR loss (+ ESCM2's risks), and its mask
        column by the CTCVR weights (see :func:`ctcvr_weights`)."""
        c, v = self.esmm
        weight = ctcvr_weights(batch.labels[:, c], mask[:, c], batch.mask[:, v])
        observed = observed_conversions(batch.labels[:, c], mask[:, c], batch.mask[:, v])
        ctcvr = esmm_ctcvr_loss(
            outputs[:, c], outputs[:, v], batch.labels[:, c] * batch.labels[:, v], weight
        )
        if self.escm2_ips > 0:  # + the counterfactual CVR risk (ESCM2-IPS)
            ctcvr = ctcvr + self.escm2_ips * escm2_ips_risk(
                outputs[:, c], outputs[:, v], batch.labels[:, v], mask[:, c], observed
            )
        if self.escm2_dr > 0 and imputation is not None:  # + DR and the imputation loss (training)
            dr = escm2_dr_risk(
                outputs[:, c], outputs[:, v], imputation, batch.labels[:, v],
                mask[:, c], observed,
            )  # fmt: skip
            ctcvr = ctcvr + self.escm2_dr * (dr[0] + dr[1])
        losses = torch.cat([losses[:v], ctcvr.unsqueeze(0), losses[v + 1 :]])
        mask = torch.cat([mask[:, :v], weight.unsqueeze(1), mask[:, v + 1 :]], 1)
        return losses, mask

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Probabilities / values ``[B, T]`` from the head's outputs; with ESMM on a CTCVR label
        the CVR task's column is pCTR × pCVR (what its label measures)."""
        ctcvr = self.esmm if self.esmm_ctcvr_preds else None
        return task_predictions(outputs, self.is_binary, self.negative_rate, ctcvr)


def build_model_with_loss(model: nn.Module, cfg: JobConfig) -> ModelWithLoss:
    """Wrap ``model`` with the task losses and balancer of ``cfg`` (ESMM when ``model.esmm.enabled``)."""
    names = [t.name for t in cfg.tasks]
    esmm = (
        (names.index(cfg.model.esmm.ctr_task), names.index(cfg.model.esmm.cvr_task))
        if cfg.model.esmm.enabled
        else None
    )
    return ModelWithLoss(
        model, cfg.tasks, esmm, cfg.loss, cfg.model.esmm.cvr_label == "ctcvr",
        cfg.model.esmm.escm2_ips, cfg.model.esmm.escm2_dr,
    )  # fmt: skip
