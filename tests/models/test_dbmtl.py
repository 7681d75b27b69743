"""DBMTL's dependent towers: hand-computed forward, parents' gradients, config parsing."""

import graphlib

import pytest
import torch

from mtl_dist.config import ConfigError, load_config, task_parents
from mtl_dist.models.build import build_head
from mtl_dist.models.dependent import DependentTowers
from mtl_dist.models.heads import MoE, SharedBottom


def _set(towers: DependentTowers) -> None:
    """Every weight and bias a distinct small number, so a wrong wiring changes the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in towers.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def test_forward_by_hand():
    """Task 1 reads task 0's relation output: r0 = relu(W0 h0 + b0), r1 = relu(W1 [h1, r0] + b1),
    y_t = v_t · r_t + c_t, with h_t = relu(x_t A_t + a_t)."""
    towers = DependentTowers(2, 3, [2], [2], {1: [0]})
    _set(towers)
    x = torch.randn(2, 4, 3)
    out = towers(x)
    A, a = towers.towers.weights[0], towers.towers.biases[0]
    h = [torch.relu(x[t] @ A[t] + a[t]) for t in range(2)]
    lin0, lin1 = towers.relations[0][0], towers.relations[1][0]
    r0 = torch.relu(h[0] @ lin0.weight.t() + lin0.bias)
    r1 = torch.relu(torch.cat([h[1], r0], -1) @ lin1.weight.t() + lin1.bias)
    V, c = towers.outputs.weights[0], towers.outputs.biases[0]
    expect = torch.stack([(r0 @ V[0] + c[0])[:, 0], (r1 @ V[1] + c[1])[:, 0]], 1)
    assert out.shape == (4, 2)
    torch.testing.assert_close(out, expect)
    assert lin1.in_features == 4 and lin0.in_features == 2  # [h1, r0] against h0 alone


def test_child_loss_trains_the_parent_not_the_reverse():
    towers = DependentTowers(3, 4, [3], [2], {1: [0], 2: [0, 1]})
    assert towers.order.index(0) < towers.order.index(1) < towers.order.index(2)
    out = towers(torch.randn(3, 5, 4))
    out[:, 1].sum().backward()
    grads = towers.towers.weights[0].grad  # [T, Din, Ht]
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0 and grads[2].abs().sum() == 0
    towers.zero_grad()
    towers(torch.randn(3, 5, 4))[:, 0].sum().backward()
    assert towers.towers.weights[0].grad[1].abs().sum() == 0


def test_cycle_and_bad_index():
    with pytest.raises(graphlib.CycleError):
        DependentTowers(2, 3, [2], [2], {0: [1], 1: [0]})
    with pytest.raises(ValueError, match="unknown task indices"):
        DependentTowers(2, 3, [2], [2], {1: [2]})


def test_task_parents_parsing():
    tasks = ["click", "conversion", "watch_time"]
    assert task_parents([], tasks) == {"conversion": ["click"], "watch_time": ["conversion"]}
    assert task_parents(["watch_time:click+conversion"], tasks) == {
        "watch_time": ["click", "conversion"]
    }
    with pytest.raises(ConfigError, match="did you mean 'conversion'"):
        task_parents(["convertion:click"], tasks)
    with pytest.raises(ConfigError, match="a cycle"):
        task_parents(["click:conversion", "conversion:click"], tasks)
    with pytest.raises(ConfigError, match="is not task:parent"):
        task_parents(["click"], tasks)


@pytest.mark.parametrize("base", ["mmoe", "shared_bottom"])
def test_build_head_over_either_base(base):
    cfg = load_config(
        ["--config", "configs/default.toml", "--model.head", "dbmtl", "--model.dbmtl.base", base,
         "--model.dbmtl.parents", "conversion:click"]
    )  # fmt: skip
    names = [t.name for t in cfg.tasks]
    head = build_head(cfg.model, 20, names)
    assert isinstance(head, MoE if base == "mmoe" else SharedBottom)
    assert isinstance(head.towers, DependentTowers)
    assert head.towers.parents == {0: [], 1: [0], 2: []}
    out, aux, *_ = head(torch.randn(6, 20))
    assert out.shape == (6, 3) and torch.isfinite(out).all()
