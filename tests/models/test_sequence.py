"""Target attention over behaviour sequences against hand-computed forwards (DIN, KDD 2018;
scaled dot-product attention), masking (padding: weight 0, gradient 0), empty histories, and the
EC sharing the candidate's table inside the ranker."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtl_dist.config import (
    HEADS,
    ConfigError,
    JobConfig,
    SequenceFeature,
    SparseFeature,
    TaskSpec,
    load_config,
    validate,
)
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.synth_sequences import make_rows
from mtl_dist.models.build import build_ranker
from mtl_dist.models.sequence import DINAttention, MeanPooling, MultiHeadTargetAttention, padded


def test_padded_left_aligns_rows_and_masks_padding():
    values = torch.arange(10.0).view(5, 2)
    keys, mask = padded(values, torch.tensor([2, 0, 3]), 3)
    assert mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert keys[0].tolist() == [[0, 1], [2, 3], [0, 0]]
    assert keys[1].abs().sum() == 0 and keys[2].tolist() == [[4, 5], [6, 7], [8, 9]]
    keys, mask = padded(torch.zeros(0, 2), torch.tensor([0, 0]), 4)  # no id in the batch
    assert keys.shape == (2, 4, 2) and not mask.any()


def din_by_hand(att: DINAttention, q, keys, lengths):
    """DIN §4.3 written out: for each true position, w = W2 prelu(W1 [q, k, q−k, q⊙k] + b1) + b2
    (no softmax); output Σ w·k; padding weighs 0."""
    l1, act, l2 = att.mlp[0], att.mlp[1], att.mlp[2]
    outs, ws = [], []
    for b in range(q.shape[0]):
        out, row = torch.zeros(q.shape[1]), []
        for i in range(keys.shape[1]):
            if i >= lengths[b]:
                row.append(torch.tensor(0.0))
                continue
            k = keys[b, i]
            a = torch.cat([q[b], k, q[b] - k, q[b] * k])
            h = l1.weight @ a + l1.bias
            h = torch.where(h > 0, h, act.weight * h)
            w = (l2.weight @ h + l2.bias)[0]
            row.append(w)
            out = out + w * k
        outs.append(out)
        ws.append(torch.stack(row))
    return torch.stack(outs), torch.stack(ws)


def test_din_equals_the_hand_computed_unit_and_padding_gets_no_weight_nor_gradient():
    torch.manual_seed(0)
    att = DINAttention(3, [4])
    with torch.no_grad():
        att.mlp[1].weight.fill_(0.25)
    q = torch.randn(3, 3)
    keys = torch.randn(3, 4, 3, requires_grad=True)
    lengths = torch.tensor([4, 2, 0])
    mask = torch.arange(4) < lengths[:, None]
    out, w = att(q, keys, mask)
    ref_out, ref_w = din_by_hand(att, q, keys.detach(), lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    assert (w[~mask] == 0).all() and out[2].abs().sum() == 0  # empty history: 0
    assert not torch.allclose(w[0].sum(), torch.tensor(1.0))  # not softmax-normalised
    out.square().sum().backward()
    assert (keys.grad[~mask] == 0).all() and (keys.grad[mask].abs().sum(-1) > 0).all()


def test_mha_equals_softmax_attention_by_hand_with_the_padding_mask():
    torch.manual_seed(1)
    att = MultiHeadTargetAttention(4, 2)
    q = torch.randn(3, 4)
    keys = torch.randn(3, 5, 4, requires_grad=True)
    lengths = torch.tensor([5, 3, 0])
    mask = torch.arange(5) < lengths[:, None]
    out, w = att(q, keys, mask, need_weights=True)
    for b in range(3):
        if lengths[b] == 0:
            assert out[b].abs().sum() == 0 and w[b].abs().sum() == 0
            continue
        n = int(lengths[b])
        heads, weights = [], []
        for h in range(2):
            sl = slice(2 * h, 2 * h + 2)
            qh = att.q(q[b])[sl]
            kh, vh = att.k(keys[b, :n])[:, sl], att.v(keys[b, :n])[:, sl]
            p = torch.softmax(kh @ qh / 2**0.5, 0)
            heads.append(p @ vh)
            weights.append(p)
        torch.testing.assert_close(out[b], att.out(torch.cat(heads)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w[b, :n], torch.stack(weights).mean(0), rtol=1e-5, atol=1e-6)
        assert (w[b, n:] == 0).all()
    out.sum().backward()
    assert torch.isfinite(keys.grad).all() and (keys.grad[~mask] == 0).all()


def test_mean_pooling_is_the_masked_mean():
    keys = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 5.0], [0, 0], [0, 0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out, w = MeanPooling()(None, keys, mask)
    assert out.tolist() == [[2.0, 3.0], [0.0, 0.0]] and w[0].tolist() == [0.5, 0.5, 0.0]


def job(pooling: str) -> JobConfig:
    cfg = JobConfig()
    cfg.features.sparse = [
        SparseFeature(name="user", vocab_size=7, embedding_dim=4),
        SparseFeature(name="item", vocab_size=11, embedding_dim=4),
    ]
    cfg.features.dense = ["x"]
    cfg.features.sequence = [SequenceFeature(name="hist", table="item", max_len=3, pooling=pooling)]
    cfg.tasks = [TaskSpec(name="click", label="click")]
    cfg.model.dense_batch_norm = False
    validate(cfg)
    return cfg


ROWS = pa.table(
    {
        "user": pa.array([1, 2, 3], pa.int64()),
        "item": pa.array([4, 5, 6], pa.int64()),
        "hist": pa.array([[1, 2, 3, 4], [], [10]], pa.list_(pa.int64())),
        "x": pa.array([0.1, 0.2, 0.3], pa.float32()),
        "click": pa.array([0, 1, 0], pa.int8()),
    }
)


@pytest.mark.parametrize("pooling", ["mean", "din", "mha"])
def test_ranker_takes_candidate_and_history_from_one_table(pooling):
    """The item table lives in the EC only; the head input's item block is its candidate row,
    and (mean) the hist block the mean of the same table's rows of the last 3 ids."""
    cfg = job(pooling)
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    assert [t.name for t in model.ebc.embedding_bag_configs()] == ["user"]
    (table,) = model.sequences.ec.embedding_configs()
    assert table.name == "item" and table.feature_names == ["item", "hist"]
    names, widths = model.input_blocks()
    assert names == ["user", "item", "hist", "x"] and widths == [4, 4, 4, 1]
    conv = ArrowBatchConverter(
        cfg.features.sparse, ["x"], cfg.tasks, sequences=cfg.features.sequence
    )
    model.probes = dataclasses.replace(model.probes, head_input=True)
    model.eval()
    out = model(conv(ROWS))
    rows = model.sequences.ec.embeddings["item"].weight
    x = out.head_input
    torch.testing.assert_close(x[:, 4:8], rows[[4, 5, 6]])
    if pooling == "mean":
        torch.testing.assert_close(x[0, 8:12], rows[[2, 3, 4]].mean(0))
        torch.testing.assert_close(x[2, 8:12], rows[10])
    assert x[1, 8:12].abs().sum() == 0  # an empty history
    out.logits.sum().backward()
    used = torch.zeros(11, dtype=torch.bool)
    used[[1, 2, 3, 4, 5, 6, 10]] = True  # id 1 was clipped away by max_len = 3
    used[1] = False
    assert torch.isfinite(rows.grad).all() and (rows.grad[~used] == 0).all()
    assert (rows.grad[[4, 5, 6]].abs().sum(1) > 0).all()


