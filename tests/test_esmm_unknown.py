"""ESMM with unknown conversions (issue 26): clicked rows whose conversion is null carry no
CTCVR label, and the known clicked rows are reweighted by the inverse of their observed share
in the batch (:func:`mtl_dist.loop.losses.ctcvr_weights`), so the CTCVR estimate stays unbiased."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl_dist.loop.losses import (
    ctcvr_weights,
    escm2_dr_risk,
    escm2_ips_risk,
    esmm_ctcvr_loss,
    observed_conversions,
)


def _funnel(n: int, seed: int, click_bias: float = -0.8, d: int = 4):
    """Features, clicks and conversions; half the clicked rows' conversions unknown (MCAR)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = torch.tensor([0.8, -0.5, 0.3, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.4, -0.6, 0.7], dtype=torch.float64)
    click = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ a + click_bias)
    conv = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ b - 0.5)
    click, conv = click.double(), conv.double() * click.double()
    known = torch.where(click > 0, torch.rand(n, generator=g, dtype=torch.float64) < 0.5, True)
    return x, click, conv, known.double()


def _ctcvr(ctr, cvr, click, conv, cvr_mask):
    weight = ctcvr_weights(click, torch.ones_like(click), cvr_mask)
    return esmm_ctcvr_loss(ctr, cvr, click * conv, weight), weight


def _unweighted(ctr, cvr, click, conv, cvr_mask):
    """The previous treatment: unknown clicked rows dropped, no reweighting."""
    weight = ((click == 0) | (cvr_mask > 0)).double()
    return esmm_ctcvr_loss(ctr, cvr, click * conv, weight)


def test_reweighted_ctcvr_loss_matches_the_full_label_loss():
    n = 200_000
    x, click, conv, known = _funnel(n, 0)
    g = torch.Generator().manual_seed(1)
    ctr = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 0.8).requires_grad_()
    cvr = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 0.5).requires_grad_()
    full = esmm_ctcvr_loss(ctr, cvr, click * conv, torch.ones(n, dtype=torch.float64))
    fixed, weight = _ctcvr(ctr, cvr, click, conv, click * known)
    old = _unweighted(ctr, cvr, click, conv, click * known)
    # the known clicked rows stand for every clicked row: Σ weight = n exactly
    assert weight.sum().item() == n and (weight[(click > 0) & (known == 0)] == 0).all()
    assert abs(fixed.item() / full.item() - 1) < 0.01
    # the unweighted loss is off by the bias predicted from the dropped share q
    bce = -(
        click * conv * torch.log(torch.sigmoid(ctr) * torch.sigmoid(cvr))
        + (1 - click * conv) * torch.log1p(-torch.sigmoid(ctr) * torch.sigmoid(cvr))
    )
    q = (click * known).sum() / click.sum()
    unclicked, clicked = click == 0, click > 0
    predicted = (bce[unclicked].sum() + q * bce[clicked].sum()) / (
        unclicked.sum() + q * clicked.sum()
    )
    assert abs(old.item() / predicted.item() - 1) < 0.01
    assert abs(old.item() / full.item() - 1) > 0.05
    # and so is pCVR's gradient (a shared offset on every row's CVR logit)
    (g_full,) = torch.autograd.grad(full, cvr)
    (g_fixed,) = torch.autograd.grad(fixed, cvr)
    (g_old,) = torch.autograd.grad(old, cvr)
    g_full, g_fixed, g_old = g_full.sum().item(), g_fixed.sum().item(), g_old.sum().item()
    assert abs(g_fixed - g_full) < 0.2 * abs(g_old - g_full), (g_full, g_fixed, g_old)


def test_no_known_clicked_row_keeps_weights_finite():
    click = torch.tensor([1.0, 1.0, 0.0, 0.0])
    weight = ctcvr_weights(click, torch.ones(4), torch.zeros(4))  # q̂ = 0
    assert weight.tolist() == [0.0, 0.0, 1.0, 1.0]
    # no clicked row at all, and an all-zero batch
    assert ctcvr_weights(torch.zeros(3), torch.ones(3), torch.zeros(3)).tolist() == [1.0] * 3
    assert ctcvr_weights(torch.zeros(3), torch.zeros(3), torch.zeros(3)).tolist() == [0.0] * 3


