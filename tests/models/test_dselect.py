"""DSelect-k (Hazimeh et al., NeurIPS 2021) against hand computations: the smooth step, a
selector's distribution over binary codes, the mix of k selectors, E not a power of 2, the
entropy regulariser, and MMoE / PLE heads with the gate."""

import math

import pytest
import torch

from mtl_dist.models.gates import GateConfig, Gates, smooth_step
from mtl_dist.models.heads import PLE, MoE
from mtl_dist.models.ple import MixedExperts


def test_smooth_step_by_hand():
    t = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0])
    expect = [0.0, 0.0, 0.5, -2 * 0.25**3 + 1.5 * 0.25 + 0.5, 1.0, 1.0]
    assert smooth_step(t, 1.0).tolist() == pytest.approx(expect)


def _gate(num_experts: int, k: int, bias: list[float], coef: float = 0.0) -> Gates:
    """One gate whose logits are the constant ``bias`` (zero weights): ``[k·(m+1)]``."""
    g = Gates(3, 1, num_experts, GateConfig(dselect_k=k, dselect_entropy_coef=coef))
    with torch.no_grad():
        g.logits.weights[-1].zero_()
        g.logits.biases[-1].copy_(torch.tensor(bias).view(1, 1, -1))
    return g


def test_one_selector_picks_the_expert_of_its_code():
    # E = 4, m = 2: S(z) = [1, 0] is code (bit0=1, bit1=0) = expert 1
    w, _ = _gate(4, 1, [5.0, -5.0, 0.0])(torch.randn(2, 3))
    assert w[:, 0].tolist() == [[0.0, 1.0, 0.0, 0.0]] * 2
    w, _ = _gate(4, 1, [0.0, 0.0, 0.0])(torch.randn(2, 3))  # S = ½: every code ¼
    assert w[0, 0].tolist() == pytest.approx([0.25] * 4)


def test_k_selectors_mix_by_their_softmax():
    # selector 0 → expert 3 (codes 1, 1), selector 1 → expert 0; α = [0, ln 3] → [¼, ¾]
    w, _ = _gate(4, 2, [5.0, 5.0, -5.0, -5.0, 0.0, math.log(3)])(torch.randn(1, 3))
    assert w[0, 0].tolist() == pytest.approx([0.75, 0.0, 0.0, 0.25])


def test_experts_not_a_power_of_two_renormalise():
    # E = 3, m = 2, S = ½: ¼ on each of the 3 codes in use, the 4th dropped → ⅓ each
    w, _ = _gate(3, 1, [0.0, 0.0, 0.0])(torch.randn(1, 3))
    assert w[0, 0].tolist() == pytest.approx([1 / 3] * 3)


def test_entropy_regulariser_is_the_selectors_mean_entropy():
    _, aux = _gate(4, 1, [0.0, 0.0, 0.0], coef=0.5)(torch.randn(2, 3))
    assert aux["dselect_entropy"].item() == pytest.approx(0.5 * math.log(4))
    _, aux = _gate(4, 1, [5.0, -5.0, 0.0], coef=0.5)(torch.randn(2, 3))
    assert aux["dselect_entropy"].item() == pytest.approx(0.0, abs=1e-6)  # one-hot: 0


def test_heads_with_dselect_train_and_report_the_regulariser():
    cfg = GateConfig(dselect_k=2, dselect_entropy_coef=0.01)
    torch.manual_seed(0)
    for head in (
        MoE(6, ["a", "b"], 4, [8], [4], cfg),
        PLE(6, ["a", "b"], 2, MixedExperts(1, 2, [8], [4], cfg)),
    ):
        out, aux, *_ = head(torch.randn(16, 6))
        assert out.shape == (16, 2) and head.aux_names == ["dselect_entropy"]
        assert aux.shape == (1,) and aux.item() > 0
        (out.sum() + aux.sum()).backward()
        grads = [p.grad for p in head.gates.parameters()] if isinstance(head, MoE) else []
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dselect_replaces_the_softmax_gate_options():
    from mtl_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="replaces the softmax gate: not with model.gate.top_k"):
        load_config(["--config", "configs/default.toml", "--model.gate.dselect_k", "2",
                     "--model.gate.top_k", "2"])  # fmt: skip


# issue 26: E not a power of 2 — a selector on an unused code must not leave the gate all zero


def _dselect(num_experts: int, k: int, gates: int = 2, gamma: float = 1.0) -> Gates:
    torch.manual_seed(num_experts * 10 + k)
    return Gates(5, gates, num_experts, GateConfig(dselect_k=k, dselect_gamma=gamma))


