"""Sample weights make every loss a weighted mean ``Σ w·m·loss / Σ w·m`` (issue 24): the same
weight on every row, whatever its scale, gives the same losses and gradients, and a task whose
weights are all 0 gives 0 with a zero, finite gradient (not NaN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl_dist.loop.losses import (
    MIN_PROPENSITY,
    ctcvr_weights,
    escm2_dr_risk,
    escm2_ips_risk,
    esmm_ctcvr_loss,
    task_losses,
    weighted_mean,
)

SCALES = [1.0, 0.01, 1 / 40_000]
B = 64


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctr = torch.randn(B, generator=g, dtype=torch.float64)
    cvr = torch.randn(B, generator=g, dtype=torch.float64)
    imp = torch.randn(B, generator=g, dtype=torch.float64)
    click = (torch.rand(B, generator=g) < 0.4).double()
    conv = click * (torch.rand(B, generator=g) < 0.5).double()
    known = torch.rand(B, generator=g) < 0.8  # a label is missing on ~20% of the rows
    return ctr, cvr, imp, click, conv, known.double()


def _grads(fn, *inputs):
    """(value(s), gradients w.r.t. each input) of ``fn(*leaves)``, each output's separately."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = []
    for o in outs:
        gs = torch.autograd.grad(o.sum(), leaves, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(x) if gr is None else gr for gr, x in zip(gs, leaves)])
    return [o.detach() for o in outs], grads


def _same_at_every_scale(fn, inputs, weighted):
    """``fn(*inputs, weights)`` for ``weights = s · weighted`` gives the same at every scale s."""
    ref_out, ref_grads = _grads(lambda *x: fn(*x, SCALES[0] * weighted), *inputs)
    for s in SCALES[1:]:
        out, grads = _grads(lambda *x: fn(*x, s * weighted), *inputs)  # noqa: B023
        for a, b in zip(out, ref_out):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        for ga, gb in zip(grads, ref_grads):
            for a, b in zip(ga, gb):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_task_losses_do_not_depend_on_the_weights_scale():
    ctr, cvr, _, click, conv, known = _data()
    outputs = torch.stack([ctr, cvr, cvr * 2], 1)
    labels = torch.stack([click, conv, ctr + 0.3], 1)  # task 2: regression
    mask = torch.stack([torch.ones(B, dtype=torch.float64), click * known, known], 1)
    is_binary = torch.tensor([True, True, False])
    losses = task_losses(outputs, labels, mask * SCALES[-1], is_binary)
    assert (losses > 0.1).all()  # not shrunk towards 0 by small weights
    _same_at_every_scale(lambda out, w: task_losses(out, labels, w, is_binary), [outputs], mask)
    # float32 too (the training dtype): 1/40,000 is not rounded into a different mean
    o32, l32, m32 = outputs.float(), labels.float(), mask.float()
    ref = task_losses(o32, l32, m32, is_binary)
    for s in SCALES[1:]:
        torch.testing.assert_close(
            task_losses(o32, l32, m32 * s, is_binary), ref, rtol=1e-6, atol=0
        )


def test_esmm_ctcvr_loss_does_not_depend_on_the_weights_scale():
    ctr, cvr, _, click, conv, known = _data(1)
    weight = ctcvr_weights(click, torch.ones(B, dtype=torch.float64), click * known)
    _same_at_every_scale(lambda a, b, w: esmm_ctcvr_loss(a, b, click * conv, w), [ctr, cvr], weight)


def test_escm2_ips_risk_does_not_depend_on_the_weights_scale():
    ctr, cvr, _, click, conv, known = _data(2)
    observed = click * known
    _same_at_every_scale(
        lambda a, b, w: escm2_ips_risk(a, b, conv, w, observed),
        [ctr, cvr],
        torch.ones(B, dtype=torch.float64),
    )


def test_escm2_dr_risk_and_imputation_do_not_depend_on_the_weights_scale():
    ctr, cvr, imp, click, conv, known = _data(3)
    observed = click * known
    _same_at_every_scale(
        lambda a, b, c, w: escm2_dr_risk(a, b, c, conv, w, observed),
        [ctr, cvr, imp],
        torch.ones(B, dtype=torch.float64),
    )


