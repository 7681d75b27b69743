"""Feature admission (``[[features.sparse]] admit_min_count``): an id seen fewer than N times
in the training split reads the shared OOV row — in training's converter, in scoring and in
the served program alike."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtl_dist.config import ConfigError, load_config, to_dict
from mtl_dist.data.admission import admit, admitted_masks, count_training_ids
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.serve.export import FORMAT, build_unsharded, load_exported
from mtl_dist.serve.lookups import IdRemap
from mtl_dist.serve.program import build_served, export_program, inputs_from_batch
from mtl_dist.serve.score import score

ADMIT = 3  # user_id: ids 0..4 appear 5, 4, 3, 2, 1 times; 5.. never


def _cfg(tmp_path, *extra):
    return load_config(
        ["--config", "configs/default.toml", "--model.experts.hidden", "16,8",
         "--data.train_path", str(tmp_path / "train"), *extra]
    )  # fmt: skip


def _set_admission(cfg, names=("user_id",), n=ADMIT):
    for f in cfg.features.sparse:
        if f.name in names:
            f.admit_min_count = n
    return cfg


def _rows(cfg, users, seed=0):
    """A table of len(users) rows: user_id as given, every other feature random and small."""
    from tests.models.test_ranker import random_table

    t = random_table(cfg, len(users), seed=seed)
    return t.set_column(t.schema.get_field_index("user_id"), "user_id",
                        pa.array(users, pa.int64()))  # fmt: skip


def test_admit_and_masks():
    assert admit(np.array([0, 1, 2, 1]), np.array([True, False, True])).tolist() == [0, 3, 2, 3]
    assert admit(np.array([], np.int64), np.array([True])).tolist() == []


def test_config_table_grows_by_the_shared_row_and_refusals(tmp_path):
    cfg = _set_admission(_cfg(tmp_path))
    user = next(f for f in cfg.features.sparse if f.name == "user_id")
    assert (user.id_rows, user.num_rows) == (200_000, 200_001)  # the OOV row: 200_000
    toml = tmp_path / "f.toml"
    toml.write_text('[data]\ntrain_filter = "dt < \'2026-11-02\'"\n[[features.sparse]]\n'
                    'name = "a"\nvocab_size = 10\nadmit_min_count = 2\n')  # fmt: skip
    with pytest.raises(ConfigError, match="data.train_filter"):
        load_config(["--config", str(toml)])
    cfg = _set_admission(_cfg(tmp_path), names=("item_id",))  # hist_item_ids shares its table
    with pytest.raises(ConfigError, match=r"admit_min_count \(0 vs 3\) adds the shared OOV row"):
        from mtl_dist.config import validate

        validate(cfg)
    from mtl_dist.config import help_text

    assert "admit_min_count" in help_text()


def test_managed_and_admission_refused(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('[[features.sparse]]\nname = "a"\nhash_buckets = 10\ncollision = "managed"\n'
                    "admit_min_count = 2\n")  # fmt: skip
    with pytest.raises(ConfigError, match="admit_min_count = 2 with collision = 'managed'"):
        load_config(["--config", str(toml)])


def test_training_scoring_and_served_program_map_alike(tmp_path):
    """Counts from the training split (user_id 0..4 seen 5..1 times, admit at 3): ids 3, 4 and
    unseen ids read the shared row 200000 in training's converter; an exported model scores,
    and its served program predicts, exactly what the training-side model does on the same raw
    rows; rows that differ only in non-admitted ids get the same prediction, an admitted id
    another one."""
    cfg = _set_admission(_cfg(tmp_path))
    (tmp_path / "train").mkdir()
    users = [u for u in range(5) for _ in range(5 - u)]  # 0 x5, 1 x4, 2 x3, 3 x2, 4 x1
    pq.write_table(_rows(cfg, users), tmp_path / "train" / "part-0.parquet")
    counts = count_training_ids(cfg)
    assert counts["user_id"][:6].tolist() == [5, 4, 3, 2, 1, 0] and counts["user_id"].sum() == 15
    masks = admitted_masks(cfg.features.sparse, counts)
    assert list(masks) == ["user_id"]

    torch.manual_seed(0)
    model = build_unsharded(cfg).eval()
    model.model.id_counts.set(counts)
    with torch.no_grad():  # the OOV row distinct from the others
        model.model.ebc.embedding_bags["user_id"].weight[200_000].fill_(0.3)
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)

    probe = [0, 2, 3, 4, 7, 123_456, 1]  # admitted: 0, 2, 1; the rest share row 200000
    table = _rows(cfg, probe, seed=9)
    same = {c: pa.array([table.column(c)[0].as_py()] * len(probe), table.column(c).type)
            for c in table.column_names if c != "user_id"}  # fmt: skip
    table = pa.table({**same, "user_id": table.column("user_id")})  # only user_id differs
    pq.write_table(table, tmp_path / "rows.parquet")

    train_conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks,
                                     admitted=masks)  # fmt: skip
    batch = train_conv(table)
    assert batch.sparse["user_id"].values().tolist() == [0, 2, 200_000, 200_000, 200_000,
                                                         200_000, 1]  # fmt: skip
    with torch.no_grad():
        trained = model.predict(model.model(batch)[0])  # [B, T] probabilities / values
    for j, t in enumerate(cfg.tasks):  # scoring and serving give log1p targets in seconds
        if t.transform == "log1p":
            trained[:, j] = trained[:, j].expm1()

    _, exported = load_exported(path)
    assert torch.equal(exported.model.id_counts.counts_0, torch.from_numpy(counts["user_id"]))
    assert score(path, str(tmp_path / "rows.parquet"), tmp_path / "preds.parquet", [], 4) == 7
    scored = pq.read_table(tmp_path / "preds.parquet")
    scored = torch.stack([torch.tensor(scored[f"pred_{t.name}"].to_numpy()) for t in cfg.tasks], 1)
    torch.testing.assert_close(scored, trained, rtol=1e-5, atol=1e-6)

    program = export_program(cfg, build_served(cfg, model)).module()
    raw = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(table)
    served = program(*inputs_from_batch(raw))  # raw ids: the program admits them itself
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)
    for p in (trained, scored, served):  # rows 2..5: one input (bit-level noise of the batch)
        for r in (3, 4, 5):
            torch.testing.assert_close(p[r], p[2], rtol=0, atol=1e-6)
        assert (p[0] - p[2]).abs().max() > 1e-4 and (p[0] - p[1]).abs().max() > 1e-4


def test_id_remap_admits_after_each_rule():
    from mtl_dist.config import SparseFeature

    feats = [SparseFeature("a", vocab_size=4, invalid_ids="drop", admit_min_count=2),
             SparseFeature("b", hash_buckets=4, admit_min_count=2)]  # fmt: skip
    kept = np.array([True, False, True, False])
    remap = IdRemap(feats, [5, 5], admitted={"a": kept, "b": kept})
    a, b = remap([torch.tensor([0, 1, 2, 3, 9, -1]), torch.tensor([0, 1, 6, 7])])
    assert a.tolist() == [0, 4, 2, 4, 5, 5]  # out of range: the padding row 5, as before
    assert b.tolist() == [0, 4, 2, 4]  # 6 mod 4 = 2 kept, 7 mod 4 = 3 not
