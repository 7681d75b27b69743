"""Filters meet column types, partition keys get one type per dataset, and start-up counts.

* a literal of another kind than its column (``hour == '07'`` on an int64 partition) stops
  naming the key, the filter, the column, its type, the literal's and how to write it — for
  comparisons, ``in`` lists, file columns and partition columns alike;
* a partition value beyond int64 makes its key a string (no ``OverflowError``), and the
  message of a number compared with it names the directory;
* mixed values of one key (``shop=3``, ``shop=04``, ``shop=x1``) are strings in every file, as
  ``pyarrow.dataset`` infers them, so a filter on the key selects the right rows;
* :func:`require_selected` refuses a filter that selects no row naming the path, the filter and
  the partitions found, and :func:`overlap_warning` counts rows both filters keep.

Real Parquet files written by pyarrow into tmp dirs.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mtl_dist.config import SparseFeature, TaskSpec
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import (
    ParquetBatchReader,
    count_selected,
    filter_overlap,
    overlap_warning,
    require_selected,
)
from mtl_dist.data.source import (
    RowFilter,
    infer_partitions,
    list_parquet_files,
    partition_values,
)

CONV = ArrowBatchConverter(
    [SparseFeature(name="item", vocab_size=100)], ["rid"], [TaskSpec(name="click", label="click")]
)


def write(root, dirs: list[str], n: int = 10) -> dict[str, list[int]]:
    """One file of ``n`` rows per partition directory: rid (unique), item, click, country
    (string), day (date32), flag (bool). Returns directory → its rids."""
    rids, rid = {}, 0
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        ids = np.arange(rid, rid + n)
        table = pa.table(
            {
                "rid": pa.array(ids.astype(np.float32)),
                "item": pa.array(ids % 100, pa.int64()),
                "click": pa.array((ids % 2).astype(np.int8)),
                "country": pa.array(["fr", "de"] * (n // 2)),
                "day": pa.array((np.arange(n) + 20393).astype(np.int32)).cast(
                    pa.date32()
                ),  # 2025-11-01 on
                "flag": pa.array([True, False] * (n // 2)),
            }
        )
        pq.write_table(table, root / d / "part-0.parquet", row_group_size=4)
        rids[d] = ids.tolist()
        rid += n
    return rids


def read_rids(root, text: str, key: str = "data.train_filter") -> list[int]:
    reader = ParquetBatchReader(
        list_parquet_files(str(root)), CONV, 8, drop_last=False,
        row_filter=RowFilter.parse(text, key),
    )  # fmt: skip
    out = []
    for b in reader:
        out += [int(x) for x, m in zip(b.dense[:, 0], b.mask[:, 0]) if m > 0]
    return sorted(out)


def fails(root, text: str, key: str = "data.train_filter") -> str:
    with pytest.raises(ValueError) as e:
        read_rids(root, text, key)
    return str(e.value)


# --------------------------------------------------------------------------- 1. literal types


@pytest.fixture
def hours(tmp_path):
    return tmp_path, write(tmp_path, ["hour=07", "hour=08", "hour=12"])


def test_string_literal_for_int_partition_names_key_column_types_and_fix(hours):
    root, _ = hours
    msg = fails(root, "hour == '07'")
    assert msg.startswith("data.train_filter \"hour == '07'\": hour is int64 (a partition key of ")
    assert "hour=07/part-0.parquet; int64: every value is an integer" in msg
    assert "but '07' is a string; write hour == 7" in msg
    assert "ArrowNotImplementedError" not in msg and "no kernel" not in msg
    # the literal on the left, a negative one, a chained comparison, a boolean
    assert "write 7 <= hour" in fails(root, "'07' <= hour")
    assert "write hour > -1" in fails(root, "hour > '-1'")
    assert "write hour < 9" in fails(root, "6 < hour < '9'")
    assert "True is a boolean; write hour == 1" in fails(root, "hour == True")
    assert "compare it with a number" in fails(root, "hour == 'seven'", "data.val_filter")
    assert fails(root, "hour == 'x'", "data.val_filter").startswith('data.val_filter "hour')


def test_in_lists_are_checked_element_by_element(hours):
    root, rids = hours
    msg = fails(root, "hour in ['07', 8, '12']")
    assert "hour is int64" in msg and "'07' is a string; write hour in [7, 8, 12]" in msg
    assert "write hour not in [7]" in fails(root, "hour not in ['07']")
    # numbers an int64 column cannot hold match nothing (no cast, no error)
    assert read_rids(root, "hour in [7, 8.5, 99999999999999999999]") == rids["hour=07"]
    assert read_rids(root, "hour not in [7, 12]") == rids["hour=08"]
    assert read_rids(root, "hour == 7.0 or hour > 99999999999999999999") == rids["hour=07"]


def test_file_columns_are_checked_too(hours):
    root, rids = hours
    msg = fails(root, "country == 3")
    assert re.search(r"country is string \(a column of \S+part-0.parquet\) but 3 is a number", msg)
    assert msg.endswith("write country == '3'")
    assert "write country in ['fr', '1']" in fails(root, "country in ['fr', 1]")
    assert "rid is float" in fails(root, "rid < '5'") and "write rid < 5" in fails(
        root, "rid < '5'"
    )
    assert "flag is bool" in fails(root, "flag == 'yes'")
    assert "write flag == True" in fails(root, "flag == 'true'")
    msg = fails(root, "country == hour")
    assert "country is string but hour is int64" in msg and "compare columns of one kind" in msg
    # what is well typed reads: booleans, and a date column against ISO text (parsed exactly)
    fr = sorted(r for d in rids.values() for r in d[0::2])
    assert read_rids(root, "flag == True and hour >= 7") == fr
    assert read_rids(root, "day >= '2025-11-09'") == sorted(r for d in rids.values() for r in d[8:])
    assert read_rids(root, "day in ['2025-11-01']") == sorted(d[0] for d in rids.values())
    msg = fails(root, "day >= '2025-11'")
    assert "day is date32[day]" in msg and "'2025-11' does not parse as date32[day]" in msg
    assert "a string in ISO form" in fails(root, "day >= 5")


def test_a_partition_key_that_is_also_a_file_column_is_typed_by_the_directory(tmp_path):
    """The directory replaces the file's column of the same name (the reader reads the key from
    the path, for the filter as for features): here country, a string column, is int64."""
    write(tmp_path, ["country=3"])
    msg = fails(tmp_path, "country == 'fr'")
    assert "country is int64 (a partition key of" in msg and "compare it with a number" in msg
    assert read_rids(tmp_path, "country == 3") == list(range(10))


# ------------------------------------------------------------------------- 2. beyond int64


def test_partition_value_beyond_int64_is_a_string_naming_the_directory(tmp_path):
    big = "99999999999999999999"
    rids = write(tmp_path, [f"id={big}", "id=5"])
    files = list_parquet_files(str(tmp_path))
    first = next(f for f in files if big in f)
    assert partition_values(first) == {"id": big}  # no OverflowError, even one file alone
    assert {p["id"] for p in infer_partitions(files).values()} == {big, "5"}
    assert ds.dataset(str(tmp_path), partitioning="hive").schema.field("id").type == pa.string()
    assert read_rids(tmp_path, f"id == '{big}'") == rids[f"id={big}"]
    assert read_rids(tmp_path, "id == '5'") == rids["id=5"]
    msg = fails(tmp_path, f"id == {big}")
    assert "id is string" in msg
    assert f"string for every file: directory id={big} is beyond int64" in msg
    assert f"write id == '{big}'" in msg
    assert "write id in ['5']" in fails(tmp_path, "id in [5]")
    # read as a feature: a string partition column is a string everywhere (no overflow)
    reader = ParquetBatchReader(files, CONV, 4)
    assert reader.partitions[next(f for f in files if "id=5" in f)]["id"] == "5"


# ------------------------------------------------------------------ 3. one type per key


def test_mixed_partition_values_are_strings_in_every_file_as_pyarrow_infers(tmp_path):
    rids = write(tmp_path, ["shop=3", "shop=04", "shop=x1"])
    files = list_parquet_files(str(tmp_path))
    types = ds.dataset(str(tmp_path), partitioning="hive").schema.field("shop").type
    assert types == pa.string()
    assert sorted(p["shop"] for p in infer_partitions(files).values()) == ["04", "3", "x1"]
    assert read_rids(tmp_path, "shop == '04'") == rids["shop=04"]
    assert read_rids(tmp_path, "shop == '3'") == rids["shop=3"]
    assert read_rids(tmp_path, "shop in ['3', 'x1']") == sorted(rids["shop=3"] + rids["shop=x1"])
    assert read_rids(tmp_path, "shop != 'x1' and rid >= 0") == sorted(
        rids["shop=3"] + rids["shop=04"]
    )
    msg = fails(tmp_path, "shop == 3")
    assert "shop is string" in msg and "directory shop=x1 is not an integer" in msg
    assert "write shop == '3'" in msg


def test_integer_partition_values_stay_integers_like_pyarrow(tmp_path):
    """Only integers (``3``, ``04``, ``-1``): int64, ``04`` reads 4 — the values pyarrow
    gives (it types them int32)."""
    rids = write(tmp_path, ["shop=3", "shop=04", "shop=-1"])
    files = list_parquet_files(str(tmp_path))
    got = sorted(p["shop"] for p in infer_partitions(files).values())
    table = ds.dataset(str(tmp_path), partitioning="hive").to_table(columns=["shop"])
    assert got == sorted(set(table.column("shop").to_pylist())) == [-1, 3, 4]
    assert read_rids(tmp_path, "shop == 4") == rids["shop=04"]
    assert read_rids(tmp_path, "shop in [-1, 3]") == sorted(rids["shop=-1"] + rids["shop=3"])


# ----------------------------------------------------------------- 4. start-up counts


@pytest.fixture
def days(tmp_path):
    return tmp_path, write(tmp_path, ["dt=2026-11-29", "dt=2026-11-30"], n=10)


def test_a_filter_selecting_no_row_is_refused_naming_path_filter_and_partitions(days):
    root, _ = days
    f = RowFilter.parse("dt == '2026-12-01'", "data.val_filter")
    assert count_selected(str(root), f).rows == 0
    with pytest.raises(ValueError) as e:
        require_selected(str(root), f)
    assert str(e.value) == (
        f"data.val_filter \"dt == '2026-12-01'\" selects no row of {root} (2 files, 20 rows): "
        "partitions found: dt=2026-11-30, dt=2026-11-29"
    )
    sel = require_selected(str(root), RowFilter.parse("dt >= '2026-11-30' and rid < 15", "k"))
    assert (sel.rows, sel.files, sel.total_rows, sel.total_files) == (5, 1, 20, 2)
    assert count_selected(str(root), None).rows == 20
    # a type error surfaces at start-up, not on the first batch
    with pytest.raises(ValueError, match=r"dt is string .* but 20261201 is a number"):
        count_selected(str(root), RowFilter.parse("dt == 20261201", "data.val_filter"))


def test_overlapping_train_and_val_filters_are_counted(days):
    root, _ = days
    train = RowFilter.parse("dt <= '2026-11-30'", "data.train_filter")
    val = RowFilter.parse("dt >= '2026-11-30' and country == 'fr'", "data.val_filter")
    o = filter_overlap(str(root), train, str(root), val)
    assert (o.rows, o.files, o.partitions, o.train_rows, o.val_rows) == (
        5, 1, ("dt=2026-11-30",), 20, 5,
    )  # fmt: skip
    msg = overlap_warning(str(root), train, f"file://{root}", val)  # same files by URI
    assert msg == (
        "data.train_filter \"dt <= '2026-11-30'\" and data.val_filter \"dt >= '2026-11-30' and "
        "country == 'fr'\" overlap: 5 rows in 1 file(s) (5 of 20 training rows, 5 of 5 "
        "validation rows in the files both read): dt=2026-11-30"
    )
    disjoint = RowFilter.parse("dt < '2026-11-30'", "data.train_filter")
    assert overlap_warning(str(root), disjoint, str(root), val) is None
    rows = RowFilter.parse("country == 'de'", "data.train_filter")  # file columns, same files
    assert filter_overlap(str(root), rows, str(root), val).rows == 0
    assert filter_overlap(str(root), None, str(root), None).rows == 20
