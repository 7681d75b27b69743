"""mtl_dist.data.public.common: the split writer's files and row groups, line-numbered CSV
batches, numbers whose bad value names its line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl_dist.data.public import common
from mtl_dist.data.public.common import PrepareError, SplitWriter, csv_batches, numbers


def test_split_writer_streams_exact_row_groups_into_files(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ROW_GROUP", 7)
    monkeypatch.setattr(common, "FILE_ROWS", 20)
    schema = pa.schema([("x", pa.int64()), ("y", pa.int8())])
    w = SplitWriter(tmp_path, "train", schema, ["y"])
    start = 0
    for n in (3, 12, 1, 0, 25, 14):  # 55 rows in uneven pieces
        w.write(pa.table({"y": [int(i % 5 == 0) for i in range(start, start + n)],
                          "x": list(range(start, start + n))}))  # fmt: skip
        start += n
    summary = w.close()
    files = sorted((tmp_path / "train").glob("*"))
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(3)]  # no partials
    groups = [[pq.ParquetFile(f).metadata.row_group(g).num_rows
               for g in range(pq.ParquetFile(f).num_row_groups)] for f in files]  # fmt: skip
    assert groups == [[7, 7, 7], [7, 7, 7], [7, 6]]
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).statistics is not None
    xs = [x for f in files for x in pq.read_table(f)["x"].to_pylist()]
    assert xs == list(range(55))
    assert summary == {"rows": 55, "files": 3, "positive_rate": {"y": 11 / 55}}


def test_split_writer_of_no_rows(tmp_path):
    w = SplitWriter(tmp_path, "val", pa.schema([("y", pa.int8())]), ["y"])
    assert w.close() == {"rows": 0, "files": 0, "positive_rate": {"y": None}}


def test_csv_batches_number_lines_and_name_the_short_field(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n\n3,4\n5\n")  # the empty line is a record of empty values
    with pytest.raises(PrepareError, match=r"x.csv:5: field b: expected 2 columns, found 1"):
        list(csv_batches(path, ["a", "b"], header=True))
    path.write_text("a,b\n1,2\n\n3,4\n")
    [(line, batch)] = list(csv_batches(path, ["a", "b"], header=True))
    assert line == 2 and batch.to_pydict() == {"a": ["1", "", "3"], "b": ["2", "", "4"]}
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(PrepareError, match=r"x.csv:3: field \(after b\): expected 2 columns"):
        list(csv_batches(path, ["a", "b"], header=True))
    path.write_text('a,b\n1," 2"\n3,4\n')
    [(line, batch)] = list(csv_batches(path, ["a", "b"], header=True))
    assert line == 2 and batch["b"].to_pylist() == [" 2", "4"]


def test_numbers_name_the_line_of_a_bad_value(tmp_path):
    col = pa.array([" 1", "2.5", "x", ""])
    with pytest.raises(PrepareError, match=r"f:12: field v: not a number: 'x'"):
        numbers(col, pa.float32(), "f", 10, "v")
    got = numbers(pa.array(["1", ""]), pa.float32(), "f", 1, "v", blank="null")
    assert got.to_pylist() == [1.0, None]
    with pytest.raises(PrepareError, match=r"f:8: field v: not a number: ''"):
        numbers(pa.array(["1", ""]), pa.float32(), "f", [7, 8], "v")
