"""Reader: disjoint, complete, balanced shares per rank × worker; bounded memory; exact KJTs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from mtl_dist.config import SparseFeature, TaskSpec
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import (
    ParquetBatchReader,
    batches_per_worker,
    list_parquet_files,
    split_range,
)

SPARSE = [
    SparseFeature(name="item", vocab_size=1000),
    SparseFeature(name="tags", vocab_size=50, multi_hot=True),
]
TASKS = [TaskSpec(name="click", label="click"), TaskSpec(name="conv", label="conv")]
CONVERTER = ArrowBatchConverter(SPARSE, ["rid"], TASKS)


def table(start: int, n: int) -> pa.Table:
    """Rows with a row id (exact in float32), variable-length tag lists (some empty), null labels."""
    rid = np.arange(start, start + n)
    lens = rid % 4  # 0..3 tags
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tags = np.concatenate([np.arange(k) + r % 7 for r, k in zip(rid, lens)]).astype(np.int64)
    return pa.table(
        {
            "rid": pa.array(rid.astype(np.float32)),
            "item": pa.array(rid % 1000, pa.int64()),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tags, pa.int64())),
            "click": pa.array((rid % 3 == 0).astype(np.int8)),
            "conv": pa.array(np.where(rid % 3 == 0, rid % 2, 0).astype(np.int8), mask=rid % 3 != 0),
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Uneven files and row groups: 1000 + 2517 + 37 rows, row groups of 300."""
    d = tmp_path_factory.mktemp("pq")
    start = 0
    for i, n in enumerate([1000, 2517, 37]):
        pq.write_table(table(start, n), d / f"part-{i}.parquet", row_group_size=300)
        start += n
    return list_parquet_files(str(d)), start


def read_all(files, world, workers, batch, drop_last):
    """Every rank's batches, read through a real StatefulDataLoader (worker processes when > 1)."""
    per_rank = []
    for rank in range(world):
        reader = ParquetBatchReader(files, CONVERTER, batch, rank, world, workers, drop_last)
        loader = StatefulDataLoader(
            reader, batch_size=None, num_workers=workers if workers > 1 else 0
        )
        per_rank.append(list(loader))
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_row_exactly_once_and_ranks_balanced(files, world, workers):
    paths, total = files
    per_rank = read_all(paths, world, workers, 128, drop_last=False)
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks run different step counts: {counts}"
    seen = []
    rows_per_rank = []
    for batches in per_rank:
        n = 0
        for b in batches:
            assert b.batch_size == 128  # ragged batches are padded, never short
            real = b.mask[:, 0] > 0
            seen.append(b.dense[real, 0].long().numpy())
            n += int(real.sum())
        rows_per_rank.append(n)
    seen = np.concatenate(seen)
    assert len(seen) == total and np.array_equal(np.sort(seen), np.arange(total))
    assert (
        max(rows_per_rank) - min(rows_per_rank) <= workers
    )  # within one batch (each range ±1 row)


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (3, 2)])
def test_drop_last_equal_full_batches_no_duplicates(files, world, workers):
    paths, total = files
    per_rank = read_all(paths, world, workers, 100, drop_last=True)
    assert len({len(b) for b in per_rank}) == 1
    ids = np.concatenate([b.dense[:, 0].long().numpy() for bs in per_rank for b in bs])
    assert (ids.size == len(per_rank[0]) * world * 100) and len(np.unique(ids)) == ids.size
    assert total - ids.size < world * workers * 100 + world * 100


def test_multi_hot_lists_and_null_labels_survive(files):
    paths, _ = files
    (batches,) = read_all(paths, 1, 1, 256, drop_last=False)
    for b in batches:
        real = int((b.mask[:, 0] > 0).sum())
        rid = b.dense[:real, 0].long().numpy()
        jt = b.sparse["tags"]
        lengths = jt.lengths().numpy()
        values = jt.values().numpy()
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, r in enumerate(rid):
            assert list(values[offsets[i] : offsets[i + 1]]) == [k + r % 7 for k in range(r % 4)]
        assert np.array_equal(b.sparse["item"].values().numpy()[:real], rid % 1000)
        assert np.array_equal(b.mask[:real, 1].numpy(), (rid % 3 == 0).astype(np.float32))
        assert (lengths[real:] == 0).all()  # padding rows are empty bags


