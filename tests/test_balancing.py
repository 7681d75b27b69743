"""Loss balancers against hand computations on tiny cases; negative downsampling's correction."""

import math

import pytest
import torch

from mtl_dist.balancing import DynamicWeightAverage, FixedWeights, GradNorm, UncertaintyWeighting
from mtl_dist.loop.losses import downsample_negatives, predictions
from tests.conftest import torchrun


def test_fixed_weights():
    total, w = FixedWeights([1.0, 0.5])(torch.tensor([2.0, 4.0]))
    assert total.item() == 4.0 and w.tolist() == [1.0, 0.5]


def test_uncertainty_weighting_forms_and_gradient():
    bal = UncertaintyWeighting([True, False])  # classification, regression
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.5, -0.2]))
    losses = torch.tensor([2.0, 3.0])
    total, w = bal(losses)
    # e^{-s1}·L1 + s1/2  +  ½e^{-s2}·L2 + s2/2
    expect = math.exp(-0.5) * 2 + 0.25 + 0.5 * math.exp(0.2) * 3 - 0.1
    assert total.item() == pytest.approx(expect, rel=1e-6)
    assert w.tolist() == pytest.approx([math.exp(-0.5), 0.5 * math.exp(0.2)], rel=1e-6)
    total.backward()  # d/ds = -c·e^{-s}·L + ½
    expect_grad = [-math.exp(-0.5) * 2 + 0.5, -0.5 * math.exp(0.2) * 3 + 0.5]
    assert bal.log_vars.grad.tolist() == pytest.approx(expect_grad, rel=1e-6)


def test_gradnorm_update_rule_by_hand():
    W = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    bal = GradNorm([1.0, 1.0], alpha=1.5, lr=0.1, shared=lambda: W)

    def losses() -> torch.Tensor:  # L_a = 3(W0 + W1): g_a = |(3, 3)| = 4.2426; L_b = W0: g_b = 1
        return torch.stack([3 * W.sum(), W[0]])

    _, w = bal(losses())
    assert w.tolist() == [1.0, 1.0]  # this step's loss uses the weights from before the update
    # step 1: r = (1, 1); G = (4.2426, 1), target = mean = 2.6213 → w -= 0.1·sign(G−t)·g
    # (0.57574, 1.1), renormalised to sum 2 → (0.68714, 1.31286)
    assert bal.weights.tolist() == pytest.approx([0.68714, 1.31286], abs=1e-5)
    with torch.no_grad():
        W.copy_(torch.tensor([2.0, 2.0]))  # L = (12, 2); ratios to L(0) = (9, 1): (1.3333, 2)
    _, w = bal(losses())
    assert w.tolist() == pytest.approx([0.68714, 1.31286], abs=1e-5)
    # r = (0.8, 1.2); G = (2.91529, 1.31286), Ḡ = 2.11407; target = Ḡ·r^1.5 = (1.51271, 2.77900)
    # w = (0.68714 − 0.42426, 1.31286 + 0.1) = (0.26288, 1.41286) → sum 2: (0.31375, 1.68625)
    assert bal.weights.tolist() == pytest.approx([0.31375, 1.68625], abs=1e-5)
    bal.eval()
    bal(losses())
    assert bal.weights.tolist() == pytest.approx([0.31375, 1.68625], abs=1e-5)  # no update


def test_dwa_weights_from_period_loss_ratios():
    bal = DynamicWeightAverage(2, temperature=2.0, period=2)
    seen = [bal(torch.tensor(v))[1].tolist() for v in ([4.0, 2.0], [2.0, 2.0])]
    seen += [bal(torch.tensor(v))[1].tolist() for v in ([1.0, 2.0], [2.0, 2.0])]
    assert seen == [[1.0, 1.0]] * 4  # the first two periods: weights 1
    # period means: (3, 2) then (1.5, 2): r = (0.5, 1) → w = 2·softmax(r / 2)
    e = [math.exp(0.25), math.exp(0.5)]
    expect = [2 * x / sum(e) for x in e]
    assert bal.weights.tolist() == pytest.approx(expect, rel=1e-6)
    state = bal.state_dict()
    again = DynamicWeightAverage(2, temperature=2.0, period=2)
    again.load_state_dict(state)
    assert again.periods == 2 and again.weights.tolist() == pytest.approx(expect, rel=1e-6)


