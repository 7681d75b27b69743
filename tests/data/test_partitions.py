"""Time-partitioned datasets: hive ``key=value`` directories are columns, a filter written as text
selects partitions and rows (parsed, never evaluated), and the reader's guarantees hold on the
rows it keeps — every kept row once per pass across ranks × workers, equal step counts, exact
resume and re-split under a new world size. Paths may be ``file://`` URIs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl_dist.config import ConfigError, SparseFeature, TaskSpec, load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader
from mtl_dist.data.source import RowFilter, check_filters, list_parquet_files, partition_values

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
# rid is unique over the dataset; dense "hour" is a file column, "shop" a partition column
CONV = ArrowBatchConverter(
    [SparseFeature(name="item", vocab_size=100), SparseFeature(name="dt", hash_buckets=64)],
    ["rid", "shop"],
    [TaskSpec(name="click", label="click")],
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 days x 2 shops, uneven files with several row groups: rid, hour, item, click."""
    root = tmp_path_factory.mktemp("logs")
    rows, rid = {}, 0
    rng = np.random.default_rng(0)
    for d, day in enumerate(DAYS):
        for shop in (1, 2):
            n = 300 + 97 * d + 41 * shop
            part = root / f"dt={day}" / f"shop={shop}"
            part.mkdir(parents=True)
            ids = np.arange(rid, rid + n)
            hour = rng.integers(0, 24, n)
            pq.write_table(pa.table({
                "rid": pa.array(ids.astype(np.float32)), "hour": pa.array(hour, pa.int32()),
                "item": pa.array(ids % 100, pa.int64()), "click": pa.array((ids % 3 == 0).astype(np.int8)),
            }), part / "part-0.parquet", row_group_size=128)  # fmt: skip
            rows.update({int(i): (day, shop, int(h)) for i, h in zip(ids, hour)})
            rid += n
    return root, rows


FILTER = "dt >= '2026-11-02' and dt < '2026-11-04' and hour < 12 and shop in [1, 2]"


def kept(rows, fn) -> list[int]:
    return sorted(r for r, (day, shop, hour) in rows.items() if fn(day, shop, hour))


def test_partition_values_from_the_path():
    assert partition_values("/logs/dt=2026-11-01/shop=3/part-0.parquet") == {
        "dt": "2026-11-01", "shop": 3,
    }  # fmt: skip
    assert partition_values("s3://bucket/logs/dt=x/h=-1/a.parquet") == {"dt": "x", "h": -1}


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 1)])
def test_filtered_rows_read_once_with_equal_steps(dataset, world, workers):
    root, rows = dataset
    files = list_parquet_files(f"file://{root}")  # a URI: the same files through pyarrow.fs
    assert all(f.startswith("file://") for f in files) and len(files) == 6
    want = kept(rows, lambda day, shop, hour: day >= "2026-11-02" and hour < 12)
    seen, steps = [], []
    for rank in range(world):
        reader = ParquetBatchReader(files, CONV, 32, rank, world, workers, drop_last=False,
                                    row_filter=RowFilter.parse(FILTER, "data.train_filter"))  # fmt: skip
        assert reader.total_rows == len(want)
        batches = list(reader)
        steps.append(len(batches))
        for b in batches:
            real = b.mask[:, 0] > 0
            seen += [int(x) for x in b.dense[real, 0]]
            # the partition column shop arrives as a dense value; dt as a hashed sparse id
            assert set(b.dense[real, 1].tolist()) <= {1.0, 2.0}
    assert len(set(steps)) == 1
    assert sorted(seen) == want


def test_partition_only_filter_skips_files_unread_and_resume_resplits(dataset):
    root, rows = dataset
    files = list_parquet_files(str(root))
    day = RowFilter.parse("dt == '2026-11-03'", "data.val_filter")
    want = kept(rows, lambda d, shop, hour: d == "2026-11-03")
    B = 40
    old = [ParquetBatchReader(files, CONV, B, r, 2, 2, drop_last=False, row_filter=day)
           for r in range(2)]  # fmt: skip
    assert {g.file for g in old[0].groups} == {f for f in files if "dt=2026-11-03" in f}
    seen, positions = [], []
    for reader in old:  # each worker trains 2 batches, then the job stops
        trained = {}
        for w in range(2):
            it = reader._iter_worker(w)
            for _ in range(2):
                b = next(it)
                seen += [int(x) for x in b.dense[:, 0]]
                trained[b.position[0]] = b.position[1]
        positions.append(reader.position(trained))
    rest = []
    new = ParquetBatchReader(files, CONV, B, 0, 1, 1, drop_last=False, row_filter=day)
    assert not new.resume_pass(positions)  # another world size: re-split
    for b in new:
        rest += [int(x) for x, m in zip(b.dense[:, 0], b.mask[:, 0]) if m > 0]
    assert sorted(seen + rest) == want


def test_filter_text_is_parsed_not_evaluated_and_errors_name_the_key(dataset):
    for text in ("__import__('os').system('true')", "dt.startswith('2026')", "x = 1",
                 "lambda: 1", "[c for c in dt]", "hour < foo()"):  # fmt: skip
        with pytest.raises(ValueError, match=r"^data.train_filter: "):
            RowFilter.parse(text, "data.train_filter")
    with pytest.raises(ConfigError, match=r"data.val_filter: 'hour <' is not an expression"):
        check_filters(
            load_config(["--config", "configs/default.toml", "--data.val_filter", "hour <"])
        )
    root, _ = dataset
    with pytest.raises(ValueError, match=r"reads column\(s\) \['country'\] that are neither"):
        ParquetBatchReader(list_parquet_files(str(root)), CONV, 32,
                           row_filter=RowFilter.parse("country == 'fr'", "data.train_filter"))  # fmt: skip