def test_resume_from_state_reads_the_rest(files):
    paths, total = files
    reader = ParquetBatchReader(paths, CONVERTER, 64, 0, 1, 1, drop_last=True)
    it = iter(reader)
    first = [next(it) for _ in range(10)]
    state = reader.state_dict()
    assert state == {"offsets": [640]} and first[-1].position == (0, 640)
    resumed = ParquetBatchReader(paths, CONVERTER, 64, 0, 1, 1, drop_last=True)
    resumed.load_state_dict(state)
    rest = list(resumed)
    ids = np.concatenate([b.dense[:, 0].long().numpy() for b in first + rest])
    assert np.array_equal(ids, np.arange(len(ids))) and len(ids) == (total // 64) * 64
    # a finished pass: the next iteration (epoch) reads everything again
    assert len(list(resumed)) == total // 64 and len(list(resumed)) == total // 64


def test_memory_bounded_by_batch_not_file(tmp_path):
    """A 2M-row file streams with peak Arrow memory far below the file's decoded size."""
    n = 2_000_000
    rid = np.arange(n)
    big = pa.table(
        {
            "rid": pa.array(rid.astype(np.float32)),
            "item": pa.array(rid % 1000, pa.int64()),
            "tags": pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(rid % 50, pa.int64())
            ),
            "click": pa.array((rid % 2).astype(np.int8)),
            "conv": pa.array((rid % 2).astype(np.int8)),
        }
    )
    decoded = big.nbytes
    pq.write_table(big, tmp_path / "big.parquet", row_group_size=65536)
    del big
    reader = ParquetBatchReader(
        [str(tmp_path / "big.parquet")], CONVERTER, 1024, 0, 1, 1, drop_last=True
    )
    base = pa.total_allocated_bytes()
    peak, rows = 0, 0
    for b in reader:
        rows += b.batch_size
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == (n // 1024) * 1024
    assert peak < decoded / 10, f"peak Arrow memory {peak} vs file {decoded}"


def test_split_and_quota_arithmetic():
    assert [split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    q = batches_per_worker(1000, 3, 2, 64, drop_last=True)
    assert len({sum(r) for r in q}) == 1
    q = batches_per_worker(1000, 3, 2, 64, drop_last=False)
    assert len({sum(r) for r in q}) == 1 and q[0] == [
        3,
        3,
    ]  # 167 rows per worker → 3 padded batches


def test_bad_input_names_file_and_column(tmp_path):
    t = table(0, 50).set_column(1, "item", pa.array(np.full(50, 5000), pa.int64()))
    pq.write_table(t, tmp_path / "bad.parquet")
    reader = ParquetBatchReader([str(tmp_path / "bad.parquet")], CONVERTER, 16, 0, 1, 1, True)
    with pytest.raises(
        ValueError, match=r"bad.parquet: column 'item': id 4999|bad.parquet: column 'item': id 5000"
    ):
        next(iter(reader))
    pq.write_table(table(0, 50).drop_columns(["conv"]), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol.parquet: missing column\(s\) conv"):
        ParquetBatchReader([str(tmp_path / "nocol.parquet")], CONVERTER, 16, 0, 1, 1, True)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk.parquet: not a readable Parquet file"):
        ParquetBatchReader([str(tmp_path / "junk.parquet")], CONVERTER, 16, 0, 1, 1, True)
    with pytest.raises(FileNotFoundError, match="Parquet path not found"):
        list_parquet_files(str(tmp_path / "missing"))


def test_paths_directory_glob_and_list(files):
    paths, _ = files
    d = paths[0].rsplit("/", 1)[0]
    assert list_parquet_files(d) == paths
    assert list_parquet_files(f"{d}/part-[01].parquet") == paths[:2]
    assert list_parquet_files(",".join(paths[::-1])) == paths[::-1]


@pytest.mark.parametrize("chunk_rows", [64, 100, 257])
def test_chunked_decoding_gives_the_same_batches(files, chunk_rows):
    """Batches cut from decoded chunks (carry-over across chunk and file ends) equal row-exact ones."""
    paths, _ = files
    ref = list(ParquetBatchReader(paths, CONVERTER, 64, 0, 2, 1, drop_last=False, chunk_rows=64))
    got = list(
        ParquetBatchReader(paths, CONVERTER, 64, 0, 2, 1, drop_last=False, chunk_rows=chunk_rows)
    )
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for name in ("dense", "labels", "mask"):
            assert (getattr(a, name) == getattr(b, name)).all()
        assert (a.sparse.values() == b.sparse.values()).all()
        assert (a.sparse.lengths() == b.sparse.lengths()).all()
        assert a.position == b.position


def test_hash_buckets_and_null_single_hot_ids():
    conv = ArrowBatchConverter(
        [SparseFeature(name="u", hash_buckets=7), SparseFeature(name="v", vocab_size=5)],
        [],
        TASKS[:1],
    )
    t = pa.table({
        "u": pa.array([3, 10, -1, 123456789], pa.int64()),
        "v": pa.array([1, None, 4, None], pa.int64()),
        "click": pa.array([0, 1, 0, 1], pa.int8()),
    })  # fmt: skip
    b = conv(t)
    assert b.sparse["u"].values().tolist() == [3, 3, 6, 123456789 % 7]
    assert b.sparse["v"].lengths().tolist() == [1, 0, 1, 0]  # a null id is an empty bag
    assert b.sparse["v"].values().tolist() == [1, 4]


@pytest.mark.parametrize("new_world,new_workers", [(3, 1), (1, 2), (2, 2)])
def test_position_reshards_remaining_rows_exactly_once(files, new_world, new_workers):
    """2 ranks x 2 workers train part of a pass; the rows nobody trained are re-split over
    another world size and read exactly once (the same world size continues exactly)."""
    files, total = files
    B = 50
    old = [
        ParquetBatchReader(files, CONVERTER, B, r, 2, num_workers=2, drop_last=False)
        for r in range(2)
    ]
    seen, positions = [], []
    for reader in old:
        trained = {}
        for w in range(2):  # worker w of rank r trains 3 + w batches
            it = reader._iter_worker(w)
            for _ in range(3 + w):
                b = next(it)
                seen += [int(x) for x in b.dense[:, 0]]
                trained[b.position[0]] = b.position[1]
        positions.append(reader.position(trained))
    rest = []
    readers = [
        ParquetBatchReader(
            files, CONVERTER, B, r, new_world, num_workers=new_workers, drop_last=False
        )
        for r in range(new_world)
    ]
    steps = []
    for reader in readers:
        exact = reader.resume_pass(positions)
        assert exact == ((new_world, new_workers) == (2, 2))
        steps.append(reader.steps_left())
        for b in reader:
            rest += [int(x) for x, m in zip(b.dense[:, 0], b.mask[:, 0]) if m > 0]
    assert len(set(steps)) == 1  # every rank runs the same number of steps
    assert sorted(seen + rest) == list(range(total))  # every row exactly once
    # after the resumed pass, the next pass covers the whole dataset again
    assert sum(1 for b in readers[0] for m in b.mask[:, 0] if m > 0) > 0
    assert readers[0].pass_rows == total
