"""The served program's parts against training's: id rules, int8 tables, plain lookups equal to
TorchRec's, and an export whose batch size is free (B = 1, empty bags) with tower batch norm
and top-k gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl_dist.config import SparseFeature, load_config
from mtl_dist.models.outputs import NO_PROBES
from mtl_dist.serve.export import build_unsharded
from mtl_dist.serve.program import (
    IdRemap,
    PooledEmbeddings,
    RowwiseInt8Bag,
    build_served,
    example_inputs,
    export_program,
)


def test_id_remap_applies_each_policy_as_training_does():
    features = [
        SparseFeature("a", hash_buckets=10),
        SparseFeature("b", vocab_size=10, invalid_ids="clip"),
        SparseFeature("c", vocab_size=10, invalid_ids="hash"),
        SparseFeature("d", vocab_size=10, invalid_ids="drop"),
        SparseFeature("e", vocab_size=10),  # error: the client refuses; the program drops
    ]
    ids = torch.tensor([3, 12, -1, 25])
    out = IdRemap(features, [10, 10, 10, 10, 10])([ids] * 5)
    assert [o.tolist() for o in out] == [
        [3, 2, 9, 5],  # mod 10 (numpy's sign: -1 -> 9)
        [3, 9, 0, 9],
        [3, 2, 9, 5],
        [3, 10, 10, 10],  # the padding row
        [3, 10, 10, 10],
    ]


def test_int8_bag_pools_its_dequantised_rows_and_skips_the_padding_row():
    torch.manual_seed(0)
    weight = torch.randn(11, 6)
    weight[10] = 0  # the padding row
    ids, offsets = torch.tensor([1, 10, 2, 10, 4, 4]), torch.tensor([0, 3, 4, 4, 6])
    for mode in ("sum", "mean"):
        bag = RowwiseInt8Bag(weight, mode, pad=10)
        ref = F.embedding_bag(
            ids, bag.dequantized(), offsets, mode=mode, padding_idx=10, include_last_offset=True
        )
        torch.testing.assert_close(bag(ids, offsets), ref, rtol=1e-6, atol=1e-6)
    step = (weight.max(1).values - weight.min(1).values) / 255
    assert ((bag.dequantized() - weight).abs().max(1).values <= step / 2 + 1e-6).all()
    assert bag.dequantized()[10].abs().max() == 0


def test_plain_lookups_equal_torchrec_pooling():
    cfg = load_config(["--config", "configs/default.toml"])
    ranker = build_unsharded(cfg).model
    dense, values, offsets = example_inputs(cfg, batch=5, seed=3)
    lengths = torch.cat([o.diff() for o in offsets])
    kjt = KeyedJaggedTensor(
        [f.name for f in cfg.features.sparse], torch.cat(values), lengths=lengths
    )
    ours = PooledEmbeddings([ranker.ebc], cfg.features.sparse, ranker.feature_order)
    kt = ranker.ebc(kjt)
    theirs = torch.cat([kt[name] for name in ranker.feature_order], 1)
    torch.testing.assert_close(ours(values, offsets), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_export_serves_any_batch_with_tower_batch_norm_and_top_k_gates(norm):
    cfg = load_config(
        ["--config", "configs/default.toml", "--model.head", "stem", "--model.experts.hidden",
         "32,16", "--model.tower.batch_norm", "true", "--model.gate.top_k", "1",
         "--model.experts.activation", "swish", "--model.experts.norm", norm]
    )  # fmt: skip
    served = build_served(cfg, build_unsharded(cfg).eval())
    program = export_program(cfg, served).module()
    empty = example_inputs(cfg, batch=3, seed=2)
    empty[1][0], empty[2][0] = empty[1][0][:0], torch.zeros(4, dtype=torch.long)
    for inputs in (example_inputs(cfg, batch=1, seed=1), empty, example_inputs(cfg, 7, seed=3)):
        torch.testing.assert_close(program(*inputs), served(*inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "head_args",
    [
        ["--model.head", "dbmtl", "--model.dbmtl.parents", "conversion:click"],
        ["--model.head", "pepnet", "--model.pepnet.domain_features", "device_type",
         "--model.pepnet.prior_features", "user_id,dense_0"],
        ["--model.head", "ple", "--model.experts.self_gate", "true",
         "--model.experts.feature_gate_rank", "4", "--model.esmm.enabled", "true", "--model.esmm.escm2_dr",
         "0.1"],
    ],
    ids=["dbmtl", "pepnet", "ple_home_gates_escm2_dr"],
)  # fmt: skip
def test_export_serves_the_newer_heads(head_args):
    """DBMTL, PEPNet and HoME's gates export; the program equals the eager model at B = 1, 7."""
    cfg = load_config(["--config", "configs/default.toml", "--model.experts.hidden", "32,16",
                       *head_args])  # fmt: skip
    served = build_served(cfg, build_unsharded(cfg).eval())
    program = export_program(cfg, served).module()
    for inputs in (example_inputs(cfg, batch=1, seed=1), example_inputs(cfg, 7, seed=3)):
        torch.testing.assert_close(program(*inputs), served(*inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("output", ["concat", "replace"])
def test_dcn_v2_model_exports_serves_and_scores_alike_and_attributes_input_features(
    tmp_path, output
):
    """A dcn_v2 model: the exported program's scores equal ``mtl_dist.serve.score``'s on the same rows,
    and attribution ranks the 21 sparse + 12 dense input features, each with a gradient through
    the cross network (with ``replace`` the head sees nothing else)."""
    import pyarrow.parquet as pq

    from mtl_dist.config import to_dict
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.observe.attribution import feature_attribution
    from mtl_dist.serve.export import FORMAT
    from mtl_dist.serve.program import inputs_from_batch
    from mtl_dist.serve.score import score
    from tests.models.test_ranker import random_table

    cfg = load_config(
        ["--config", "configs/default.toml", "--model.experts.hidden", "16,8",
         "--model.interaction.kind", "dcn_v2", "--model.interaction.output", output,
         "--model.interaction.cross_layers", "2"]
    )  # fmt: skip
    model = build_unsharded(cfg).eval()
    with torch.no_grad():  # a non-trivial cross: biases off zero
        for b in model.model.interaction.op.bias:
            b.normal_(0, 0.5)
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    table = random_table(cfg, 64, seed=4)
    pq.write_table(table, tmp_path / "rows.parquet")
    assert score(path, str(tmp_path / "rows.parquet"), tmp_path / "preds.parquet", [], 32) == 64
    scored = pq.read_table(tmp_path / "preds.parquet")
    expected = torch.stack(
        [torch.tensor(scored[f"pred_{t.name}"].to_numpy()) for t in cfg.tasks], 1
    )
    program = export_program(cfg, build_served(cfg, model)).module()
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)
    batch = conv(table)
    torch.testing.assert_close(program(*inputs_from_batch(batch)), expected, rtol=1e-5, atol=1e-6)

    names, attr = feature_attribution(model.model, [batch], torch.device("cpu"))
    assert names == [*model.model.feature_order, *cfg.features.dense]
    assert attr.shape == (3, 21 + 12)
    assert (attr > 0).all() and torch.isfinite(attr).all()
    assert model.model.probes == NO_PROBES  # attribution leaves the probes as they were


@pytest.mark.parametrize("kind", ["dot", "fm", "dcn_v2_lowrank", "dcn_mix"])
def test_every_interaction_exports_with_a_free_batch_size(kind):
    """dot / fm over features of unequal widths (8 and 16: the narrow ones projected), the
    low-rank and mixture cross networks: the program equals the served module at B = 1 and 7."""
    import dataclasses

    cfg = load_config(
        ["--config", "configs/default.toml", "--model.experts.hidden", "16,8",
         "--model.interaction.kind", kind, "--model.interaction.cross_low_rank", "8"]
    )  # fmt: skip
    tables = [f.table_name for f in cfg.features.sparse]
    cfg.features.sparse = [
        dataclasses.replace(f, embedding_dim=8) if i % 3 == 0 and tables.count(f.table_name) == 1
        else f
        for i, f in enumerate(cfg.features.sparse)
    ]  # fmt: skip
    assert {f.embedding_dim for f in cfg.features.sparse} == {8, 16}
    served = build_served(cfg, build_unsharded(cfg).eval())
    program = export_program(cfg, served).module()
    for inputs in (example_inputs(cfg, batch=1, seed=1), example_inputs(cfg, 7, seed=3)):
        torch.testing.assert_close(program(*inputs), served(*inputs), rtol=1e-5, atol=1e-6)
