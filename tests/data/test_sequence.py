"""Sequence features: list columns → the KJT's jagged ids, the last max_len kept, null / empty /
bad-id rules with file, column and row named, resume exact through the real reader."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl_dist.config import ConfigError, JobConfig, SequenceFeature, SparseFeature, TaskSpec
from mtl_dist.config import validate as validate_cfg
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader, list_parquet_files
from mtl_dist.data.sequence import RowError, keep_last

SPARSE = [SparseFeature(name="item", vocab_size=100), SparseFeature(name="user", vocab_size=10)]
TASKS = [TaskSpec(name="click", label="click")]


def conv(**kw) -> ArrowBatchConverter:
    seq = SequenceFeature(name="hist", column="hist_items", table="item", max_len=3, **kw)
    return ArrowBatchConverter(SPARSE, ["rid"], TASKS, sequences=[seq])


def rows(hist: list, start: int = 0) -> pa.Table:
    n = len(hist)
    rid = np.arange(start, start + n)
    return pa.table(
        {
            "rid": pa.array(rid.astype(np.float32)),
            "item": pa.array(rid % 100, pa.int64()),
            "user": pa.array(rid % 10, pa.int64()),
            "hist_items": pa.array(hist, pa.list_(pa.int64())),
            "click": pa.array(rid % 2, pa.int8()),
        }
    )


def bags(batch, key):
    jt = batch.sparse[key]
    vals, out, at = jt.values().tolist(), [], 0
    for n in jt.lengths().tolist():
        out.append(vals[at : at + n])
        at += n
    return out


def test_keep_last_keeps_the_most_recent_ids_of_each_row():
    flat, lens = keep_last(np.array([1, 2, 3, 4, 5, 6]), np.array([4, 0, 1, 1]), 2)
    assert flat.tolist() == [3, 4, 5, 6] and lens.tolist() == [2, 0, 1, 1]
    flat, lens = keep_last(np.array([7, 8]), np.array([1, 1]), 5)  # nothing to clip
    assert flat.tolist() == [7, 8] and lens.tolist() == [1, 1]


def test_lists_become_jagged_kjt_clipped_to_max_len_null_and_empty_are_empty_histories():
    batch = conv()(rows([[1, 2, 3, 4, 5], [], None, [9]]), pad_to=6)
    assert batch.sparse.keys() == ["item", "user", "hist"]
    assert bags(batch, "hist") == [[3, 4, 5], [], [], [9], [], []]
    assert bags(batch, "item") == [[0], [1], [2], [3], [], []]


def test_null_list_under_on_null_error_names_column_and_row():
    with pytest.raises(RowError, match=r"column 'hist_items', row 2: null list"):
        conv(on_null="error")(rows([[1], [2], None, [3]]))


@pytest.mark.parametrize(
    ("hist", "match"),
    [
        ([[1], [2, 100]], r"row 1: id 100 outside \[0, 100\)"),
        ([[1], [], [3, None]], r"row 2: a null id"),
        ([[-4]], r"row 0: id -4 outside"),
    ],
)
def test_bad_ids_name_column_and_row(hist, match):
    with pytest.raises(RowError, match=r"column 'hist_items', " + match):
        conv()(rows(hist))


def test_bad_ids_follow_invalid_ids_like_sparse_features():
    assert bags(conv(invalid_ids="clip")(rows([[1, 150, None]])), "hist") == [[1, 99]]
    assert bags(conv(invalid_ids="drop")(rows([[1, 150, 2, 3]])), "hist") == [[1, 2, 3]]
    assert bags(conv(invalid_ids="hash")(rows([[1, 150]])), "hist") == [[1, 50]]


def test_wrong_type_names_the_column(tmp_path):
    t = rows([[1]]).set_column(3, "hist_items", pa.array([1.5], pa.float64()))
    pq.write_table(t, tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: column 'hist_items' \(sequence hist\)"):
        ParquetBatchReader([str(tmp_path / "a.parquet")], conv(), 1)


def test_reader_names_the_file_and_its_row(tmp_path):
    """Row 1234 of a file of 3 row groups (and a filtered read): the error names that row."""
    hist = [[i % 100] for i in range(2000)]
    hist[1234] = [7, 555]
    pq.write_table(rows(hist), tmp_path / "b.parquet", row_group_size=500)
    reader = ParquetBatchReader(list_parquet_files(str(tmp_path)), conv(), 64, chunk_rows=100)
    with pytest.raises(ValueError, match=r"b.parquet: column 'hist_items', row 1234: id 555"):
        list(reader)


def test_resume_mid_epoch_reads_the_same_sequences(tmp_path):
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, 100, rng.integers(0, 7)).tolist() for _ in range(900)]
    pq.write_table(rows(hist), tmp_path / "c.parquet", row_group_size=128)
    paths = list_parquet_files(str(tmp_path))
    whole = list(ParquetBatchReader(paths, conv(), 32, 0, 1, 1, drop_last=True, chunk_rows=96))
    reader = ParquetBatchReader(paths, conv(), 32, 0, 1, 1, drop_last=True, chunk_rows=96)
    it = iter(reader)
    first = [next(it) for _ in range(7)]
    resumed = ParquetBatchReader(paths, conv(), 32, 0, 1, 1, drop_last=True, chunk_rows=96)
    resumed.load_state_dict(reader.state_dict())
    got = first + list(resumed)
    assert len(got) == len(whole) == 900 // 32
    for a, b in zip(got, whole):
        assert bags(a, "hist") == bags(b, "hist")
    expected = [h[-3:] for h in hist[: len(whole) * 32]]
    assert [x for b in whole for x in bags(b, "hist")] == expected


def cfg(**kw) -> JobConfig:
    c = JobConfig()
    c.features.sparse = list(SPARSE)
    c.tasks = list(TASKS)
    c.features.sequence = [SequenceFeature(**{"name": "hist", "table": "item", **kw})]
    return c


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"table": "itm"}, r"features.sequence\[0\] \(hist\): table: 'itm' .*did you mean 'item'"),
        ({"max_len": 0}, r"\(hist\): max_len = 0: must lie in \[1, 4096\]"),
        ({"query": "user"}, r"\(hist\): query 'user' must name a sparse feature of table 'item'"),
        ({"pooling": "mha", "heads": 3}, r"\(hist\): heads = 3 must divide .* 16"),
        ({"name": "user"}, r"\(user\): duplicate feature name"),
    ],
)
def test_config_checks_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        validate_cfg(cfg(**kw))
    validate_cfg(cfg())


def side_conv(**kw) -> ArrowBatchConverter:
    seq = SequenceFeature(
        name="hist", column="hist_items", table="item", max_len=3,
        side_columns=["hist_users"], side_tables=["user"], **kw,
    )  # fmt: skip
    return ArrowBatchConverter(SPARSE, ["rid"], TASKS, sequences=[seq])


def test_side_column_joins_the_kjt_clipped_alike_and_unequal_lengths_name_the_row():
    t = rows([[1, 2, 3, 4], [5], None]).append_column(
        "hist_users", pa.array([[1, 2, 3, 4], [9], []], pa.list_(pa.int64()))
    )
    batch = side_conv()(t)
    assert batch.sparse.keys() == ["item", "user", "hist", "hist/hist_users"]
    assert bags(batch, "hist") == [[2, 3, 4], [5], []]
    assert bags(batch, "hist/hist_users") == [[2, 3, 4], [9], []]
    bad = rows([[1, 2], [5], [7, 8]]).append_column(
        "hist_users", pa.array([[1, 2], [9], [1]], pa.list_(pa.int64()))
    )
    with pytest.raises(
        RowError, match=r"column 'hist_users', row 2: 1 ids where 'hist_items' has 2"
    ):
        side_conv()(bad)
    out_of_range = t.set_column(
        5, "hist_users", pa.array([[1, 2, 3, 40], [9], []], pa.list_(pa.int64()))
    )
    with pytest.raises(RowError, match=r"column 'hist_users', row 0: id 40 outside \[0, 10\)"):
        side_conv()(out_of_range)


def test_side_column_config_checks():
    c = cfg(side_columns=["hist_users"], side_tables=[])
    with pytest.raises(
        ConfigError, match=r"\(hist\): side_columns \['hist_users'\] and side_tables \[\]"
    ):
        validate_cfg(c)
    c = cfg(side_columns=["hist_users"], side_tables=["user"], invalid_ids="drop")
    with pytest.raises(ConfigError, match=r"\(hist\): invalid_ids = 'drop' would misalign"):
        validate_cfg(c)
    c = cfg(side_columns=["hist_users"], side_tables=["usr"])
    with pytest.raises(ConfigError, match=r"\(hist\): side_tables: 'usr' .*did you mean 'user'"):
        validate_cfg(c)
    validate_cfg(cfg(side_columns=["hist_users"], side_tables=["user"]))


def test_a_null_inside_a_side_list_under_clip_is_refused_not_misaligned():
    t = rows([[1, 2], [3]]).append_column(
        "hist_users", pa.array([[1, 2], [None]], pa.list_(pa.int64()))
    )
    with pytest.raises(RowError, match=r"column 'hist_users', row 1: a null id inside the list"):
        side_conv(invalid_ids="clip")(t)


def test_sharding_force_data_parallel_is_refused_for_the_sequences_ec():
    c = cfg()
    c.sharding.force = "data_parallel"
    with pytest.raises(ConfigError, match=r"sharding.force = 'data_parallel'.*table_wise"):
        validate_cfg(c)
