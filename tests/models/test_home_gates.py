"""HoME's feature gate (per-expert input scaling) and self-gate (own experts, sigmoid-weighted)."""

import pytest
import torch

from mtl_dist.config import ConfigError, load_config
from mtl_dist.models.build import build_ranker
from mtl_dist.models.experts import ExpertStyle, StackedMLP, fused_first_layer
from mtl_dist.models.gates import GateConfig
from mtl_dist.models.heads import PLE, STEM, MoE
from mtl_dist.models.ple import MixedExperts


def test_feature_gate_starts_as_identity_then_scales_each_group_by_hand():
    torch.manual_seed(0)
    gated = StackedMLP(3, 4, [5, 2], feature_gate_rank=2)
    plain = StackedMLP(3, 4, [5, 2])
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(6, 4)
    torch.testing.assert_close(gated(x), plain(x))  # B = 0: every gate is 1
    with torch.no_grad():
        gated.gate_up.normal_()
    out = gated(x)
    for g in range(3):  # x_g = x ⊙ 2σ(x A_g B_g), then group g's MLP
        xg = x * 2 * torch.sigmoid(x @ gated.gate_down[g] @ gated.gate_up[g])
        h = torch.relu(xg @ gated.weights[0][g] + gated.biases[0][g])
        expect = torch.relu(h @ gated.weights[1][g] + gated.biases[1][g])
        torch.testing.assert_close(out[g], expect)
    # per-group inputs [G, B, Din] (PLE's upper levels) take the same gate
    xs = torch.randn(3, 6, 4)
    xg = xs[1] * 2 * torch.sigmoid(xs[1] @ gated.gate_down[1] @ gated.gate_up[1])
    torch.testing.assert_close(
        gated(xs)[1], torch.relu(torch.relu(xg @ gated.weights[0][1] + gated.biases[0][1])
                                 @ gated.weights[1][1] + gated.biases[1][1])
    )  # fmt: skip
    with pytest.raises(ValueError, match="feature gates"):
        gated.forward_grouped(x, torch.zeros(6, dtype=torch.long))


def test_fused_first_layer_leaves_out_gated_modules_and_moe_stays_exact():
    torch.manual_seed(0)
    head = MoE(8, ["a", "b"], 3, [6], [4], style=ExpertStyle(feature_gate_rank=2))
    with torch.no_grad():
        head.experts.gate_up.normal_()
    x = torch.randn(5, 8)
    first = fused_first_layer(x, [head.experts, head.gates.logits])
    assert first[0] is None and first[1].shape == (5, 2 * 3)
    out, _, *_ = head(x)
    weights, _ = head.gates(x)
    mixed = torch.einsum("bge,ebh->gbh", weights, head.experts(x))
    torch.testing.assert_close(out, head.towers(mixed))


def _ple(self_gate: bool) -> PLE:
    torch.manual_seed(3)
    return PLE(
        6, ["dense", "sparse"], 1, MixedExperts(1, 1, [4], [3], GateConfig(), self_gate=self_gate)
    )


def test_self_gate_by_hand():
    head = _ple(True)
    x = torch.randn(5, 6)
    out, _, *_ = head(x)
    mods = head.levels[0]
    experts = mods["experts"](x)  # [Es + T·Et, B, H]: shared, then task 0's, task 1's
    w, _ = mods["task_gates"](x)  # [B, T, Es + Et]
    sg = mods["self_gates"].logits
    mixed = []
    for t in range(2):
        soft = w[:, t, :1] * experts[0] + w[:, t, 1:] * experts[1 + t]
        own = torch.sigmoid(x @ sg.weights[0][t] + sg.biases[0][t])  # [B, 1]
        mixed.append(soft + own * experts[1 + t])
    torch.testing.assert_close(out, head.towers(torch.stack(mixed)))


def test_self_gate_keeps_a_starved_task_training_its_own_expert():
    """The task gate puts ~all weight on the shared expert: without the self-gate the task's
    own expert gets almost no gradient from its loss; with it, a real one."""
    grads = {}
    for self_gate in (False, True):
        head = _ple(self_gate)
        with torch.no_grad():  # task gates: shared expert logit +20
            head.levels[0]["task_gates"].logits.biases[0][:, :, 0] = 20.0
        out, _, *_ = head(torch.randn(64, 6))
        out[:, 1].sum().backward()  # the sparse task's loss only
        w = head.levels[0]["experts"].weights[0].grad  # [3, Din, H]: shared, dense's, sparse's
        grads[self_gate] = w[2].abs().sum().item()
    assert grads[False] < 1e-6 and grads[True] > 1e-3, grads


def test_stem_self_gate_and_config():
    torch.manual_seed(0)
    head = STEM(6, 2, ["a", "b"], MixedExperts(1, 2, [4], [3], self_gate=True))
    out, _, *_ = head(torch.randn(5, 6), torch.randn(2, 5, 2))
    assert out.shape == (5, 2) and head.self_gates is not None
    z = torch.randn(5, head.self_gates.logits.weights[0].shape[1])  # the gates' input [B, Dz]
    w = head.self_gates.weights(z)  # [T, B, Et], independent sigmoids
    assert w.shape == (2, 5, 2) and bool(((w > 0) & (w < 1)).all())
    base = ["--config", "configs/default.toml"]
    with pytest.raises(ConfigError, match="needs model.head = ple or stem"):
        load_config([*base, "--model.experts.self_gate", "true"])
    with pytest.raises(ConfigError, match="not with top-k or Gumbel"):
        load_config([*base, "--model.experts.feature_gate_rank", "4", "--model.gate.top_k", "2"])
    cfg = load_config(
        [*base, "--model.head", "ple", "--model.experts.self_gate", "true",
         "--model.experts.feature_gate_rank", "4"]
    )  # fmt: skip
    model = build_ranker(cfg, "cpu")
    assert "self_gates" in model.head.levels[0] and model.head.levels[0]["experts"].feature_gated
