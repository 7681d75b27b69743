"""Stacked MLPs equal a per-group loop on the same weights; experts start different."""

import torch
import torch.nn.functional as F

from mtl_dist.models.experts import StackedMLP


def loop_mlp(mlp: StackedMLP, x_per_group: list[torch.Tensor]) -> torch.Tensor:
    """Reference: each group's MLP applied on its own, layer by layer with F.linear."""
    outs = []
    last = len(mlp.weights) - 1
    for g, x in enumerate(x_per_group):
        for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
            x = F.linear(x, w[g].t(), b[g, 0])
            if i < last or mlp.activate_last:
                x = torch.relu(x)
        outs.append(x)
    return torch.stack(outs)  # [G, B, H]


def test_stacked_mlp_shared_input_matches_loop():
    torch.manual_seed(0)
    mlp = StackedMLP(groups=5, in_dim=12, widths=[16, 8, 4])
    x = torch.randn(7, 12)
    torch.testing.assert_close(mlp(x), loop_mlp(mlp, [x] * 5), rtol=1e-5, atol=1e-6)
    for g in range(5):
        torch.testing.assert_close(
            mlp.forward_group(g, x), loop_mlp(mlp, [x] * 5)[g], rtol=1e-5, atol=1e-6
        )


def test_stacked_mlp_per_group_input_matches_loop():
    torch.manual_seed(1)
    mlp = StackedMLP(groups=3, in_dim=6, widths=[5, 1], activate_last=False)
    x = torch.randn(3, 9, 6)
    torch.testing.assert_close(mlp(x), loop_mlp(mlp, list(x)), rtol=1e-5, atol=1e-6)


def test_experts_start_different():
    """A constant init would make every expert identical (a known peer bug)."""
    torch.manual_seed(2)
    mlp = StackedMLP(groups=8, in_dim=10, widths=[6, 4])
    for w in mlp.weights:
        flat = w.reshape(8, -1)
        dist = torch.cdist(flat, flat) + torch.eye(8) * 1e9
        assert dist.min() > 1e-3


def test_per_group_batch_norm_matches_each_groups_own_norm():
    torch.manual_seed(3)
    mlp = StackedMLP(groups=3, in_dim=6, widths=[5, 1], activate_last=False, batch_norm=True)
    x = torch.randn(3, 40, 6)
    out = mlp(x)  # training mode: batch statistics per group and feature
    for g in range(3):
        h = F.linear(x[g], mlp.weights[0][g].t(), mlp.biases[0][g, 0])
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        ref = F.linear(torch.relu(h), mlp.weights[1][g].t(), mlp.biases[1][g, 0])
        torch.testing.assert_close(out[g], ref, rtol=1e-4, atol=1e-5)
