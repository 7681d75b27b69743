"""Bad input: each case fails naming the file / column / key, or is masked as configured.

Real Parquet files in tmp dirs, read through the real converter and reader (no mocks).
"""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl_dist.config import ConfigError, JobConfig, SparseFeature, TaskSpec, validate
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader

TASKS = [TaskSpec(name="click", label="click")]


def conv(policy: str = "error", dense_nan: str = "error", **kw) -> ArrowBatchConverter:
    """item: single-hot, vocab 10; tags: multi-hot, vocab 10; one dense column x."""
    sparse = [
        SparseFeature(name="item", vocab_size=10, invalid_ids=policy, **kw),
        SparseFeature(name="tags", vocab_size=10, multi_hot=True, invalid_ids=policy, **kw),
    ]
    return ArrowBatchConverter(sparse, ["x"], TASKS, dense_nan=dense_nan)


def rows(item: list, tags: list, x: list | None = None) -> pa.Table:
    n = len(item)
    return pa.table(
        {
            "item": pa.array(item, pa.int64()),
            "tags": pa.array(tags, pa.list_(pa.int64())),
            "x": pa.array(x if x is not None else [0.5] * n, pa.float64()),
            "click": pa.array([0, 1] * (n // 2) + [0] * (n % 2), pa.int8()),
        }
    )


def good(n: int, start: int = 0) -> pa.Table:
    return rows([(start + i) % 10 for i in range(n)], [[i % 10] for i in range(n)])


# --------------------------------------------------------------------------- sparse ids

BAD = rows([3, -2, 12, None], [[1, None, 2], [-1], [10, 4], []])


def bags(batch, key: str) -> list[list[int]]:
    kjt = batch.sparse[key]
    vals, lens = kjt.values().tolist(), kjt.lengths().tolist()
    out, i = [], 0
    for n in lens:
        out.append(vals[i : i + n])
        i += n
    return out


def test_sparse_ids_error_names_column_example_and_count():
    with pytest.raises(ValueError, match=r"column 'item': id -2 outside \[0, 10\) \(2 of 3 ids"):
        conv()(BAD.set_column(1, "tags", pa.array([[1]] * 4, pa.list_(pa.int64()))))
    with pytest.raises(ValueError, match=r"column 'tags': 1 null id\(s\) inside lists"):
        conv()(BAD.set_column(0, "item", pa.array([1, 2, 3, None], pa.int64())))
    ok = BAD.set_column(1, "tags", pa.array([[1], [-1], [10, 4], []], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match=r"column 'tags': id -1 outside \[0, 10\) \(2 of 4 ids"):
        conv()(ok.set_column(0, "item", pa.array([1, 2, 3, None], pa.int64())))


@pytest.mark.parametrize(
    "policy, item, tags",
    [
        ("clip", [[3], [0], [9], []], [[1, 2], [0], [9, 4], []]),
        ("hash", [[3], [8], [2], []], [[1, 2], [9], [0, 4], []]),
        ("drop", [[3], [], [], []], [[1, 2], [], [4], []]),
    ],
)
def test_sparse_id_policies(policy, item, tags):
    """Null single-hot = empty bag always; list nulls are dropped by every policy but error."""
    b = conv(policy)(BAD)
    assert bags(b, "item") == item
    assert bags(b, "tags") == tags
    assert b.batch_size == 4


def test_hash_buckets_hash_every_id_but_list_nulls_follow_the_policy():
    t = BAD.set_column(1, "tags", pa.array([[1, None], [-1], [12], []], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match=r"column 'tags': 1 null id\(s\)"):
        conv(hash_buckets=7)(t)
    b = conv("drop", hash_buckets=7)(t)
    assert bags(b, "item") == [[3], [5], [5], []]
    assert bags(b, "tags") == [[1], [6], [5], []]


@pytest.mark.parametrize(
    "arr, match",
    [
        (pa.array(["a", "b"]), r"column 'item': string ids need hash_buckets = N .*got string"),
        (
            pa.array([1.0, 2.5]),
            "column 'item': expected integer or string ids or a list of them, got double",
        ),
        (
            pa.array([[1.0], [2.5]], pa.list_(pa.float64())),
            r"column 'item': expected integer or string ids or a list of them, got list<item: double>",
        ),
        (
            pa.array([["1"], ["2"]], pa.list_(pa.string())),
            r"column 'item': string ids need hash_buckets = N .*got list<item: string>",
        ),
    ],
)
def test_sparse_column_of_wrong_type(arr, match):
    t = good(2).set_column(0, "item", arr)
    with pytest.raises(ValueError, match=match):
        conv()(t)
    with pytest.raises(ValueError, match=match):  # from the schema alone (a file's footer)
        conv().check_schema(t.schema)


# --------------------------------------------------------------------------- dense values


def test_dense_nan_and_inf_error_names_column_or_become_zero():
    t = good(4).set_column(2, "x", pa.array([1.0, np.nan, None, -np.inf], pa.float64()))
    with pytest.raises(
        ValueError, match=r"column 'x': 2 dense value\(s\) not finite in float32, e.g. nan"
    ):
        conv()(t)
    assert conv(dense_nan="zero")(t).dense[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    # a float64 beyond float32's range would become inf: caught too
    big = good(2).set_column(2, "x", pa.array([1e300, 1.0], pa.float64()))
    with pytest.raises(
        ValueError, match=r"column 'x': 1 dense value\(s\) not finite in float32, e.g. 1e\+300"
    ):
        conv()(big)


def test_dense_and_label_columns_of_wrong_type():
    t = good(2).set_column(2, "x", pa.array(["1.0", "2.0"]))
    with pytest.raises(ValueError, match=r"column 'x': expected a number, got string"):
        conv()(t)
    with pytest.raises(ValueError, match=r"column 'x': expected a number, got string"):
        conv().check_schema(t.schema)
    t = good(2).set_column(3, "click", pa.array(["y", "n"]))
    with pytest.raises(ValueError, match=r"column 'click': expected a number, got string"):
        conv().check_schema(t.schema)
    conv().check_schema(good(2).schema)  # the right types pass


# --------------------------------------------------------------------------- config keys


def test_config_rejects_unknown_policies_naming_the_key():
    cfg = JobConfig()
    cfg.features.sparse = [SparseFeature(name="item", vocab_size=10, invalid_ids="clamp")]
    cfg.tasks = TASKS
    with pytest.raises(ConfigError, match=r"features.sparse\[0\] \(item\): invalid_ids must be"):
        validate(cfg)
    cfg.features.sparse = [dataclasses.replace(cfg.features.sparse[0], invalid_ids="clip")]
    validate(cfg)
    cfg.data.dense_nan = "nan"
    with pytest.raises(ConfigError, match=r"data.dense_nan: expected error \| zero, got 'nan'"):
        validate(cfg)


# --------------------------------------------------------------------------- files


def test_truncated_and_non_parquet_files_fail_at_construction_naming_the_path(tmp_path):
    pq.write_table(good(200), tmp_path / "whole.parquet", row_group_size=50)
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.parquet").write_text("user_id,click\n1,0\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name in ("cut", "text", "empty"):
        files = [str(tmp_path / "whole.parquet"), str(tmp_path / f"{name}.parquet")]
        with pytest.raises(ValueError, match=rf"{name}.parquet: not a readable Parquet file"):
            ParquetBatchReader(files, conv(), 16)


def test_bad_value_in_a_file_names_the_file_and_column(tmp_path):
    pq.write_table(good(64), tmp_path / "a.parquet")
    bad = good(64, 64).set_column(0, "item", pa.array([1] * 63 + [99], pa.int64()))
    pq.write_table(bad, tmp_path / "b.parquet")
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert len(list(ParquetBatchReader(files, conv(), 16, rank=0, world_size=2))) == 4
    with pytest.raises(ValueError, match=r"b.parquet: column 'item': id 99 outside \[0, 10\)"):
        list(ParquetBatchReader(files, conv(), 16, rank=1, world_size=2))


def test_empty_files_and_row_groups_are_skipped(tmp_path):
    pq.write_table(good(0), tmp_path / "a-empty.parquet")
    # row groups of 0 rows inside a file: write an empty batch between real ones
    with pq.ParquetWriter(tmp_path / "b-mixed.parquet", good(0).schema) as w:
        w.write_table(good(40))
        w.write_table(good(0))
        w.write_table(good(40, 40))
    pq.write_table(good(0), tmp_path / "c-empty.parquet")
    pq.write_table(good(40, 80), tmp_path / "d.parquet")
    files = sorted(str(p) for p in tmp_path.iterdir())
    assert pq.ParquetFile(files[0]).metadata.num_rows == 0
    mixed = pq.ParquetFile(files[1]).metadata
    assert [mixed.row_group(i).num_rows for i in range(mixed.num_row_groups)] == [40, 0, 40]
    reader = ParquetBatchReader(files, conv(), 8, drop_last=False)
    assert reader.total_rows == 120
    seen = [v for b in reader for v in bags(b, "item")]
    assert len(seen) == 120


@pytest.mark.parametrize("world, drop_last", [(3, True), (3, False), (5, True), (5, False)])
def test_fewer_row_groups_than_ranks_keeps_ranks_in_step(tmp_path, world, drop_last):
    """One file, one row group of 50 rows, 3 or 5 ranks: every rank yields as many batches."""
    pq.write_table(good(50), tmp_path / "one.parquet")
    files = [str(tmp_path / "one.parquet")]
    counts, rows_seen = [], 0
    for rank in range(world):
        batches = list(ParquetBatchReader(files, conv(), 8, rank, world, drop_last=drop_last))
        counts.append(len(batches))
        rows_seen += sum(int(b.mask.sum()) for b in batches)  # pad rows have mask 0
    assert len(set(counts)) == 1 and counts[0] >= 1, counts
    if not drop_last:
        assert rows_seen == 50  # every real row counted exactly once
