"""Polarization cures, measured: on a two-task problem where a sharp MMoE gate collapses onto one
expert, expert dropout and entropy regularisation lower the mean max gate weight."""

import dataclasses

import pytest
import torch

from mtl_dist.models.gates import GateConfig
from mtl_dist.models.heads import MoE
from mtl_dist.models.outputs import Probes


def two_tasks(n: int, d: int = 16, rho: float = 0.5, seed: int = 0):
    """MMoE-paper style synthetic regression: tasks on directions with correlation ``rho``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    u1 = torch.randn(d, generator=g)
    u1 /= u1.norm()
    u2 = torch.randn(d, generator=g)
    u2 -= (u2 @ u1) * u1
    u2 /= u2.norm()
    ys = []
    for w in (u1, rho * u1 + (1 - rho**2) ** 0.5 * u2):
        s = x @ w
        ys.append(s + torch.sin(s) + 0.1 * torch.randn(n, generator=g))
    return x, torch.stack(ys, 1)


def mean_max_gate(gate: GateConfig, steps: int = 600, lr: float = 0.02) -> float:
    """Train a 4-expert MMoE; the mean (over tasks and samples) of each gate's largest weight."""
    torch.manual_seed(0)
    x, y = two_tasks(8192)
    head = MoE(16, ["a", "b"], 4, [16], [8], gate)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 8192, (256,), generator=g)
        out, aux, *_ = head(x[idx])
        loss = (out - y[idx]).square().mean() + aux.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        gates = head(x[:2048], Probes(gates=True)).gates
    return sum(w.max(-1).values.mean().item() for w in gates.values()) / 2


@pytest.fixture(scope="module")
def figures():
    base = GateConfig(temperature=0.1)  # a sharp gate: the plain MMoE polarizes
    cures = {
        "plain": {},
        "expert_dropout": {"expert_dropout": 0.1},
        "entropy": {"entropy_coef": 0.02},
    }
    out = {name: mean_max_gate(dataclasses.replace(base, **kw)) for name, kw in cures.items()}
    print("mean max gate weight:", {k: round(v, 3) for k, v in out.items()})
    return out


def test_plain_gate_polarizes(figures):
    assert figures["plain"] > 0.85


def test_expert_dropout_lowers_max_gate_weight(figures):
    assert figures["expert_dropout"] < figures["plain"] - 0.05


def test_entropy_regularisation_lowers_max_gate_weight(figures):
    assert figures["entropy"] < figures["plain"] - 0.3