def test_dwa_task_without_labels_for_a_period_stays_neutral_and_no_weight_reaches_zero():
    """3 tasks, period 5, conversion unlabelled for the 5 batches of period 2: its period mean
    is not a number (it used to be ~0, whose ratio gave it all the weight and the others
    exactly 0). Its ratio cannot be formed, so it stays neutral (r = 1); the others follow
    their own ratios."""
    bal = DynamicWeightAverage(3, temperature=2.0, period=5)
    losses = torch.tensor([0.6, 0.4, 1.0])
    labelled = torch.tensor([[8.0, 3.0, 8.0]])
    missing = torch.tensor([[8.0, 0.0, 8.0]])  # conversion: no labelled row on any rank
    seen = []
    for step in range(15):  # periods: P0 all labelled, P1 conversion missing, P2 all x 0.9
        period = step // 5
        if period == 1:
            bal(losses * torch.tensor([1.0, 0.0, 1.0]), missing, torch.tensor(True))
        else:
            bal(losses * (0.9 if period == 2 else 1.0), labelled, torch.tensor(True))
        seen.append(bal.weights.clone())
    # end of P1: ratios P1 / P0 = (1, n/a → 1, 1)
    assert seen[9].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    # end of P2: ratios P2 / P1 = (0.9, n/a → 1, 0.9): the old code divided 0.36 by P1's mean
    # of ~0 for conversion, giving it all the weight and click and watch exactly 0
    e = [math.exp(0.45), math.exp(0.5), math.exp(0.45)]
    assert bal.weights.tolist() == pytest.approx([3 * x / sum(e) for x in e], rel=1e-6)
    assert (torch.stack(seen) > 0.9).all()


def test_dwa_weights_never_reach_zero():
    """A ratio far from the others (a loss that jumped 100x) can no longer drive another
    task's weight to exactly 0: the floor is 1% of the neutral weight."""
    bal = DynamicWeightAverage(2, temperature=2.0, period=1)
    for v in ([1.0, 1.0], [1.0, 100.0], [1.0, 100.0]):
        bal(torch.tensor(v))
    assert bal.weights.min() >= 0.0099 and bal.weights.sum() == pytest.approx(2.0)


def test_gradnorm_task_without_labels_keeps_its_weight_and_is_left_out():
    W = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    bal = GradNorm([1.0, 1.0, 1.0], alpha=1.5, lr=0.1, shared=lambda: W)

    def losses(third: float) -> torch.Tensor:
        return torch.stack([3 * W.sum(), W[0], third * W[1]])

    bal(losses(0.0), torch.tensor([[4.0, 4.0, 0.0]]), torch.tensor(True))
    assert bal.weights[2].item() == 1.0  # kept as it was
    assert bal.initial_losses[2].item() == 0.0  # no reference loss from a label-less step
    # the two others moved as GradNorm of those two alone, renormalised to sum to 3 - 1
    assert bal.weights[:2].sum().item() == pytest.approx(2.0)
    assert bal.weights[0] < bal.weights[1]
    before = bal.weights.clone()
    bal(losses(float("nan")), torch.tensor([[4.0, 4.0, 4.0]]), torch.tensor(False))
    assert torch.equal(bal.weights, before)  # a non-finite step changes nothing


def test_every_balancer_on_two_ranks_with_a_task_missing_labels(tmp_path):
    """2 ranks under torchrun, different data per rank, conversion unlabelled on every rank for
    steps 10-29 and on rank 1 only for 30-39: every balancer's weights stay finite, positive
    and identical on both ranks; the uncertainty log-variance and the GradNorm weight of the
    unlabelled task do not move while it has no label anywhere (with the balancer's own
    learning rate at 0.5, the log-variance used to fall by ~0.5 per step)."""
    from tests.balancer_worker import NONE_ANYWHERE

    proc = torchrun(["tests/balancer_worker.py", str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, res in r0.items():
        w = res["weights"]
        assert torch.equal(w, r1[name]["weights"]), name
        assert torch.isfinite(w).all() and (w > 0).all(), (name, w.min())
        assert res["head_finite"] and r1[name]["head_finite"], name
        assert res["head_sum"] == r1[name]["head_sum"], name  # the same update on every rank
    a, b = NONE_ANYWHERE.start, NONE_ANYWHERE.stop  # steps [a, b): no conversion label at all
    log_vars = r0["uncertainty"]["log_vars"]  # after each step
    assert (log_vars[a - 1 : b, 1] == log_vars[a - 1, 1]).all(), log_vars[a - 1 : b, 1]
    assert log_vars[b, 1] != log_vars[a - 1, 1]  # it moves again once labels are back
    assert torch.equal(log_vars, r1["uncertainty"]["log_vars"])
    gradnorm = r0["gradnorm"]["weights"]  # before each step's update
    assert (gradnorm[a + 1 : b + 1, 1] == gradnorm[a + 1, 1]).all()
    assert r0["dwa"]["weights"].std() > 0  # DWA did move the others


def test_negative_downsampling_corrected_calibration():
    """A logistic model trained on negatives kept at rate 0.1 predicts ~3x too high; the
    correction p / (p + (1 - p) / r) brings calibration back within 2%."""
    g = torch.Generator().manual_seed(0)
    n, d, rate = 200_000, 8, 0.1
    x = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g) * 0.7
    y = (torch.rand(n, generator=g) < torch.sigmoid(x @ w_true - 2.5)).float()  # ~10% positive
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rates = torch.tensor([rate])
    for _ in range(300):
        mask = downsample_negatives(y[:, None], torch.ones(n, 1), rates)
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                model(x), y[:, None], weight=mask, reduction="sum"
            )
            / mask.sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    raw = predictions(logits, torch.tensor([True])).mean() / y.mean()
    corrected = predictions(logits, torch.tensor([True]), rates).mean() / y.mean()
    assert raw > 2.0, raw
    assert abs(corrected - 1) < 0.02, corrected