def test_reweighting_multiplies_the_sample_weights():
    click = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ctr_mask = torch.tensor([2.0, 1.0, 1.0, 3.0])  # sample weights (the CTR task's mask)
    cvr_mask = torch.tensor([2.0, 0.0, 1.0, 0.0])  # row 1's conversion unknown
    weight = ctcvr_weights(click, ctr_mask, cvr_mask)
    # q̂ = (2 + 1) / (2 + 1 + 1): the known clicked rows carry the clicked weight 4
    torch.testing.assert_close(weight, torch.tensor([2 * 4 / 3, 0.0, 4 / 3, 3.0]))
    assert weight.sum().item() == ctr_mask.sum().item()


def _train(x, click, conv, cvr_mask, weights=ctcvr_weights, steps=300, batch=4096, seed=0):
    """Two logistic towers (pCTR, pCVR) on fixed features: CTR BCE + ESMM's CTCVR loss."""
    torch.manual_seed(seed)
    d = x.shape[1]
    w_ctr = torch.zeros(d + 1, dtype=torch.float64, requires_grad=True)
    w_cvr = torch.zeros(d + 1, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    opt = torch.optim.Adam([w_ctr, w_cvr], lr=0.05)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,))
        ctr, cvr = xb[i] @ w_ctr, xb[i] @ w_cvr
        loss = F.binary_cross_entropy_with_logits(ctr, click[i])
        weight = weights(click[i], torch.ones(batch, dtype=x.dtype), cvr_mask[i])
        loss = loss + esmm_ctcvr_loss(ctr, cvr, click[i] * conv[i], weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(xb @ w_cvr.detach())


def test_training_keeps_conversion_calibration_with_half_the_conversions_unknown():
    x, click, conv, known = _funnel(40_000, 3, click_bias=-0.6)
    clicked, observed = click > 0, (click > 0) & (known > 0)
    rate = conv[observed].mean()  # conversion over the known clicked rows

    def calibration(pcvr):
        return (pcvr[clicked].mean() / rate).item()

    fixed = calibration(_train(x, click, conv, click * known))
    full = calibration(_train(x, click, conv, click))  # every conversion known

    def dropped_only(ctr_label, ctr_mask, cvr_mask):  # the previous treatment: no reweighting
        return ctr_mask * ((ctr_label == 0) | (cvr_mask > 0)).to(ctr_mask.dtype)

    biased = calibration(_train(x, click, conv, click * known, dropped_only))
    c, q = click.mean().item(), (observed.sum() / clicked.sum()).item()
    assert abs(full - 1) < 0.05, full
    assert abs(fixed - 1) < 0.05, fixed
    assert biased < 0.8, biased
    # the bias predicted from the dropped share (exact for a constant click rate; here ~0.61)
    assert abs(biased - q / (1 - c + c * q)) < 0.08, (biased, q / (1 - c + c * q))


# ESCM2's IPS / DR risks: the same missing share completes their propensity (pCTR · q̂)


def test_observed_conversions_are_the_known_clicked_rows_over_their_share():
    click = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    cvr_mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # row 4: unclicked, conversion 0
    observed = observed_conversions(click, torch.ones(6), cvr_mask)
    # q̂ = 2 / 4: each known clicked row stands for 2; an unclicked row is never observed, even
    # with its conversion stored as 0 (not null) and so masked in
    assert observed.tolist() == [2.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    assert observed_conversions(click, torch.ones(6), torch.zeros(6)).tolist() == [0.0] * 6


def test_escm2_risks_with_half_the_conversions_unknown_match_the_full_label_risks():
    n = 200_000
    _, click, conv, known = _funnel(n, 5)
    g = torch.Generator().manual_seed(6)
    ctr = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 0.8
    cvr = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 0.5
    imputed = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 0.5
    ones = torch.ones(n, dtype=torch.float64)
    full_o = observed_conversions(click, ones, click)  # every clicked conversion known
    part_o = observed_conversions(click, ones, click * known)
    assert full_o.tolist() == click.tolist()
    q = ((click * known).sum() / click.sum()).item()
    full = escm2_ips_risk(ctr, cvr, conv, ones, full_o).item()
    fixed = escm2_ips_risk(ctr, cvr, conv, ones, part_o).item()
    old = escm2_ips_risk(ctr, cvr, conv, ones, click * known).item()  # propensity pCTR alone
    assert abs(fixed / full - 1) < 0.01, (fixed, full)
    assert abs(old / full - q) < 0.01, (old / full, q)  # shrunk by the known share
    full_dr, full_imp = (t.item() for t in escm2_dr_risk(ctr, cvr, imputed, conv, ones, full_o))
    dr, imp = (t.item() for t in escm2_dr_risk(ctr, cvr, imputed, conv, ones, part_o))
    assert abs(dr / full_dr - 1) < 0.01 and abs(imp / full_imp - 1) < 0.02, (dr, full_dr)