def test_uniform_weights_of_three_scales_give_the_same_training():
    """A few SGD steps of a linear two-task model: the same parameters at every weight scale."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 5, generator=g)
    labels = (torch.rand(B, 2, generator=g) < 0.3).float()
    known = (torch.rand(B, 2, generator=g) < 0.7).float()
    is_binary = torch.tensor([True, True])
    finals = []
    for s in SCALES:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(5):
            opt.zero_grad()
            task_losses(model(x), labels, known * s, is_binary).sum().backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for f in finals[1:]:
        torch.testing.assert_close(f, finals[0], rtol=1e-5, atol=1e-6)


def test_weighted_mean_by_hand_with_non_uniform_weights_and_a_mask():
    outputs = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [2.0, -0.5], [0.0, 0.3]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.5], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    weight = torch.tensor([0.02, 0.5, 0.003, 0.1], dtype=torch.float64)
    known = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    mask = weight[:, None] * known
    losses = task_losses(outputs, labels, mask, torch.tensor([True, False]))
    bce = F.binary_cross_entropy_with_logits(outputs[:, 0], labels[:, 0], reduction="none")
    rows = [0, 1, 3]
    expect0 = sum(weight[i] * bce[i] for i in rows) / sum(weight[i] for i in rows)
    sq = (outputs[:, 1] - labels[:, 1]).square()
    rows = [0, 2, 3]
    expect1 = sum(weight[i] * sq[i] for i in rows) / sum(weight[i] for i in rows)
    torch.testing.assert_close(losses, torch.stack([expect0, expect1]), rtol=1e-12, atol=0)

    # ESCM2-IPS by hand: Σ m·o·BCE/p̂ / Σ m with weighted exposures m
    ctr = torch.tensor([0.0, -1.0, -10.0, 2.0], dtype=torch.float64)
    cvr = outputs[:, 0]
    conv = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    observed = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    prop = torch.sigmoid(ctr).clamp_min(MIN_PROPENSITY)
    e = F.binary_cross_entropy_with_logits(cvr, conv, reduction="none")
    expect = (weight * observed * e / prop).sum() / weight.sum()
    torch.testing.assert_close(escm2_ips_risk(ctr, cvr, conv, weight, observed), expect)

    # ESCM2-DR and the imputation loss by hand, the same denominator Σ m
    imp = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    e_hat = F.binary_cross_entropy_with_logits(cvr, torch.sigmoid(imp), reduction="none")
    o = weight * observed
    expect_dr = (weight * e_hat + o * (e - e_hat) / prop).sum() / weight.sum()
    expect_imp = (o * (e - e_hat).square() / prop).sum() / weight.sum()
    dr, imputation = escm2_dr_risk(ctr, cvr, imp, conv, weight, observed)
    torch.testing.assert_close(dr, expect_dr)
    torch.testing.assert_close(imputation, expect_imp)

    # ESMM's CTCVR term: Σ m·BCE(pCTR·pCVR) / Σ m
    p = torch.sigmoid(ctr) * torch.sigmoid(cvr)
    y = conv * (ctr > -5).double()
    expect = (weight * F.binary_cross_entropy(p, y, reduction="none")).sum() / weight.sum()
    torch.testing.assert_close(esmm_ctcvr_loss(ctr, cvr, y, weight), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_weights_give_zero_loss_and_zero_finite_gradient(dtype):
    ctr, cvr, imp, click, conv, known = (t.to(dtype) for t in _data(5))
    zeros = torch.zeros(B, dtype=dtype)
    outputs = torch.stack([ctr, cvr], 1)
    labels = torch.stack([click, conv], 1)
    mask = torch.stack([torch.ones(B, dtype=dtype) * 0.01, zeros], 1)  # task 1: weights all 0
    (losses,), ((g,),) = _grads(
        lambda out: task_losses(out, labels, mask, torch.tensor([True, True])), outputs
    )
    assert losses[1].item() == 0.0 and losses[0].item() > 0
    assert torch.isfinite(g).all() and g[:, 1].abs().sum() == 0 and g[:, 0].abs().sum() > 0

    def check(fn, *inputs):
        outs, grads = _grads(fn, *inputs)
        for o, gs in zip(outs, grads):
            assert o.item() == 0.0
            for gr in gs:
                assert torch.isfinite(gr).all() and gr.abs().sum() == 0

    check(lambda a, b: esmm_ctcvr_loss(a, b, click * conv, zeros), ctr, cvr)
    check(lambda a, b: escm2_ips_risk(a, b, conv, zeros, click * known), ctr, cvr)
    check(lambda a, b, c: escm2_dr_risk(a, b, c, conv, zeros, click * known), ctr, cvr, imp)


def test_weighted_mean_guards_only_zero():
    total = torch.tensor([3.0, 0.0, 1e-6])
    weight = torch.tensor([2.0, 0.0, 1e-6])
    torch.testing.assert_close(weighted_mean(total, weight), torch.tensor([1.5, 0.0, 1.0]))