def test_escm2_dr_risk_by_hand():
    """R_DR = Σ [ê + o (e − ê) / p̂] / n over the exposures, ê = BCE(σ(imputed), pCVR); the
    imputation loss Σ o (e − ê)² / p̂ / n trains the imputation logits only, and the risk
    reaches the CVR logit of an unclicked row (through ê), which IPS never does."""
    from mtl_dist.loop.losses import escm2_dr_risk

    ctr = torch.tensor([0.0, math.log(0.25 / 0.75), -10.0, 2.0])  # pCTR 0.5, 0.25, ~0, 0.88
    cvr = torch.tensor([0.5, -1.0, 0.3, 0.0], requires_grad=True)
    imp = torch.tensor([1.0, -2.0, 0.0, 0.5], requires_grad=True)
    conv = torch.tensor([1.0, 0.0, 0.0, 0.0])
    exposures = torch.ones(4)
    observed = torch.tensor([1.0, 1.0, 0.0, 0.0])  # rows 2, 3 unclicked: no conversion known

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def bce(z, y):
        p = sig(z)
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    z, r, r_hat, prop = [0.5, -1.0, 0.3, 0.0], [1, 0], [sig(v) for v in imp.tolist()], [0.5, 0.25]
    e_hat = [bce(z[i], r_hat[i]) for i in range(4)]
    e = [bce(z[i], r[i]) for i in range(2)]
    expect_risk = (sum(e_hat) + sum((e[i] - e_hat[i]) / prop[i] for i in range(2))) / 4
    expect_imp = sum((e[i] - e_hat[i]) ** 2 / prop[i] for i in range(2)) / 4
    risk, imputation = escm2_dr_risk(ctr, cvr, imp, conv, exposures, observed)
    assert risk.item() == pytest.approx(expect_risk, rel=1e-5)
    assert imputation.item() == pytest.approx(expect_imp, rel=1e-5)
    (risk_grad_cvr,) = torch.autograd.grad(risk, cvr, retain_graph=True)
    assert risk_grad_cvr[2] != 0 and risk_grad_cvr[3] != 0  # unclicked rows train pCVR
    assert torch.autograd.grad(risk, imp, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(imputation, cvr, allow_unused=True)[0] is None
    # a right imputation (r̃ = the observed conversion) leaves no imputation loss on those rows
    exact = torch.tensor([20.0, -20.0, 0.0, 0.0])
    _, none_left = escm2_dr_risk(ctr, cvr.detach(), exact, conv, exposures, observed)
    assert none_left.item() < 1e-6


def test_escm2_ips_risk_by_hand():
    """Clicked rows with an observed conversion: BCE / max(pCTR, 0.05), summed over them and
    divided by the exposures; unclicked rows and a click with no observed conversion add 0."""
    from mtl_dist.loop.losses import escm2_ips_risk

    ctr = torch.tensor([0.0, math.log(0.25 / 0.75), -10.0, 2.0])  # pCTR 0.5, 0.25, ~0, 0.88
    cvr = torch.tensor([0.5, -1.0, 0.3, 0.0])
    conv = torch.tensor([1.0, 0.0, 1.0, 0.0])
    exposures = torch.ones(4)
    observed = torch.tensor([1.0, 1.0, 1.0, 0.0])  # row 3: clicked, conversion unknown
    risk = escm2_ips_risk(ctr, cvr, conv, exposures, observed)

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expect = (bce(0.5, 1) / 0.5 + bce(-1.0, 0) / 0.25 + bce(0.3, 1) / 0.05) / 4
    assert risk.item() == pytest.approx(expect, rel=1e-5)
    ctr.requires_grad_(True)
    cvr.requires_grad_(True)
    escm2_ips_risk(ctr, cvr, conv, exposures, observed).backward()
    assert ctr.grad is None and cvr.grad[3] == 0  # no gradient through the propensity