@pytest.mark.parametrize("num_experts", range(1, 10))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weights_sum_to_one_for_every_sample(num_experts, k):
    g = _dselect(num_experts, k)
    for scale in (0.1, 1.0, 10.0, 1e3, 1e6):  # up to saturating every smooth step at 0 / 1
        x = torch.randn(64, 5) * scale
        w, _ = g(x)
        assert w.shape == (64, 2, num_experts)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(64, 2), atol=1e-5), (num_experts, k, scale)


@pytest.mark.parametrize("num_experts", range(1, 10))
def test_every_code_saturated_still_sums_to_one(num_experts):
    # each selector driven (±50 ≫ γ/2) onto each of the 2^m codes, used or not
    m = max(1, math.ceil(math.log2(num_experts)))
    for code in range(2**m):
        bits = [50.0 if code >> j & 1 else -50.0 for j in range(m)]
        w, _ = _gate(num_experts, 1, [*bits, 0.0])(torch.randn(3, 3))
        assert torch.allclose(w.sum(-1), torch.ones(3, 1), atol=1e-6), (num_experts, code)
        if code < num_experts:  # a used code: exactly its expert
            assert w[0, 0].tolist() == [1.0 if e == code else 0.0 for e in range(num_experts)]
        else:  # an unused code: its mass shared evenly
            assert w[0, 0].tolist() == pytest.approx([1 / num_experts] * num_experts)


def test_one_expert_always_weighs_one():
    for k in (1, 2):
        g = _dselect(1, k)
        w, _ = g(torch.randn(16, 5) * 1e4)
        assert w.shape == (16, 2, 1) and torch.allclose(w, torch.ones_like(w))


def _grad_norm(g: Gates, x: torch.Tensor) -> float:
    """The gate parameters' gradient norm under a loss that prefers expert 0."""
    g.zero_grad()
    w, _ = g(x)
    target = torch.arange(w.shape[-1], dtype=w.dtype)  # expert e costs e
    (w * target).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
    assert torch.isfinite(grads).all()
    return float(grads.norm())


@pytest.mark.parametrize("num_experts", [3, 5, 6, 7])
def test_a_selector_on_an_unused_code_keeps_a_gradient(num_experts):
    m = math.ceil(math.log2(num_experts))
    unused = 2**m - 1  # all bits 1: unused for every E here
    # in the smooth step (|z| < γ/2), mostly on the unused code: the gradient moves it off
    g = _gate(num_experts, 1, [0.4] * m + [0.0])
    w, _ = g(torch.randn(4, 3))
    assert torch.allclose(w.sum(-1), torch.ones(4, 1), atol=1e-6)
    g.logits.weights[-1].requires_grad_(True)
    assert _grad_norm(g, torch.randn(4, 3)) > 0
    # saturated on it (k = 2, the other selector on expert 0): the mix still learns
    bits = [50.0 if unused >> j & 1 else -50.0 for j in range(m)]
    g = _gate(num_experts, 2, [*bits, *([-50.0] * m), 0.0, 0.0])
    w, _ = g(torch.randn(4, 3))
    assert torch.allclose(w.sum(-1), torch.ones(4, 1), atol=1e-6)
    assert w[0, 0, 0].item() == pytest.approx(0.5 + 0.5 / num_experts)
    assert _grad_norm(g, torch.randn(4, 3)) > 0


def test_the_three_expert_gate_keeps_its_sum_while_training():
    # the run: 3 experts, selectors pushed hard; the mean weight sum stays 1
    torch.manual_seed(0)
    g = Gates(8, 2, 3, GateConfig(dselect_k=2))
    opt = torch.optim.SGD(g.parameters(), lr=1.0)
    for _ in range(60):
        x = torch.randn(32, 8)
        w, _ = g(x)
        (w[..., 2] - w[..., 0]).sum().backward()  # expert 0 good, 2 bad
        opt.step()
        opt.zero_grad()
        assert torch.allclose(w.detach().sum(-1), torch.ones(32, 2), atol=1e-5)


def test_expert_dropout_renormalises_tiny_kept_mass_to_one():
    from mtl_dist.models.gates import expert_dropout

    torch.manual_seed(0)
    w = torch.softmax(torch.tensor([[0.0, -40.0, -45.0, -50.0]]).repeat(256, 1), -1)
    out = expert_dropout(w, 0.5)  # rows that lost expert 0 keep only ~1e-18 of mass
    assert torch.isfinite(out).all()
    assert torch.allclose(out.sum(-1), torch.ones(256), atol=1e-5)
