"""The interaction stage: each option against a hand-computed forward on a tiny input, the
head's input width, per-feature embedding dropout, and a pairwise product learned better with a
cross network than without."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from mtl_dist.config import (
    ConfigError,
    InteractionConfig,
    ModelConfig,
    SharedBottomConfig,
    TowerConfig,
    load_config,
)
from mtl_dist.models.build import build_head
from mtl_dist.models.interaction import (
    DotInteraction,
    FeatureDropout,
    FieldEmbeddings,
    FMInteraction,
    build_interaction,
)

# 2 features of width 2, then 1 dense value; batch 3
X = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [0.5, -1.0, 2.0, 0.0, -2.0],
        [0.0, 1.0, -1.0, 1.0, 0.5],
    ]
)
WIDTHS, NUM_DENSE = [2, 2], 1


def model_cfg(interaction: str, output: str = "concat", **kw) -> InteractionConfig:
    return InteractionConfig(kind=interaction, output=output, **kw)


def cross_by_hand(x: list[float], kernels, biases) -> list[float]:
    """x_{l+1}[i] = x_0[i] * (Σ_j W_l[i][j] x_l[j] + b_l[i]) + x_l[i], scalar by scalar."""
    x0, xl = list(x), list(x)
    for w, b in zip(kernels, biases):
        xl = [
            x0[i] * (sum(w[i][j] * xl[j] for j in range(len(xl))) + b[i]) + xl[i]
            for i in range(len(xl))
        ]
    return xl


def test_dcn_v2_cross_network_matches_the_formula_by_hand():
    stage, width = build_interaction(model_cfg("dcn_v2", cross_layers=2), WIDTHS, NUM_DENSE)
    cross = stage.op
    eye, bias = torch.eye(5), torch.tensor([0.0, 1.0, 0.0, -1.0, 0.5])
    w1 = torch.arange(25.0).view(5, 5) / 50 - 0.2
    with torch.no_grad():
        cross.kernels[0].copy_(eye)
        cross.bias[0].zero_()
        cross.kernels[1].copy_(w1)
        cross.bias[1].copy_(bias.view(5, 1))
    # one layer with W = I, b = 0: x0 * x0 + x0
    one = build_interaction(model_cfg("dcn_v2", cross_layers=1), WIDTHS, NUM_DENSE)[0].op
    with torch.no_grad():
        one.kernels[0].copy_(eye)
        one.bias[0].zero_()
    assert one(X[:1]).tolist() == [[2.0, 6.0, 12.0, 20.0, 30.0]]
    out = stage(X)
    assert width == 10 and out.shape == (3, 10)
    assert torch.equal(out[:, :5], X)  # concat: the raw input first
    for r in range(3):
        ref = cross_by_hand(X[r].tolist(), [eye.tolist(), w1.tolist()], [[0.0] * 5, bias.tolist()])
        assert out[r, 5:].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_low_rank_and_mixture_cross_networks_match_the_formula_by_hand():
    torch.manual_seed(0)
    low, _ = build_interaction(
        model_cfg("dcn_v2_lowrank", "replace", cross_layers=2, cross_low_rank=2), WIDTHS, NUM_DENSE
    )
    net = low.op
    kernels = [(net.W_kernels[i] @ net.V_kernels[i]).tolist() for i in range(2)]
    with torch.no_grad():
        net.bias[1].copy_(torch.tensor([0.1, 0.0, -0.2, 0.3, 0.0]))
    biases = [net.bias[i].tolist() for i in range(2)]
    out = low(X)
    assert out.shape == (3, 5)  # replace: the cross output alone
    for r in range(3):
        ref = cross_by_hand(X[r].tolist(), kernels, biases)
        assert out[r].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # the mixture, one layer, 2 experts: Σ_k softmax(g(x))_k x0 ⊙ (U_k relu(C_k relu(V_k x)) + b) + x
    mix = build_interaction(
        model_cfg("dcn_mix", "replace", cross_layers=1, cross_low_rank=2, cross_experts=2),
        WIDTHS,
        NUM_DENSE,
    )[0].op
    out = mix(X)
    for r in range(3):
        x = X[r]
        gates = torch.stack([mix.gates[k](x) for k in range(2)]).squeeze(1).softmax(0)
        experts = [
            x * (mix.U_kernels[0][k] @ (mix.C_kernels[0][k] @ (mix.V_kernels[0][k] @ x).relu()).relu()
                 + mix.bias[0].squeeze(1))
            for k in range(2)
        ]  # fmt: skip
        ref = gates[0] * experts[0] + gates[1] * experts[1] + x
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)


def test_dot_interaction_is_dlrm_pairwise_dots_with_the_projected_dense_vector():
    dot = DotInteraction(WIDTHS, NUM_DENSE)
    with torch.no_grad():
        dot.dense.weight.copy_(torch.tensor([[1.0], [2.0]]))
        dot.dense.bias.copy_(torch.tensor([0.0, 1.0]))
    out = dot(X)
    # row 0: d = [5, 11], v1 = [1, 2], v2 = [3, 4]: [d, <d,v1>, <d,v2>, <v1,v2>]
    assert out[0].tolist() == [5.0, 11.0, 27.0, 59.0, 11.0]
    # row 1: d = [-2, -3], v1 = [0.5, -1], v2 = [2, 0]
    assert out[1].tolist() == [-2.0, -3.0, 2.0, -4.0, 1.0]
    assert dot.out_dim == 2 + 3
    # no dense value: the first field stands in for d, C(F, 2) pairs
    three = DotInteraction([2, 2, 2], 0)
    y = three(torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0, 1.0]]))
    assert y.tolist() == [[1.0, 0.0, 2.0, -1.0, -2.0 + 3.0]] and three.out_dim == 2 + 3


def test_fm_is_rendles_second_order_term_per_dimension():
    fm = FMInteraction(WIDTHS, NUM_DENSE)
    with torch.no_grad():
        fm.dense.copy_(torch.tensor([[1.0, -1.0]]))
    out = fm(X)
    # fields of row 0: [1, 2], [3, 4], 5 * [1, -1] = [5, -5]; per dimension Σ_{i<j} v_i v_j
    assert out[0].tolist() == [1 * 3 + 1 * 5 + 3 * 5, 2 * 4 + 2 * -5 + 4 * -5]  # [23, -22]
    for r in range(3):
        v = [X[r, :2], X[r, 2:4], X[r, 4] * fm.dense[0]]
        pairs = sum(v[i] * v[j] for i in range(3) for j in range(i + 1, 3))
        torch.testing.assert_close(out[r], pairs)
        # its sum over D is Rendle's Σ_{i<j} <v_i, v_j>
        assert float(out[r].sum()) == pytest.approx(float(pairs.sum().detach()))


def test_unequal_widths_are_projected_to_the_largest_and_kept_in_order():
    fields = FieldEmbeddings([2, 1, 2, 1])
    assert fields.dim == 2 and list(fields.proj["1"].shape) == [2, 1, 2]
    with torch.no_grad():
        fields.proj["1"].copy_(torch.tensor([[[1.0, 10.0]], [[-1.0, 2.0]]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert fields(x).tolist() == [[[1.0, 2.0], [3.0, 30.0], [4.0, 5.0], [-6.0, 12.0]]]


@pytest.mark.parametrize(
    ("kind", "concat", "replace"),
    [
        ("none", 5, 5),
        ("dot", 5 + 5, 5),
        ("fm", 5 + 2, 2),
        ("dcn_v2", 10, 5),
        ("dcn_v2_lowrank", 10, 5),
        ("dcn_mix", 10, 5),
    ],
)
def test_head_input_width_for_concat_and_replace(kind, concat, replace):
    for output, expected in (("concat", concat), ("replace", replace)):
        stage, width = build_interaction(model_cfg(kind, output), WIDTHS, NUM_DENSE)
        assert width == expected
        assert stage(X).shape == (3, expected)
        assert stage(X[:0]).shape == (0, expected)  # an empty batch stays empty


def test_config_rejects_bad_interaction_keys():
    base = ["--config", "configs/default.toml"]
    assert (
        load_config([*base, "--model.interaction.kind", "dcn_v2"]).model.interaction.kind
        == "dcn_v2"
    )
    with pytest.raises(ConfigError, match="did you mean 'dcn_v2'"):
        load_config([*base, "--model.interaction.kind", "dcn_v3"])
    with pytest.raises(ConfigError, match="model.interaction.output"):
        load_config([*base, "--model.interaction.output", "add"])
    with pytest.raises(ConfigError, match="model.interaction.cross_layers"):
        load_config([*base, "--model.interaction.cross_layers", "0"])
    with pytest.raises(ConfigError, match="model.embedding.dropout"):
        load_config([*base, "--model.embedding.dropout", "1.0"])
    with pytest.raises(ConfigError, match="rowwise_adagrad"):
        load_config(
            [*base, "--optim.embedding_weight_decay", "0.01", "--optim.embedding_optimizer", "sgd"]
        )


def test_feature_dropout_zeroes_whole_features_at_its_rate_in_training_only():
    torch.manual_seed(0)
    drop = FeatureDropout([3, 1, 2], p=0.25)
    x = torch.rand(20_000, 6) + 0.5  # no zero of its own
    y = drop.train()(x)
    blocks = y.split([3, 1, 2], 1)
    for b in blocks:  # a feature is dropped whole or kept whole, kept ones scaled by 1/(1-p)
        zero = (b == 0).all(1)
        assert ((b == 0).any(1) == zero).all()
    dropped = torch.stack([(b == 0).all(1) for b in blocks], 1).float()  # [B, F]
    assert dropped.mean(0).tolist() == pytest.approx([0.25] * 3, abs=0.01)
    kept = ~dropped.bool()
    torch.testing.assert_close(y[:, :3][kept[:, 0]], x[:, :3][kept[:, 0]] / 0.75)
    assert float(y.mean()) == pytest.approx(float(x.mean()), rel=0.01)  # inverted dropout
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FeatureDropout([3, 1, 2], p=0.0).train()(x), x)


def pairwise_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """12 fields of width 4 + 2 dense values, all N(0, 1); the label depends only on the dot
    product of fields 0 and 1 (a pairwise product of two features): ``(x, label, true logit)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12 * 4 + 2, generator=g)
    logit = 2.0 * (x[:, 0:4] * x[:, 4:8]).sum(1)
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return x, y, logit


