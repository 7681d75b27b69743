"""Loss balancers against hand computations on tiny cases; negative downsampling's correction."""

import math

import pytest
import torch

from mtl_dist.balancing import DynamicWeightAverage, FixedWeights, GradNorm, UncertaintyWeighting
from mtl_dist.losses import downsample_negatives, predictions


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
