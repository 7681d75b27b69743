"""Per-task losses with label masks, ESMM's and ESCM2's funnel losses, and the model-with-loss
the training step calls.

Binary tasks: BCE on logits; regression tasks: MSE. The mask is each row's weight for a task:
a missing label (mask 0) contributes nothing, a task with no label in the batch contributes 0,
not NaN, and sample weights make the mean a weighted one: every loss here is ``Σ w·loss / Σ w``
over its rows (see :func:`weighted_mean`), so scaling every weight by the same factor changes
neither the loss nor its gradient.

The funnel (impression → click → conversion, :class:`ModelWithLoss` with ``model.esmm.enabled``):
the CTCVR term (Ma et al., SIGIR 2018), ESCM2's counterfactual IPS / DR risks (Wang et al., SIGIR
2022), and the row weights that keep both unbiased when some clicked rows' conversions are
unknown; shapes ``[B]`` → scalar. What the forward returns is in :mod:`mtl_dist.loop.outputs`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.balancing import build_balancer
from mtl_dist.config import JobConfig, LossConfig, TaskSpec
from mtl_dist.data.batch import Batch
from mtl_dist.loop.outputs import StepOutput, TaskLosses
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, RankerOutput

__all__ = [
    "MIN_PROPENSITY", "ctcvr_weights", "escm2_dr_risk", "escm2_ips_risk", "esmm_ctcvr_loss",
    "observed_conversions", "weighted_mean", "task_losses", "predictions", "task_predictions",
    "downsample_negatives", "TaskLosses", "StepOutput", "ModelWithLoss", "build_model_with_loss",
]  # fmt: skip


def weighted_mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``total / weight`` (any equal shapes: ``Σ w·loss`` over the rows and ``Σ w``), and 0
    where ``weight == 0`` (no labelled row, or every weight 0): not NaN, and with a zero, finite
    gradient — ``total`` is then a sum of zero-weighted terms, divided by 1. Only the zero is
    guarded: a small ``Σ w`` (normalised weights) is divided by as it is, so the mean does not
    depend on the weights' scale."""
    return total / torch.where(weight != 0, weight, torch.ones_like(weight))