def train_auc(interaction: str, steps: int = 300) -> float:
    """Test AUC of a shared-bottom head (bottom [16]) after ``steps`` Adam steps of 256 rows."""
    m = ModelConfig(
        head="shared_bottom", shared_bottom=SharedBottomConfig([16]), tower=TowerConfig([4]),
        interaction=InteractionConfig(kind=interaction, cross_layers=1),
    )  # fmt: skip
    torch.manual_seed(0)
    stage, width = build_interaction(m.interaction, [4] * 12, 2)
    head = build_head(m, width, ["t"])
    opt = torch.optim.Adam([*stage.parameters(), *head.parameters()], lr=0.01)
    x, y, _ = pairwise_task(256 * steps, seed=1)
    for xb, yb in zip(x.split(256), y.split(256)):
        logits = head(stage(xb))[0][:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, _ = pairwise_task(8192, seed=2)
    head.eval()
    with torch.no_grad():
        return float(binary_auroc(head(stage(xt))[0][:, 0], yt.long()))


def test_dcn_v2_learns_a_pairwise_product_better_than_no_interaction():
    """Same seed, same head, same 300 steps: measured none 0.9045, dcn_v2 0.9248, oracle
    0.9332 (seeds 1, 2 of the model: +0.026, +0.024)."""
    torch.set_num_threads(1)
    none, dcn = train_auc("none"), train_auc("dcn_v2")
    _, yt, logit = pairwise_task(8192, seed=2)
    oracle = float(binary_auroc(logit, yt.long()))
    assert dcn > none + 0.01, (none, dcn, oracle)
    assert oracle - 0.015 < dcn < oracle, (dcn, oracle)


def test_embedding_l2_penalty_is_added_to_the_training_loss_only():
    """λ/2 · mean over samples of Σ_f ||pooled_f||², added by ModelWithLoss in training; the
    attribution path and eval see no penalty."""
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.loop.losses import ModelWithLoss
    from mtl_dist.loop.step import TrainStep
    from mtl_dist.models.build import build_ranker
    from tests.models.test_ranker import random_table

    args = ["--config", "configs/default.toml", "--model.experts.hidden", "16,8"]
    cfg = load_config([*args, "--model.embedding.l2", "0.3"])
    torch.manual_seed(0)
    model = ModelWithLoss(build_ranker(cfg, device="cpu"), cfg.tasks)
    plain_cfg = load_config(args)
    torch.manual_seed(0)
    plain = ModelWithLoss(build_ranker(plain_cfg, device="cpu"), cfg.tasks)
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 32)
    )
    ranker = model.model
    kt = ranker.ebc(batch.sparse)
    pooled = torch.cat([kt[name] for name in ranker.feature_order], 1)  # [B, Σ w_f]
    expected = 0.5 * 0.3 * float(pooled.square().sum(1).mean())
    loss, _ = TrainStep(model).loss(model(batch))
    assert float(ranker(batch).penalty) == pytest.approx(expected, rel=1e-5)
    assert float(model(batch)[0].penalty) == pytest.approx(expected, rel=1e-5)
    assert float(loss - TrainStep(plain).loss(plain(batch))[0]) == pytest.approx(expected, rel=1e-4)
    model.eval(), plain.eval()
    evaluated, plain_evaluated = model(batch)[0], plain(batch)[0]
    assert evaluated.penalty is None
    torch.testing.assert_close(evaluated.losses, plain_evaluated.losses, rtol=1e-6, atol=0)


