"""Batched experts / gates / towers equal a straightforward per-expert loop on the same weights."""

import torch
import torch.nn.functional as F

from mtl_dist.models.experts import StackedMLP
from mtl_dist.models.heads import MMoE


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


def test_stacked_mlp_per_group_input_matches_loop():
    torch.manual_seed(1)
    mlp = StackedMLP(groups=3, in_dim=6, widths=[5, 1], activate_last=False)
    x = torch.randn(3, 9, 6)
    torch.testing.assert_close(mlp(x), loop_mlp(mlp, list(x)), rtol=1e-5, atol=1e-6)


def loop_mmoe(head: MMoE, x: torch.Tensor) -> torch.Tensor:
    """Reference MMoE: loop over experts, then over tasks (gate, mix, tower)."""
    E = head.experts.groups
    experts = loop_mlp(head.experts, [x] * E)  # [E, B, H]
    T = head.gates.num_tasks
    w = head.gates.proj.weight.view(T, E, -1)
    b = head.gates.proj.bias.view(T, E)
    outs = []
    for t in range(T):
        gate = torch.softmax(F.linear(x, w[t], b[t]) / head.gates.temperature, dim=-1)  # [B, E]
        mixed = sum(gate[:, e : e + 1] * experts[e] for e in range(E))  # [B, H]
        tower_in = [mixed if g == t else torch.zeros_like(mixed) for g in range(T)]
        outs.append(loop_mlp(head.towers, tower_in)[t, :, 0])
    return torch.stack(outs, dim=1)  # [B, T]


def test_mmoe_matches_loop_reference_and_gates_are_distributions():
    torch.manual_seed(2)
    head = MMoE(
        in_dim=10,
        num_tasks=3,
        num_experts=4,
        expert_hidden=[16, 8],
        tower_hidden=[6],
        gate_temperature=2.0,
    )
    x = torch.randn(11, 10)
    out, gates = head(x)
    assert out.shape == (11, 3) and gates.shape == (11, 3, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(11, 3))
    torch.testing.assert_close(out, loop_mmoe(head, x), rtol=1e-5, atol=1e-5)


def test_mmoe_batch_of_one_and_gradients_reach_every_expert():
    torch.manual_seed(3)
    head = MMoE(in_dim=4, num_tasks=2, num_experts=3, expert_hidden=[8], tower_hidden=[4])
    out, _ = head(torch.randn(1, 4))
    assert out.shape == (1, 2)
    out.sum().backward()
    first = head.experts.weights[0].grad
    assert first is not None and all(first[e].abs().sum() > 0 for e in range(3))
    assert head.gates.proj.weight.grad.abs().sum() > 0
