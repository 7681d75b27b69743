"""Every balancer when one task's gradient (and loss) is 1e4× the others' (issue 26): weights and
combined gradients stay finite, and the solvers' tolerances are relative, not float32 floors
that such a gap crosses. Aligned-MTL's small tasks keep O(1) weights (it balances the
combination's components along every task), where its float32 rank tolerance once dropped them
to ~0 or below. Single process, through a real head's shared representation and parameters."""

import pytest
import torch

from mtl_dist.balancing import IMTLG, MGDA, REGISTRY, AlignedMTL, CAGrad, PCGrad, build_balancer
from mtl_dist.config import LossConfig, TaskSpec
from mtl_dist.models.heads import MoE
from mtl_dist.models.outputs import Probes

GAP = 1e4
TASKS = [TaskSpec(name="click"), TaskSpec(name="conversion"), TaskSpec(name="watch")]
SHARED: dict[int, torch.Tensor] = {}  # the last forward's shared representation, per head


def _losses(head: MoE, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Task 0's loss (and so its gradient) GAP× the others'; ``scale`` multiplies them all."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=gen)
    y = torch.randn(64, 3, generator=gen)
    ranked = head(x, Probes(shared=True))
    out, SHARED[id(head)] = ranked.logits, ranked.shared
    per_task = (out - y).square().mean(0)  # [3]
    return per_task * torch.tensor([GAP, 1.0, 1.0]) * scale


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("scale", [1.0, 1e-6])  # also with the small tasks' grads ~1e-12 in ‖·‖²
def test_every_balancer_stays_finite_at_a_1e4_gap(name, scale):
    torch.manual_seed(0)
    head = MoE(6, [t.name for t in TASKS], 3, [8], [4]).train()
    bal = build_balancer(
        LossConfig(balancer=name), TASKS, lambda: head, lambda: SHARED.get(id(head))
    ).train()
    for step in range(3):
        head.zero_grad()
        loss, w = bal(_losses(head, step, scale))
        assert torch.isfinite(loss) and torch.isfinite(w).all(), (name, step, w)
        loss.backward()
        bal.before_step()  # the parameter balancers write the combined gradient here
        for p in head.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    if name == "aligned_mtl":  # through the head too: the small tasks keep O(1) weights
        assert (w > 0).all() and (w[1:] > 0.3).all() and w[0] < 1e-2, w


def _gap_gradients(seed: int, n: int = 256, scale: float = 1.0) -> torch.Tensor:
    g = torch.randn(3, n, generator=torch.Generator().manual_seed(seed)) * scale
    g[0] *= GAP
    return g


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_aligned_mtl_keeps_the_small_tasks_weights(seed, scale):
    g = _gap_gradients(seed, scale=scale)
    gram = g @ g.t()  # float32, as a caller without the float64 update might pass
    w = AlignedMTL(3, lambda: None).solve(gram)
    assert torch.isfinite(w).all() and (w > 0).all(), w
    assert (w[1:] > 0.3).all(), w  # O(1), not ~0 (the bug: −1.6e-8, −3.7e-6)
    assert w[0] < 1e-3, w  # the large task weighs ~1/GAP
    # its defining property: the combination's projection on each task is balanced — the
    # aligned components B g are orthogonal with equal norms, so every w_t g_t-part counts
    g64 = g.double()
    d = w.double() @ g64
    proj = (g64 @ d) / g64.norm(dim=1) ** 2 * g64.norm(dim=1)  # ⟨g_t, d⟩ / ‖g_t‖
    rel = proj / g64.norm(dim=1)  # ≈ w_t (near-orthogonal tasks): each task's own share
    assert torch.allclose(rel.float(), w, rtol=0.2, atol=1e-5)


def test_aligned_mtl_drops_only_true_rank_deficiency():
    g = _gap_gradients(0)
    g[2] = g[1]  # two equal small tasks: one component, not a noise eigenvalue
    w = AlignedMTL(3, lambda: None).solve(g @ g.t())
    assert torch.isfinite(w).all() and (w > 0).all(), w
    assert w[1].item() == pytest.approx(w[2].item(), rel=1e-4)


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_representation_solvers_are_scale_free_at_a_gap(scale):
    g = _gap_gradients(1, scale=scale)
    ref = _gap_gradients(1)
    for cls in (MGDA, IMTLG, AlignedMTL):
        bal = cls(3, lambda: None)
        w, w_ref = bal.solve((g @ g.t()).double()), bal.solve((ref @ ref.t()).double())
        assert torch.isfinite(w).all(), cls
        assert torch.allclose(w, w_ref, rtol=1e-4, atol=1e-8), (cls, w, w_ref)
    alpha = MGDA(3, lambda: None).solve((g @ g.t()).double()) / 3
    assert (alpha >= 0).all() and alpha.sum().item() == pytest.approx(1.0)
    assert alpha[0] < 1e-4  # the min-norm point leans on the small tasks


@pytest.mark.parametrize("scale", [1.0, 1e-12])
def test_parameter_balancers_at_a_gap(scale):
    g = _gap_gradients(2)
    g[1] = -0.5 * g[1] - 1e-4 * g[0] / GAP  # a small task conflicting with the large one
    ok = torch.ones(3, dtype=torch.bool)
    # both are homogeneous in the gradients: scaling them all scales PCGrad's sum and leaves
    # CAGrad's coefficients — down to small tasks' ‖g‖² ~ 1e-20, where absolute floors were
    pc, pc_ref = PCGrad(3, list).combine(g * scale, ok), PCGrad(3, list).combine(g, ok)
    assert torch.isfinite(pc).all()
    assert torch.allclose(pc.double() / scale, pc_ref.double(), rtol=1e-4, atol=1e-6)
    ca, ca_ref = CAGrad(3, list, c=0.4), CAGrad(3, list, c=0.4)
    d = ca.combine(g * scale, ok)
    ca_ref.combine(g, ok)
    assert torch.isfinite(d).all() and torch.isfinite(ca.weights).all()
    assert torch.allclose(ca.weights, ca_ref.weights, rtol=1e-4), (ca.weights, ca_ref.weights)
