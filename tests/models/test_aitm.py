"""AITM (Xi et al., KDD 2021) against a hand-computed forward on a tiny input: towers, the
information transfer, the attention over {p, q}, outputs and the calibrator."""

import math

import pytest
import torch

from mtl_dist.models.funnel import AITM
from mtl_dist.models.outputs import Probes


def test_forward_by_hand():
    torch.manual_seed(0)
    head = AITM(3, ["ctr", "watch", "cvr"], ["ctr", "cvr"], [2], [], calibration=0.5)
    x = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4]])
    out, aux, attention, *_ = head(x, Probes(gates=True))
    # by hand, from the parameters
    relu = torch.relu
    W0, b0 = head.towers_in.weights[0], head.towers_in.biases[0]  # [3, 3, 2], [3, 1, 2]
    q = [relu(x @ W0[t] + b0[t]) for t in range(3)]
    Wt, bt = head.transfer.weights[0][0], head.transfer.biases[0][0]
    p = relu(q[0] @ Wt + bt)  # what ctr passes to cvr
    Wa, ba = head.attend.weights[0][0], head.attend.biases[0][0]  # [2, 6], [1, 6]

    def h(u):
        y = u @ Wa + ba
        return y[:, :2], y[:, 2:4], y[:, 4:]

    (h1p, h2p, h3p), (h1q, h2q, h3q) = h(p), h(q[2])
    sp, sq = (h2p * h3p).sum(1) / math.sqrt(2), (h2q * h3q).sum(1) / math.sqrt(2)
    ap = torch.exp(sp) / (torch.exp(sp) + torch.exp(sq))
    z_cvr = ap[:, None] * h1p + (1 - ap[:, None]) * h1q
    Wo, bo = head.outputs.mlp.weights[0], head.outputs.mlp.biases[0]  # [3, 2, 1], [3, 1, 1]
    z = [q[0], q[1], z_cvr]  # ctr: first of the chain; watch: outside it
    expect = torch.cat([z[t] @ Wo[t] + bo[t] for t in range(3)], 1)
    assert out.shape == (2, 3) and torch.allclose(out, expect, atol=1e-6)
    assert list(attention) == ["cvr/transfer"]
    assert torch.allclose(attention["cvr/transfer"][:, 0], ap.detach(), atol=1e-6)
    calib = torch.relu(torch.sigmoid(expect[:, 2]) - torch.sigmoid(expect[:, 0])).mean()
    assert aux.shape == (1,) and aux.item() == pytest.approx(0.5 * calib.item(), abs=1e-7)


def test_calibrator_pushes_the_later_probability_under_the_earlier():
    torch.manual_seed(0)
    head = AITM(4, ["click", "conv"], ["click", "conv"], [8], [4], calibration=1.0)
    with torch.no_grad():  # conv's logit far above click's
        head.outputs.mlp.biases[-1][1].fill_(3.0)
        head.outputs.mlp.biases[-1][0].fill_(-3.0)
    x = torch.randn(16, 4)
    _, aux, *_ = head(x)
    assert aux.item() > 0.5
    aux.sum().backward()
    assert head.outputs.mlp.biases[-1].grad[1].item() > 0  # descent lowers conv's bias
    assert head.outputs.mlp.biases[-1].grad[0].item() < 0  # and raises click's


def test_bad_chain_is_refused():
    with pytest.raises(ValueError, match=r"unknown: \['cvr'\]"):
        AITM(4, ["click", "conv"], ["click", "cvr"], [8], [4])
    from mtl_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="not binary tasks: \\['watch_time'\\]"):
        load_config(["--config", "configs/default.toml", "--model.head", "aitm",
                     "--model.aitm.chain", "click,watch_time"])  # fmt: skip
