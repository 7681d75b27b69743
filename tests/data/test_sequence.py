"""Sequence features: list columns → the KJT's jagged ids, the last max_len kept, null / empty /
bad-id rules with file, column and row named, resume exact through the real reader."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

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


def float_conv(**kw) -> ArrowBatchConverter:
    seq = SequenceFeature(
        name="hist", column="hist_items", table="item", max_len=3,
        float_side_columns=["hist_age"], **kw,
    )  # fmt: skip
    return ArrowBatchConverter(SPARSE, ["rid"], TASKS, sequences=[seq])


FLOATS = pa.list_(pa.float64())


def with_ages(hist: list, ages: list, tp: pa.DataType = FLOATS, start: int = 0) -> pa.Table:
    return rows(hist, start).append_column("hist_age", pa.array(ages, tp))


def test_float_side_column_is_clipped_like_the_ids_left_aligned_and_zero_padded():
    t = with_ages([[1, 2, 3, 4], [5], None, []], [[40.0, 30.0, 20.0, 10.0], [7.5], None, []])
    batch = float_conv()(t, pad_to=5)
    assert bags(batch, "hist") == [[2, 3, 4], [5], [], [], []]
    assert batch.floats.dtype == torch.float32 and batch.floats.shape == (5, 3)
    assert batch.floats.tolist() == [[30, 20, 10], [7.5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert float_conv().columns[:5] == ["item", "user", "hist_items", "hist_age", "rid"]
    assert conv()(rows([[1]])).floats is None  # no float column: no tensor


def test_two_float_columns_interleave_position_major():
    seq = SequenceFeature(name="hist", column="hist_items", table="item", max_len=2,
                          float_side_columns=["a", "b"], float_transform="none")  # fmt: skip
    c = ArrowBatchConverter(SPARSE, ["rid"], TASKS, sequences=[seq])
    t = rows([[1, 2, 3], [4]])
    t = t.append_column("a", pa.array([[1.0, 2.0, 3.0], [4.0]]))
    t = t.append_column("b", pa.array([[-1.0, -2.0, -3.0], [-4.0]], pa.list_(pa.float32())))
    assert c(t).floats.tolist() == [[2, -2, 3, -3], [4, -4, 0, 0]]


@pytest.mark.parametrize(
    ("hist", "ages", "match"),
    [
        ([[1], [2, 3]], [[1.0], None], r"row 1: null list"),
        ([[1], [2, 3]], [[1.0], [2.0, None]], r"row 1: a null, NaN, infinite or negative value"),
        ([[1], [2], [3]], [[1.0], [2.0], [float("nan")]], r"row 2: a null, NaN.*nan"),
        ([[1], [2]], [[float("inf")], [2.0]], r"row 0: a null, NaN.*inf"),
        ([[1], [2]], [[1.0], [-2.0]], r"row 1: .*negative value \(float_transform = 'log1p'\)"),
        ([[1], [2, 3]], [[1.0], [2.0]], r"row 1: 1 values where 'hist_items' has 2"),
    ],
)
def test_bad_float_values_name_column_and_row(hist, ages, match):
    with pytest.raises(RowError, match=r"column 'hist_age', " + match):
        float_conv()(with_ages(hist, ages))


def test_float_null_list_beside_a_null_id_list_is_an_empty_history_and_none_keeps_negatives():
    assert float_conv()(with_ages([None, [1]], [None, [3.0]])).floats.tolist()[1] == [3, 0, 0]
    got = float_conv(float_transform="none")(with_ages([[1]], [[-5.0]], pa.list_(pa.float32())))
    assert got.floats.tolist() == [[-5, 0, 0]]
    with pytest.raises(RowError, match=r"column 'hist_age', row 1: a null id inside 'hist_items'"):
        float_conv(invalid_ids="clip")(with_ages([[1], [2, None]], [[1.0], [2.0, 3.0]]))


def test_float_wrong_type_and_bad_rows_name_the_file(tmp_path):
    pq.write_table(with_ages([[1]], [["x"]], pa.list_(pa.string())), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: column 'hist_age' \(float side column of "):
        ParquetBatchReader([str(tmp_path / "a.parquet")], float_conv(), 1)
    hist = [[i % 100] for i in range(2000)]
    ages = [[float(i)] for i in range(2000)]
    ages[1234] = [float("nan")]
    (tmp_path / "b").mkdir()
    pq.write_table(with_ages(hist, ages), tmp_path / "b" / "b.parquet", row_group_size=500)
    paths = list_parquet_files(str(tmp_path / "b"))
    reader = ParquetBatchReader(paths, float_conv(), 64, chunk_rows=100)
    with pytest.raises(ValueError, match=r"b.parquet: column 'hist_age', row 1234: a null, NaN"):
        list(reader)


def test_float_side_column_resumes_mid_epoch_exactly(tmp_path):
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, 100, rng.integers(0, 7)).tolist() for _ in range(900)]
    ages = [np.sort(rng.random(len(h)))[::-1].tolist() for h in hist]
    pq.write_table(with_ages(hist, ages), tmp_path / "c.parquet", row_group_size=128)
    paths = list_parquet_files(str(tmp_path))

    def reader():
        return ParquetBatchReader(paths, float_conv(), 32, 0, 1, 1, drop_last=True, chunk_rows=96)

    whole, first_reader = list(reader()), reader()
    it = iter(first_reader)
    first = [next(it) for _ in range(7)]
    resumed = reader()
    resumed.load_state_dict(first_reader.state_dict())
    got = first + list(resumed)
    assert len(got) == len(whole) == 900 // 32
    for a, b in zip(got, whole):
        assert bags(a, "hist") == bags(b, "hist") and torch.equal(a.floats, b.floats)
    want = np.zeros((len(whole) * 32, 3), np.float32)
    for i, a in enumerate(ages[: len(want)]):
        want[i, : len(a[-3:])] = a[-3:]
    np.testing.assert_array_equal(torch.cat([b.floats for b in whole]).numpy(), want)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"float_side_columns": ["age", "age"]}, r"\(hist\): float_side_columns: 'age' is listed"),
        ({"float_side_columns": ["hist"]}, r"\(hist\): float_side_columns: 'hist' is also an id"),
        (
            {"float_side_columns": ["age"], "invalid_ids": "drop"},
            r"\(hist\): invalid_ids = 'drop' would misalign float_side_columns",
        ),
    ],
)
def test_float_side_column_config_checks(kw, match):
    with pytest.raises(ConfigError, match=match):
        validate_cfg(cfg(**kw))
    validate_cfg(cfg(float_side_columns=["age"], float_transform="none"))


def test_float_keys_are_in_the_help_and_a_bad_transform_names_the_choices(tmp_path):
    from mtl_dist.config import FLOAT_TRANSFORMS, help_text, load_config

    text = help_text()
    assert re.search(r"float_side_columns +list\[str\] +default=\[\]", text)
    line = next(x for x in text.splitlines() if x.strip().startswith("float_transform "))
    assert all(name in line for name in FLOAT_TRANSFORMS) and "default='log1p'" in line
    from pathlib import Path

    base = Path("configs/sequences.toml").read_text()
    p = tmp_path / "bad.toml"
    p.write_text(base.replace("din_hidden = [32]", 'din_hidden = [32]\nfloat_transform = "log2"'))
    with pytest.raises(ConfigError, match=r"float_transform.*log1p \| none.*'log2'"):
        load_config(["--config", str(p)])