def test_reduced_precision_runs_the_interaction_under_autocast_and_returns_float32():
    from mtl_dist.loop.precision import Precision, set_head_precision

    stage, _ = build_interaction(model_cfg("dcn_v2"), WIDTHS, NUM_DENSE)
    ref = stage(X)
    set_head_precision(stage, Precision("bf16", "test"))
    assert stage.compute_dtype == torch.bfloat16
    out = stage(X)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # bf16 matmuls rounded
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_pepnet_reads_its_features_from_the_raw_input_before_the_interaction_columns():
    """The head's input layout (PEPNet's domain / prior columns): with concat the raw x comes
    first, so the features keep their columns; with replace they are gone, and building says so."""
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.models.build import build_ranker
    from tests.models.test_ranker import random_table

    args = ["--config", "configs/default.toml", "--model.head", "pepnet",
            "--model.pepnet.domain_features", "device_type", "--model.pepnet.prior_features",
            "user_id,dense_0", "--model.interaction.kind", "dcn_v2"]  # fmt: skip
    cfg = load_config(args)
    torch.manual_seed(0)
    ranker = build_ranker(cfg, device="cpu")
    plain = build_ranker(load_config(args[:-2]), device="cpu")
    for name in ("domain_columns", "prior_columns"):
        assert torch.equal(getattr(ranker.head, name), getattr(plain.head, name))
    assert ranker.head.prior_columns.numel() == 16 + 1  # user_id's embedding, dense_0
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 8)
    )
    assert ranker(batch)[0].shape == (8, 3)
    with pytest.raises(ValueError, match="device_type"):
        build_ranker(load_config([*args, "--model.interaction.output", "replace"]), device="cpu")


