"""The loss-only balancers added with issue 17 (RLW, GLS, STCH, FAMO) against their papers'
formulas on hand-made losses: weights, the gradient they give, a task without labels, a
non-finite step, and an exact resume from the state dict. (Their 2-rank agreement is in
tests/test_balancing.py's torchrun test, which runs every registered balancer.)"""

import math

import pytest
import torch

from mtl_dist.balancing import (
    FAMO,
    REGISTRY,
    GeometricLoss,
    RandomLossWeighting,
    SmoothTchebycheff,
)
from mtl_dist.config import BALANCERS

L = torch.tensor


def test_registry_is_the_config_list():
    assert list(REGISTRY) == BALANCERS


def test_rlw_draws_softmax_of_a_normal_by_step_and_resumes_exactly():
    bal = RandomLossWeighting(3).train()
    ws = [bal(L([1.0, 2.0, 3.0]))[1] for _ in range(3)]
    for k, w in enumerate(ws):
        z = torch.randn(3, generator=torch.Generator().manual_seed(k))
        assert torch.allclose(w, 3 * torch.softmax(z, 0))
    assert not torch.equal(ws[0], ws[1])
    resumed = RandomLossWeighting(3).train()
    resumed.load_state_dict(bal.state_dict())
    assert torch.equal(resumed(L([1.0, 1, 1]))[1], bal(L([1.0, 1, 1]))[1])
    assert bal.eval()(L([1.0, 1, 1]))[1].tolist() == [1, 1, 1]


def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    total, w = GeometricLoss(2).train()(losses)
    assert w.tolist() == pytest.approx([2.0, 0.5])  # G / L_t, G = sqrt(1 · 4)
    total.backward()
    x = torch.tensor([1.0, 4.0], requires_grad=True)
    (2 * (x[0] * x[1]).sqrt()).backward()  # T · (Π L)^{1/T}
    assert torch.allclose(losses.grad, x.grad)


def test_gls_task_without_labels_or_a_nonfinite_step_keeps_weights():
    bal = GeometricLoss(3).train()
    bal(L([1.0, 4.0, 2.0]))
    before = bal.weights.clone()
    w = bal(L([2.0, 0.0, 8.0]), labelled=L([[5.0, 0.0, 5.0]]))[1]
    assert w[1] == before[1] and w[0] == pytest.approx(2.0) and w[2] == pytest.approx(0.5)
    assert torch.equal(bal(L([1.0, math.nan, 1.0]), finite=L(False))[1], w)


def test_stch_is_the_gradient_of_a_smooth_max_of_normalised_losses():
    bal = SmoothTchebycheff(2, mu=0.5).train()
    w0 = bal(L([0.5, 2.0]))[1]  # first losses: λ = [2, 0.5]; λL equal → uniform softmax
    assert w0.tolist() == pytest.approx([2.0, 0.5])
    losses = torch.tensor([0.5, 4.0], requires_grad=True)
    total, w = bal(losses)
    lam = torch.tensor([2.0, 0.5])
    soft = torch.softmax(lam * losses.detach() / 0.5, 0)  # scores [2, 4]
    assert w.tolist() == pytest.approx((2 * soft * lam).tolist())
    x = torch.tensor([0.5, 4.0], requires_grad=True)
    (2 * 0.5 * torch.logsumexp(lam * x / 0.5, 0)).backward()  # T · μ log Σ exp(λL/μ)
    total.backward()
    assert torch.allclose(losses.grad, x.grad)


def test_famo_update_by_hand_and_resume():
    bal = FAMO(2, lr=0.025, weight_decay=0.0).train()
    assert bal(L([1.0, 1.0]))[1].tolist() == pytest.approx([1.0, 1.0])
    state = {k: v.clone() for k, v in bal.state_dict().items()}
    w = bal(L([0.5, 1.0]))[1]
    # δ = log D(before) − log D(after) = [log 2, 0]; ∇ξ = z ⊙ (δ − z·δ) at z = ½: ±0.1733;
    # Adam's first step moves ξ by lr · sign: ξ = [−0.025, +0.025]
    z = torch.softmax(torch.tensor([-0.025, 0.025]), 0)
    share = z / torch.tensor([0.5, 1.0])
    assert w.tolist() == pytest.approx((2 * share / share.sum()).tolist(), rel=1e-5)
    assert bal.logits.tolist() == pytest.approx([-0.025, 0.025], rel=1e-4)
    resumed = FAMO(2, lr=0.025, weight_decay=0.0).train()
    resumed.load_state_dict(state)
    assert torch.equal(resumed(L([0.5, 1.0]))[1], w)


def test_famo_task_without_labels_is_left_out_of_the_update():
    bal = FAMO(3, lr=0.025, weight_decay=0.001).train()
    bal(L([1.0, 1.0, 1.0]))
    w = bal(L([0.5, 0.0, 1.0]), labelled=L([[4.0, 0.0, 4.0]]))[1]
    assert w[1] == 1.0  # kept; not handed the weight a near-zero loss would draw
    assert torch.isfinite(w).all() and (w > 0).all() and w[0] > w[2]
    before = {k: v.clone() for k, v in bal.state_dict().items()}
    bal(L([math.nan, 1.0, 1.0]), finite=L(False))
    assert all(torch.equal(v, bal.state_dict()[k]) for k, v in before.items())