HEAD_ARGS = {
    "dbmtl": ["--model.dbmtl.parents", "like:click"],
    "pepnet": [
        "--model.pepnet.domain_features",
        "user_id",
        "--model.pepnet.prior_features",
        "hist",
    ],
    "mmoe": ["--model.gate.top_k", "1"],  # the top-k path
}


@pytest.mark.parametrize("head", HEADS)
def test_every_head_reads_the_pooled_sequence(head):
    """Under every head (MMoE with a top-1 gate; PEPNet with the sequence as its prior), the
    sequence's pooled block reaches the logits: its gradient is non-zero through the head."""
    cfg = load_config(
        ["--config", "configs/sequences.toml", "--model.head", head, *HEAD_ARGS.get(head, [])]
    )
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    table = make_rows(32, np.random.default_rng(0))
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    model.probes = dataclasses.replace(model.probes, head_input=True)
    out = model(conv(table))
    x = out.head_input
    x.retain_grad()
    out.logits.sum().backward()
    names, widths = model.input_blocks()
    at = sum(widths[: names.index("hist")])
    assert x.grad[:, at : at + 16].abs().sum() > 0
    assert out.logits.shape == (32, 2) and torch.isfinite(out.logits).all()


def test_bf16_head_precision_keeps_the_attention_in_fp32():
    cfg = load_config(["--config", "configs/sequences.toml", "--train.precision", "bf16"])
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    out = model(conv(make_rows(16, np.random.default_rng(1))))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def side_cfg(pooling: str = "din"):
    """configs/sequences.toml with each past item's category as an aligned side column."""
    cfg = load_config(["--config", "configs/sequences.toml"])
    cfg.features.sparse.append(SparseFeature(name="category_id", vocab_size=20))
    s = cfg.features.sequence[0]
    s.side_columns, s.side_tables, s.pooling = ["hist_category_ids"], ["category_id"], pooling
    validate(cfg)
    return cfg


