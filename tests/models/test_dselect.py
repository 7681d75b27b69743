"""DSelect-k (Hazimeh et al., NeurIPS 2021) against hand computations: the smooth step, a
selector's distribution over binary codes, the mix of k selectors, E not a power of 2, the
entropy regulariser, and MMoE / PLE heads with the gate."""

import math

import pytest
import torch

from mtl_dist.models.gates import GateConfig, Gates, smooth_step
from mtl_dist.models.heads import PLE, MoE


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
    for head in (MoE(6, ["a", "b"], 4, [8], [4], cfg), PLE(6, ["a", "b"], 2, 1, 2, [8], [4], cfg)):
        out, aux = head(torch.randn(16, 6))
        assert out.shape == (16, 2) and head.aux_names == ["dselect_entropy"]
        assert aux.shape == (1,) and aux.item() > 0
        (out.sum() + aux.sum()).backward()
        grads = [p.grad for p in head.gates.parameters()] if isinstance(head, MoE) else []
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dselect_replaces_the_softmax_gate_options():
    from mtl_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="replaces the softmax gate: not with gate_top_k"):
        load_config(["--config", "configs/default.toml", "--model.gate_dselect_k", "2",
                     "--model.gate_top_k", "2"])  # fmt: skip
