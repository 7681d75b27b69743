"""ESMM's and ESCM2's losses over the click → conversion funnel: the CTCVR term (Ma et al.,
SIGIR 2018), ESCM2's counterfactual IPS / DR risks (Wang et al., SIGIR 2022), and the row weights
that keep both unbiased when some clicked rows' conversions are unknown. Used by
:class:`mtl_dist.loop.losses.ModelWithLoss` when ``model.esmm.enabled``; shapes ``[B]`` → scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