@pytest.mark.parametrize("pooling", ["din", "mha", "mean"])
def test_side_column_extends_keys_and_query(pooling):
    """The sequence block is [item ⊕ category] wide; with mean pooling it is the mean of the
    concatenated rows of the two tables."""
    cfg = side_cfg(pooling)
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    names, widths = model.input_blocks()
    assert names == ["user_id", "category_id", "item_id", "hist", "dense_0", "dense_1"]
    assert widths == [16, 16, 16, 32, 1, 1]
    table = make_rows(8, np.random.default_rng(3))
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    model.probes = dataclasses.replace(model.probes, head_input=True)
    x = model(conv(table)).head_input
    if pooling == "mean":
        items = model.sequences.ec.embeddings["item_id"].weight
        cats = model.sequences.ec.embeddings["category_id"].weight
        h = table.column("hist_item_ids").to_pylist()[0][-20:]
        want = torch.cat([items[h], cats[[i % 20 for i in h]]], 1).mean(0)
        at = sum(widths[:3])
        torch.testing.assert_close(x[0, at : at + 32], want)


@pytest.mark.parametrize("pooling", ["din", "mha"])
def test_per_task_queries_equal_the_attention_with_each_task_s_projected_query(pooling):
    from mtl_dist.models.sequence import PerTaskQueries

    torch.manual_seed(2)
    base = DINAttention(4, [8]) if pooling == "din" else MultiHeadTargetAttention(4, 2)
    att = PerTaskQueries(base, 3, 4)
    with torch.no_grad():
        att.weight.add_(0.3 * torch.randn(3, 4, 4))
        att.bias.normal_()
    q, keys = torch.randn(5, 4), torch.randn(5, 6, 4)
    mask = torch.arange(6) < torch.tensor([6, 3, 0, 1, 2])[:, None]
    out, w = att(q, keys, mask, need_weights=True)
    assert out.shape == (5, 12) and w.shape == (3, 5, 6)
    for t in range(3):
        want, want_w = base(q @ att.weight[t] + att.bias[t], keys, mask, need_weights=True)
        torch.testing.assert_close(out[:, 4 * t : 4 * t + 4], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w[t], want_w, rtol=1e-5, atol=1e-6)


def test_per_task_sequence_block_and_attention_probes_per_task():
    cfg = load_config(["--config", "configs/sequences.toml"])
    cfg.features.sequence[0].per_task = True
    validate(cfg)
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    names, widths = model.input_blocks()
    assert widths[names.index("hist")] == 32  # 2 tasks x 16
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    model.probes = dataclasses.replace(model.probes, attention=True)
    out = model(conv(make_rows(8, np.random.default_rng(0))))
    assert set(out.attention) == {"hist/click", "hist/like"}
    assert out.attention["hist/click"][0].shape == (8, 20)
    cfg.features.sequence[0].pooling = "mean"
    with pytest.raises(ConfigError, match=r"\(hist\): per_task needs a query"):
        validate(cfg)


RECENCY = "configs/sequences_recency.toml"


def recency_model(*args: str, seed: int = 0):
    cfg = load_config(["--config", RECENCY, *args])
    torch.manual_seed(seed)
    model = build_ranker(cfg, device="cpu")
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    return cfg, model, conv


