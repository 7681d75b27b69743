"""Parameter-gradient balancers (PCGrad, CAGrad) against their papers' rules on hand-made
gradients, and writing the shared parameters' gradient through the dense optimizer's step.
(Their 2-rank agreement, weights and parameters alike: tests/test_balancing.py.)"""

import itertools

import pytest
import torch

from mtl_dist.balancing import CAGrad, PCGrad

ALL = torch.tensor([True, True])


def test_pcgrad_projects_conflicting_gradients_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1·g2 = −1: they conflict
    # g1 − (−1/2) g2 = [0.5, 0.5]; g2 − (−1/1) g1 = [0, 1]; summed
    assert PCGrad(2, list).combine(g, ALL).tolist() == pytest.approx([0.5, 1.5])
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: the plain sum
    assert PCGrad(2, list).combine(agree, ALL).tolist() == pytest.approx([2.0, 1.0])
    # a task without labels (zero gradient) is left out
    out = PCGrad(2, list).combine(g, torch.tensor([True, False]))
    assert out.tolist() == pytest.approx([1.0, 0.0])


def test_cagrad_minimises_its_objective_and_reduces_to_the_sum_at_c_zero():
    g = torch.tensor([[1.0, 0.0, 0.5], [-0.8, 1.0, 0.0], [0.2, -0.3, 1.0]])
    assert CAGrad(3, list, c=0.0).combine(g, torch.ones(3, dtype=torch.bool)).tolist() == (
        pytest.approx(g.sum(0).tolist(), abs=1e-6)
    )
    bal = CAGrad(3, list, c=0.5)
    gram = (g @ g.t()).double()
    mean = torch.full((3,), 1 / 3, dtype=torch.float64)
    phi = 0.25 * float(mean @ gram @ mean)

    def objective(w):
        return float(w @ gram @ mean) + phi**0.5 * float(w @ gram @ w) ** 0.5

    coef = bal.coefficients(gram)
    lam_w = coef * (1 + 0.25) - mean  # λ·w
    w = lam_w / lam_w.sum()
    grid = [torch.tensor([a, b, 1 - a - b], dtype=torch.float64)
            for a, b in itertools.product([i / 50 for i in range(51)], repeat=2) if a + b <= 1]  # fmt: skip
    assert objective(w) <= min(objective(x) for x in grid) + 1e-3
    d = bal.combine(g, torch.ones(3, dtype=torch.bool))
    assert torch.allclose(d, (3 * coef).float() @ g, atol=1e-5)
    assert torch.allclose(bal.weights, (3 * coef).float(), atol=1e-6)
    # the update conflicts less than the mean: no task's gradient is opposed by it
    assert min(float(d @ gi) for gi in g) > min(float(g.sum(0) @ gi) for gi in g)


def test_the_combined_gradient_replaces_the_shared_parameters_gradient():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 2)
    own = torch.nn.Linear(2, 1)
    bal = PCGrad(2, lambda: list(shared.parameters())).train()
    x = torch.randn(8, 3)
    h = shared(x)
    losses = torch.stack([own(h).mean(), -h.mean()])
    loss, w = bal(losses)
    assert w.tolist() == [1.0, 1.0]
    loss.backward()
    plain = shared.weight.grad.clone()
    bal.before_step()
    g = torch.stack([torch.cat([t.flatten() for t in torch.autograd.grad(
        li, list(shared.parameters()), retain_graph=True)]) for li in torch.stack(
        [own(shared(x)).mean(), -shared(x).mean()])])  # fmt: skip
    want = PCGrad(2, list).combine(g, ALL)
    assert torch.allclose(shared.weight.grad.flatten(), want[:6], atol=1e-6)
    assert not torch.allclose(shared.weight.grad, plain)  # they conflicted: it changed
    assert own.weight.grad is not None  # task-specific parameters keep their own gradient
