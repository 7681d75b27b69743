"""PEPNet: Gate NUs, EPNet / PPNet forward by hand, stop-gradients, columns from the config."""

import pytest
import torch

from mtl_dist.config import ConfigError, load_config
from mtl_dist.models.build import build_ranker, input_columns
from mtl_dist.models.pepnet import GateNU, PEPNet


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _gate(g: GateNU, z: torch.Tensor) -> torch.Tensor:
    h = torch.relu(z @ g.hidden.weight.t() + g.hidden.bias)
    return 2 * torch.sigmoid(h @ g.out.weight.t() + g.out.bias)


def test_gates_start_at_one_so_pepnet_starts_as_plain_towers():
    head = PEPNet(6, ["a", "b"], [0], [1, 2], tower_hidden=[4], gate_hidden=3)
    x = torch.randn(5, 6)
    assert torch.equal(head.epnet(torch.randn(5, 7)), torch.ones(5, 6))
    out, aux, *_ = head(x)
    plain = head.towers(x).squeeze(-1).t()
    torch.testing.assert_close(out, plain)
    assert out.shape == (5, 2) and aux.numel() == 0


def _by_hand(head: PEPNet, x: torch.Tensor, constant_gates: bool = False) -> torch.Tensor:
    """o = x ⊙ δ_ep([x_d, x]); per task t and layer l: h ← (δ^l_t ⊙ h) W^l_t + b^l_t, ReLU
    between layers, with δ^l = GateNU^l([x_p, o]) split as [T, d_l]. ``constant_gates``: every
    δ without gradient."""
    T, n = head.num_tasks, x.shape[0]

    def fix(d):
        return d.detach() if constant_gates else d

    d, p = head.domain_columns.tolist(), head.prior_columns.tolist()
    o = x * fix(_gate(head.epnet, torch.cat([x[:, d], x], 1)))
    prior = torch.cat([x[:, p], o], 1)
    W, B = head.towers.weights, head.towers.biases
    out = []
    for t in range(T):
        h = o
        for layer in range(len(W)):
            delta = fix(_gate(head.ppnet[layer], prior)).view(n, T, -1)[:, t]
            h = (h * delta) @ W[layer][t] + B[layer][t]
            h = torch.relu(h) if layer < len(W) - 1 else h
        out.append(h[:, 0])
    return torch.stack(out, 1)


def test_forward_by_hand():
    head = PEPNet(5, ["a", "b"], [0], [1, 2], tower_hidden=[3], gate_hidden=4)
    _randomise(head)
    x = torch.randn(4, 5)
    torch.testing.assert_close(head(x)[0], _by_hand(head, x))


def test_gate_inputs_stop_the_gradient_of_the_general_input():
    """Through the gates the loss reaches only the domain / prior columns (∅(x), ∅(O_ep)): every
    other column's gradient is the one with the gates held constant."""
    head = PEPNet(5, ["a", "b"], [0], [1], tower_hidden=[3], gate_hidden=4)
    _randomise(head)
    x = torch.randn(4, 5, requires_grad=True)
    (real,) = torch.autograd.grad(head(x)[0].sum(), x)
    (constant,) = torch.autograd.grad(_by_hand(head, x, constant_gates=True).sum(), x)
    torch.testing.assert_close(real[:, 2:], constant[:, 2:])
    assert (real[:, :2] - constant[:, :2]).abs().min() > 1e-6


def test_columns_from_the_config_and_errors():
    base = ["--config", "configs/default.toml", "--model.head", "pepnet"]
    cfg = load_config(
        [*base, "--model.pepnet.domain_features", "device_type",
         "--model.pepnet.prior_features", "user_id,dense_1"]
    )  # fmt: skip
    model = build_ranker(cfg, "cpu")
    dims = {f.name: f.embedding_dim for f in cfg.features.sparse}
    start = sum(dims[f] for f in model.feature_order[: model.feature_order.index("device_type")])
    assert model.head.domain_columns.tolist() == list(range(start, start + dims["device_type"]))
    emb = sum(dims.values())
    assert model.head.prior_columns.tolist() == [*range(dims["user_id"]), emb + 1]
    with pytest.raises(ConfigError, match="did you mean 'user_id'"):
        load_config([*base, "--model.pepnet.prior_features", "userid"])
    with pytest.raises(ConfigError, match="needs model.pepnet.domain_features or"):
        load_config(base)
    with pytest.raises(ValueError, match=r"features \['z'\] are not in"):
        input_columns([("a", 2)], ["z"])
