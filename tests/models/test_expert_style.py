"""HoME-style experts (Wang et al. 2024): Swish activation and per-expert output normalisation,
against a hand-computed forward, through every head, and in the dead-activation statistic."""

import pytest
import torch
import torch.nn.functional as F

from mtl_dist.models.experts import ExpertStyle, StackedMLP
from mtl_dist.models.heads import MoE
from mtl_dist.models.outputs import Probes

X = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.5, 1.5]])  # [B=3, Din=3]


def _mlp(**kw) -> StackedMLP:
    torch.manual_seed(0)
    m = StackedMLP(2, 3, [2], **kw)
    with torch.no_grad():
        m.weights[0].copy_(torch.tensor([[[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]],
                                         [[-1.0, 0.0], [1.0, 1.0], [2.0, -0.5]]]))  # fmt: skip
        m.biases[0].copy_(torch.tensor([[[0.1, -0.2]], [[0.0, 0.3]]]))
    return m


def _linear() -> torch.Tensor:
    """Each expert's pre-activation by hand: ``[G=2, B=3, H=2]``."""
    w = torch.tensor(
        [[[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], [[-1.0, 0.0], [1.0, 1.0], [2.0, -0.5]]]
    )
    b = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    return torch.stack([X @ w[g] + b[g] for g in range(2)])


def test_swish_with_layer_norm_by_hand():
    m = _mlp(activation="swish", output_norm="layer")
    with torch.no_grad():
        m.out_norm_weight.copy_(torch.tensor([[[2.0, 1.0]], [[1.0, 0.5]]]))
        m.out_norm_bias.copy_(torch.tensor([[[0.0, 1.0]], [[-1.0, 0.0]]]))
    y = _linear()
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    normed = (y - mu) / torch.sqrt(var + 1e-5) * m.out_norm_weight + m.out_norm_bias
    expect = normed * torch.sigmoid(normed)  # swish
    assert torch.allclose(m(X), expect, atol=1e-6)
    # top-k dispatch: each row through one expert, the same numbers
    rows = m.forward_grouped(torch.cat([X[:2], X[2:]]), torch.tensor([0, 0, 1]))
    assert torch.allclose(rows, torch.stack([expect[0, 0], expect[0, 1], expect[1, 2]]), atol=1e-6)


def test_batch_norm_is_per_expert():
    m = _mlp(output_norm="batch").train()
    y = _linear()
    expect = torch.relu(
        (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-5)
    )
    assert torch.allclose(m(X), expect, atol=1e-5)
    with pytest.raises(ValueError, match="output_norm = 'batch'"):
        m.forward_grouped(X, torch.tensor([0, 0, 1]))


def test_bad_style_is_refused():
    with pytest.raises(ValueError, match="activation must be relu | swish"):
        StackedMLP(2, 3, [2], activation="gelu")


def test_dead_activation_shows_what_normalisation_cures():
    """Experts whose output layer is pushed negative: with ReLU every unit is dead; with
    expert normalisation + Swish none is (each expert's output is recentred)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    dead = {}
    for style in (ExpertStyle(), ExpertStyle("swish", "layer")):
        torch.manual_seed(0)
        head = MoE(8, ["a", "b"], 3, [8, 6], [4], style=style)
        with torch.no_grad():
            head.experts.biases[-1].fill_(-50.0)
        out = head(x, Probes(dead_units=True))
        assert torch.isfinite(out.logits).all()
        dead[style.activation] = out.dead["experts"]
    assert dead["relu"].tolist() == [1.0, 1.0, 1.0]
    assert dead["swish"].max() < 0.5


@pytest.mark.parametrize("head", ["shared_bottom", "omoe", "mmoe", "ple", "stem"])
def test_every_head_takes_the_style(head):
    from mtl_dist.config import load_config
    from mtl_dist.models.build import build_head

    cfg = load_config(["--config", "configs/default.toml", "--model.head", head,
                       "--model.experts.activation", "swish", "--model.experts.norm", "layer",
                       "--model.experts.hidden", "8", "--model.shared_bottom.hidden", "8"])  # fmt: skip
    m = build_head(cfg.model, 12, ["a", "b"], task_dim=4 if head == "stem" else 0)
    mlps = [x for x in m.modules() if isinstance(x, StackedMLP) and x.output_norm == "layer"]
    assert mlps and all(x.act is F.silu for x in mlps)
    x = torch.randn(5, 12)
    out = m(x, torch.randn(2, 5, 4)) if head == "stem" else m(x)
    assert out[0].shape == (5, 2) and torch.isfinite(out[0]).all()
