"""Representation-gradient balancers (MGDA-UB, IMTL-G, Aligned-MTL) against their papers'
defining properties on hand-made gradients, and through a real head's shared representation.
(Their 2-rank agreement: tests/test_balancing.py's torchrun test runs every balancer.)"""

import itertools

import pytest
import torch

from mtl_dist.balancing import IMTLG, MGDA, AlignedMTL
from mtl_dist.models.heads import MoE
from mtl_dist.models.outputs import Probes


def _gram(g: torch.Tensor) -> torch.Tensor:
    return g @ g.t()


def test_mgda_two_tasks_closed_form():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # ‖γ g1 + (1−γ) g2‖² is least at γ = 4/5
    w = MGDA(2, lambda: None).solve(_gram(g))
    assert w.tolist() == pytest.approx([1.6, 0.4])  # T · α


def test_mgda_finds_the_min_norm_point_of_the_simplex():
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    gram = _gram(g)
    alpha = MGDA(3, lambda: None).solve(gram) / 3
    best = min(
        (torch.tensor([a, b, 1 - a - b]) @ gram @ torch.tensor([a, b, 1 - a - b])).item()
        for a, b in itertools.product([i / 100 for i in range(101)], repeat=2)
        if a + b <= 1
    )
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    assert (alpha @ gram @ alpha).item() <= best + 1e-3


def test_imtl_g_equalises_the_projections_on_every_unit_gradient():
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    alpha = IMTLG(3, lambda: None).solve(_gram(g)) / 3
    assert alpha.sum().item() == pytest.approx(1.0)
    combined = alpha @ g
    proj = [(combined @ (gt / gt.norm())).item() for gt in g]
    assert proj == pytest.approx([proj[0]] * 3, rel=1e-4)


def test_aligned_mtl_makes_the_task_components_orthogonal_and_equal():
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    gram = _gram(g).double()
    bal = AlignedMTL(3, lambda: None)
    lam, vec = torch.linalg.eigh(gram)
    b = lam.min().sqrt() * vec @ torch.diag(lam.rsqrt()) @ vec.t()
    aligned = b.float() @ g  # ĝ_i = Σ_j B_ij g_j
    assert torch.allclose(aligned @ aligned.t(), lam.min().float() * torch.eye(3), atol=1e-4)
    assert torch.allclose(bal.solve(gram.float()), b.sum(0).float(), atol=1e-5)
    ortho = torch.eye(3) * 2.0  # orthogonal gradients of equal norm: weights 1
    assert bal.solve(_gram(ortho)).tolist() == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("cls", [MGDA, IMTLG, AlignedMTL])
def test_weights_come_from_the_heads_shared_representation(cls):
    torch.manual_seed(0)
    head = MoE(6, ["a", "b"], 3, [8], [4]).train()
    ranked = head(torch.randn(32, 6), Probes(shared=True))
    z = ranked.shared  # the experts' output [E, B, H], with its graph
    assert z.shape == (3, 32, 8) and z.requires_grad
    bal = cls(2, lambda: z).train()
    out = ranked.logits
    losses = torch.stack([out[:, 0].square().mean(), (out[:, 1] - 1).square().mean()])
    _, w = bal(losses)
    g = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses]
    )
    assert torch.allclose(w, cls(2, lambda: None).solve(g @ g.t()), atol=1e-5)
    # a task without labels keeps its weight; the other alone weighs 1
    _, w = bal(losses, labelled=torch.tensor([[32.0, 0.0]]))
    assert w[0].item() == pytest.approx(1.0) and w[1] == bal.weights[1]