def test_mixture_experts_start_with_a_real_cross_term():
    """DCN-V2's mixture with each expert's U, V, C initialised on their own: at the peers'
    width (N = 264, r = 64, 4 experts, 3 layers) the cross term starts at a sizeable fraction of
    x; TorchRec's init of the stacked [K, N, r] tensors leaves it at ~1e-3 of x (measured
    0.0012), which barely trained in an epoch (quality bench, interactions workload: click AUC
    0.706 as without an interaction; 0.720 with this init)."""
    from torchrec.modules.crossnet import LowRankMixtureCrossNet

    torch.manual_seed(0)
    stage, _ = build_interaction(InteractionConfig(kind="dcn_mix", output="replace"), [16] * 16, 8)
    x = torch.randn(512, 264)
    with torch.no_grad():
        ours = ((stage(x) - x).std() / x.std()).item()
        stock = LowRankMixtureCrossNet(264, 3, 4, 64)
        theirs = ((stock(x) - x).std() / x.std()).item()
    assert ours > 0.1 and theirs < 0.01, (ours, theirs)
    for kernels in (stage.op.U_kernels, stage.op.V_kernels):  # xavier per [N, r] matrix
        assert kernels[0][0].std().item() == pytest.approx((2 / (264 + 64)) ** 0.5, rel=0.1)