@pytest.mark.parametrize("pooling", ["din", "mha"])
def test_float_side_column_shapes_and_padding_neither_counts_nor_learns(pooling):
    """floats [B, L·C] = [B, 20]; the padded positions' values get zero gradient and changing
    them leaves the logits as they were; a true position's value changes them."""
    cfg, model, conv = recency_model()
    cfg.features.sequence[0].pooling = pooling
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu").eval()
    batch = conv(make_rows(16, np.random.default_rng(5)))
    assert batch.floats.shape == (16, 20)
    lengths = batch.sparse["hist"].lengths()
    pad = torch.arange(20).unsqueeze(0) >= lengths.unsqueeze(1)  # [B, L]
    assert pad.any() and (~pad).any() and (batch.floats[pad] == 0).all()
    floats = batch.floats.clone().requires_grad_()
    out = model(dataclasses.replace(batch, floats=floats)).logits
    out.sum().backward()
    assert (floats.grad[pad] == 0).all() and floats.grad[~pad].abs().sum() > 0
    junk = torch.where(pad, torch.full_like(batch.floats, 1e4), batch.floats)
    with torch.no_grad():
        torch.testing.assert_close(model(dataclasses.replace(batch, floats=junk)).logits, out)
        moved = batch.floats.clone()
        moved[~pad] += 3600.0
        assert not torch.allclose(model(dataclasses.replace(batch, floats=moved)).logits, out)
    with pytest.raises(ValueError, match=r"sequence hist: float_side_columns need the floats"):
        model(dataclasses.replace(batch, floats=None))


RECENCY_HEAD_ARGS = {**HEAD_ARGS, "dbmtl": ["--model.dbmtl.parents", "recent:click"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head", HEADS)
def test_every_head_learns_from_the_float_side_column(head, precision):
    """Under every head, fp32 and bf16, the float projection gets a gradient through the
    logits, which stay finite float32 (the candidate's query does not depend on it)."""
    _, model, conv = recency_model(
        "--model.head", head, "--train.precision", precision, *RECENCY_HEAD_ARGS.get(head, [])
    )
    out = model(conv(make_rows(32, np.random.default_rng(0))))
    assert out.logits.shape == (32, 2) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert model.sequences.float_sides["0"].proj.weight.grad.abs().sum() > 0


def recency_rows(n: int, seed: int) -> pa.Table:
    """The workload's rows with ``recent`` decided by the ages alone: ``p = 0.9`` where the
    newest past event is under an hour old, else ``0.1`` (an empty history: 0.1)."""
    t = make_rows(n, np.random.default_rng(seed))
    newest = np.array([a[-1] if a else np.inf for a in t.column("hist_age_s").to_pylist()])
    p = np.where(newest < 3600.0, 0.9, 0.1)
    y = (np.random.default_rng(seed + 1).random(n) < p).astype(np.int8)
    t = t.set_column(t.schema.get_field_index("recent"), "recent", pa.array(y))
    return t.set_column(
        t.schema.get_field_index("p_recent"), "p_recent", pa.array(p.astype(np.float32))
    )


def _fit_recent(float_columns: list[str], seed: int = 0) -> float:
    """``recent``'s val cross-entropy against its true probability (KL + the truth's entropy,
    so lower is closer) after 4 epochs of Adam on 4096 rows, batches of 256."""
    cfg = load_config(["--config", RECENCY])
    cfg.features.sequence[0].float_side_columns = float_columns
    cfg.tasks = [t for t in cfg.tasks if t.name == "recent"]
    validate(cfg)
    torch.manual_seed(seed)
    model = build_ranker(cfg, device="cpu")
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                               sequences=cfg.features.sequence)  # fmt: skip
    rows = recency_rows(4096, seed)
    train = [conv(rows.slice(i, 256)) for i in range(0, 4096, 256)]
    val = conv(recency_rows(2048, seed + 100))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(4):
        for b in train:
            opt.zero_grad()
            bce(model(b).logits, b.labels).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float(bce(model(val).logits, val.truth))


def test_the_ages_explain_the_recency_task_the_ids_alone_cannot():
    """Same seed, same rows, a label the newest event's age decides: with hist_age_s the model
    ends measurably closer to the truth than with the ids alone (which, without positions,
    cannot tell an event an hour ago from one a day ago)."""
    without, with_ages = _fit_recent([]), _fit_recent(["hist_age_s"])
    assert with_ages < without - 0.1, (with_ages, without)