def esmm_ctcvr_loss(
    ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, ctcvr_label: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ESMM (Ma et al., SIGIR 2018): BCE of pCTCVR = pCTR × pCVR against click∧conversion.

    Computed on every exposure whose click∧conversion is known (``mask``: each row's weight, see
    :func:`ctcvr_weights`), so pCVR is learnt over the entire space without a direct loss on the
    clicked-only rows: ``Σ_i m_i · BCE_i / Σ_i m_i`` (0 where ``Σ m = 0``, see
    :func:`weighted_mean`). Log-space for stability. ``[B]`` each → scalar.
    """
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-7))
    per_row = -(ctcvr_label * log_p + (1 - ctcvr_label) * log_not_p) * mask
    return weighted_mean(per_row.sum(), mask.sum())


MIN_PROPENSITY = 0.05  # ESCM2's IPS: pCTR below this counts as this (bounded weights)


def escm2_ips_risk(
    ctr_logit: torch.Tensor,
    cvr_logit: torch.Tensor,
    conversion: torch.Tensor,
    exposure_mask: torch.Tensor,
    observed: torch.Tensor,
) -> torch.Tensor:
    """ESCM2's counterfactual CVR risk, IPS form (Wang et al., "ESCM²: Entire Space
    Counterfactual Multi-Task Model for Post-Click Conversion Rate Estimation", SIGIR 2022):
    ``Σ_i m_i · o_i · BCE(r_i, pCVR_i) / p̂_i / Σ_i m_i`` over the exposures (``exposure_mask``
    m: the CTR task's weights, sample weights included), where ``o_i`` marks a clicked row whose
    conversion ``r_i`` was observed, divided by the batch's known share ``q̂`` of the clicked
    rows (``observed`` = ``o_i / q̂``, :func:`observed_conversions`) and the propensity
    ``p̂_i = pCTR_i`` (no gradient through it; at least :data:`MIN_PROPENSITY`): the observed
    conversions reweighted by ``1 / (pCTR_i · q̂)``, the probability of being observed, to stand
    for every exposure — an unbiased estimate of the CVR loss over the entire space. The denominator is the weighted exposure count ``Σ_i m_i``
    (0 where it is 0, see :func:`weighted_mean`). ``[B]`` each → scalar.
    """
    bce = F.binary_cross_entropy_with_logits(cvr_logit, conversion, reduction="none")
    propensity = torch.sigmoid(ctr_logit).detach().clamp_min(MIN_PROPENSITY)
    per_row = exposure_mask * observed.to(bce.dtype) * bce / propensity
    return weighted_mean(per_row.sum(), exposure_mask.sum())


def escm2_dr_risk(
    ctr_logit: torch.Tensor,
    cvr_logit: torch.Tensor,
    imputed_logit: torch.Tensor,
    conversion: torch.Tensor,
    exposure_mask: torch.Tensor,
    observed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESCM2's counterfactual CVR risk, doubly robust (DR) form (Wang et al., SIGIR 2022, after
    Wang et al., "Doubly Robust Joint Learning for Recommendation on Data Missing Not at
    Random", ICML 2019), and the imputation tower's loss. ``[B]`` each → two scalars.

    The imputation tower predicts a conversion ``r̃_i = σ(imputed_logit_i)`` for every exposure;
    its imputed error is ``ê_i = BCE(r̃_i, pCVR_i)`` (r̃ without gradient: the error the CVR
    model would make against the pseudo-label). With the observed error ``e_i = BCE(r_i,
    pCVR_i)`` on clicked rows whose conversion is known (``o_i``) and the propensity ``p̂_i =
    max(pCTR_i, MIN_PROPENSITY)`` (no gradient):

    * risk ``R_DR = Σ_i m_i [ê_i + o_i (e_i − ê_i) / p̂_i] / Σ_i m_i`` over the exposures
      (``exposure_mask`` m: the CTR task's weights, sample weights included): unbiased when
      either the propensity or the imputation is right; it trains the CVR tower on every
      exposure, unclicked ones through ``ê``;
    * imputation loss ``Σ_i m_i o_i (e_i − ê'_i)² / p̂_i / Σ_i m_i`` with ``ê'`` from the CVR
      logits without gradient: it trains the imputation tower only, to predict the CVR
      model's error where it is observed, reweighted to the entire space.

    Both divide by the weighted exposure count ``Σ_i m_i`` and are 0 where it is 0 (see
    :func:`weighted_mean`); ``observed`` is ``o_i / q̂`` (:func:`observed_conversions`: the known
    share ``q̂`` of the clicked rows completes the propensity ``p̂_i · q̂``).
    """
    bce = F.binary_cross_entropy_with_logits
    propensity = torch.sigmoid(ctr_logit).detach().clamp_min(MIN_PROPENSITY)
    o = exposure_mask * observed.to(cvr_logit.dtype)
    error = bce(cvr_logit, conversion, reduction="none")  # e_i (read on observed rows only)
    imputed = bce(cvr_logit, torch.sigmoid(imputed_logit).detach(), reduction="none")  # ê_i
    per_row = exposure_mask * imputed + o * (error - imputed) / propensity
    total = exposure_mask.sum()  # Σ_i m_i: the weighted exposure count
    fit = bce(cvr_logit.detach(), torch.sigmoid(imputed_logit), reduction="none")  # ê'_i
    imputation = weighted_mean((o * (error.detach() - fit).square() / propensity).sum(), total)
    return weighted_mean(per_row.sum(), total), imputation


def ctcvr_weights(
    ctr_label: torch.Tensor, ctr_mask: torch.Tensor, cvr_mask: torch.Tensor
) -> torch.Tensor:
    """Each row's weight ``[B]`` in ESMM's CTCVR term: the CTR task's weight where the row's
    click∧conversion label is known, else 0, and clicked rows with a known conversion scaled up
    to stand for the batch's clicked rows whose conversion is unknown.

    Known: an unclicked row (CTCVR 0 whatever its conversion) or a clicked row whose conversion
    was observed (``cvr_mask > 0``, the CVR task's mask before any downsampling). A clicked row
    with an unknown conversion (null, e.g. not attributed yet) carries no CTCVR label — reading
    it as 0 would train it as a negative and pull pCVR down.

    Dropping those rows alone would bias the CTCVR sample: it would hold a share ``q`` of the
    clicked rows (``q`` = known clicked weight / clicked weight) but every unclicked row, so
    pCTR × pCVR would fit a click rate too low and pCVR would come out ≈ ``q / (1 − c + c·q)``
    times too small (``c`` the click rate). With conversions missing at random among clicked
    rows, each known clicked row is weighted ``1 / q̂``, ``q̂`` this batch's share (from the
    labels and masks, no gradient): ``Σ_{known clicked} m / q̂ = Σ_{clicked} m``, so the
    weighted CTCVR sample has the batch's click share and ``Σ m·BCE`` is an unbiased estimate
    of the full-label one (given how many conversions are known, the known ones are a uniform
    subset of the clicked rows). Per batch, not a running estimate: no state to checkpoint or
    synchronise, and it follows a missing share that drifts through the data (attribution
    delay). A batch with clicked rows but no known conversion among them keeps weight 0 on them
    (``q̂ = 0``: the factor stays 1, every weight finite).
    """
    clicked = ctr_label != 0
    weight = ctr_mask * ((~clicked) | (cvr_mask > 0)).to(ctr_mask.dtype)
    return torch.where(clicked, weight * _inverse_known_share(clicked, ctr_mask, weight), weight)


def _inverse_known_share(
    clicked: torch.Tensor, ctr_mask: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """``1 / q̂`` (a detached scalar): the batch's clicked weight over the known clicked weight
    (``known``: each row's weight where its conversion is known); 1 where no clicked row's
    conversion is known (every weight stays finite)."""
    clicked_weight = torch.where(clicked, ctr_mask, torch.zeros_like(ctr_mask)).sum()
    known_weight = torch.where(clicked, known, torch.zeros_like(known)).sum()
    return torch.where(
        known_weight > 0, clicked_weight / torch.where(known_weight > 0, known_weight, 1.0), 1.0
    ).detach()


def observed_conversions(
    ctr_label: torch.Tensor, ctr_mask: torch.Tensor, cvr_mask: torch.Tensor
) -> torch.Tensor:
    """ESCM2's observation indicator ``o_i / q̂`` ``[B]``: 1 / q̂ on clicked rows whose
    conversion is known (``cvr_mask > 0``), 0 elsewhere — an unclicked row is never an
    observed conversion, even where the data stores its conversion as 0 rather than null.

    The IPS / DR risks divide ``o_i`` by the probability that row i's conversion is observed.
    With conversions missing at random among clicked rows that probability is ``pCTR_i · q``
    (``q`` the known share of the clicked weight, estimated per batch as in
    :func:`ctcvr_weights`), not ``pCTR_i``: dividing by pCTR alone would shrink the risk's
    observed part by ``q`` and bias pCVR as dropping the unknown rows biases ESMM's CTCVR term.
    """
    clicked = ctr_label != 0
    known = ctr_mask * (clicked & (cvr_mask > 0)).to(ctr_mask.dtype)
    inverse = _inverse_known_share(clicked, ctr_mask, known)
    return torch.where(known > 0, inverse, torch.zeros_like(known))


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
