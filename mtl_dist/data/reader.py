"""Stream Parquet as batches: each rank × loader worker reads its own contiguous row range.

The ranges and the step count per rank come from the global row index
(:mod:`mtl_dist.data.row_index`: ``world_size × num_workers`` contiguous ranges whose sizes
differ by at most one row, every rank the same number of batches — dropped surplus when
``drop_last``, masked padding otherwise). Each worker streams its range row group by row group
with ``pyarrow``'s batch iterator, decoding ``chunk_rows`` rows at a time (one Arrow→numpy pass
per column per chunk, then batches are cut as views), so memory is bounded by the chunk and
batch sizes × prefetch depth plus one row group's column chunks, never by the file size.

The position — rows consumed per global worker — is state: :meth:`ParquetBatchReader.state_dict`
and ``load_state_dict`` save and restore it, and every :class:`Batch` carries the position after
it, so a pipelined trainer can save the position of the last batch it actually trained.

A pass need not cover the whole dataset: :meth:`ParquetBatchReader.resume_pass` takes the rows
other ranks had not yet trained (global row intervals, from a checkpoint written under any
world size) and re-splits exactly those across this job's ranks × workers, so a run resumed
with a different number of processes still reads every remaining row once.

Errors: ``ValueError`` naming the file, at construction for a file that is not Parquet, lacks a
column the converter reads or has one of the wrong type (every rank checks every file, so a bad
one fails all at start), and while reading for a row group that fails to read or decode.

The filter start-up checks (:func:`count_selected`, :func:`filter_overlap`, ...) live in
:mod:`mtl_dist.data.selection`, the planning in :mod:`mtl_dist.data.row_index`; both are
re-exported here (``__all__``), as is :func:`list_parquet_files`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from mtl_dist.data.batch import ArrowBatchConverter, Batch, Columns
from mtl_dist.data.partitions import infer_partitions, schema_with_partitions, with_partitions
from mtl_dist.data.row_filter import RowFilter
from mtl_dist.data.row_index import RowGroup, batches_per_worker, index_row_groups, split_range
from mtl_dist.data.selection import (
    Overlap,
    Selection,
    count_selected,
    filter_overlap,
    overlap_warning,
    require_selected,
)
from mtl_dist.data.sequence import RowError, file_row
from mtl_dist.data.source import list_parquet_files

__all__ = [
    "Overlap",
    "ParquetBatchReader",
    "RowGroup",
    "Selection",
    "batches_per_worker",
    "count_selected",
    "describe",
    "filter_overlap",
    "index_row_groups",
    "list_parquet_files",
    "overlap_warning",
    "require_selected",
    "split_range",
]


@contextmanager
def _naming_file(g: RowGroup) -> Iterator[None]:
    """Errors reading or decoding row group ``g`` as ``ValueError`` naming its file (the
    converter names the column)."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{g.file}: failed to read row group {g.index} ({e})") from None
    except ValueError as e:  # bad values
        raise ValueError(f"{g.file}: {e}") from None


class ParquetBatchReader(IterableDataset):
    """Yields :class:`Batch` es of this rank's share of the rows (see module docstring).

    Use with ``torchdata.stateful_dataloader.StatefulDataLoader(reader, batch_size=None,
    num_workers=W)`` where ``W`` equals ``num_workers`` here (0 and 1 both mean one reader).

    Args:
        files: Parquet files, read in this order.
        converter: turns Arrow rows into a Batch.
        batch_size: rows per batch B.
        rank, world_size: this process's share.
        num_workers: loader workers per rank.
        drop_last: drop ragged batches (training) or pad them (validation).
        chunk_rows: rows read and decoded at once (≥ batch_size), then cut into batches; with the
            loader's prefetch this bounds the reader's memory.

    Example::

        reader = ParquetBatchReader(list_parquet_files("data/train"), conv, 1024, rank=0,
                                    world_size=2, num_workers=1, drop_last=True)
        for batch in reader: ...
    """

    def __init__(
        self,
        files: list[str],
        converter: ArrowBatchConverter,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = True,
        chunk_rows: int = 16384,
        row_filter: RowFilter | None = None,
    ) -> None:
        super().__init__()
        self.files = files
        self.partitions = infer_partitions(files)  # one type per key over all files
        self.row_filter = row_filter
        self.converter = converter
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.drop_last = drop_last
        self.chunk_rows = max(chunk_rows, batch_size)
        self._check_columns()  # before the filter reads any row
        self.groups = index_row_groups(files, self.partitions, row_filter)
        self.total_rows = self.groups[-1].start + self.groups[-1].num_rows if self.groups else 0
        self.start_pass()

    def start_pass(self, ranges: list[tuple[int, int]] | None = None) -> None:
        """Begin a pass over the global row ``ranges`` (default: every row), from their start.

        Offsets and worker ranges are in pass coordinates: row i of the pass is the i-th row
        of the concatenated ranges.
        """
        self.pass_ranges = [(0, self.total_rows)] if ranges is None else list(ranges)
        self.pass_rows = sum(e - b for b, e in self.pass_ranges)
        self.quota = batches_per_worker(
            self.pass_rows, self.world_size, self.num_workers, self.batch_size, self.drop_last
        )[self.rank]
        # rows already consumed in each of this rank's worker ranges (resume position)
        self.offsets = [0] * self.num_workers

    def _check_columns(self) -> None:
        need = set(self.converter.columns)
        for path in self.files:  # every rank checks every file: a bad one fails all at start
            try:
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
            schema = schema_with_partitions(schema, self.partitions[path])
            missing = sorted(need - set(schema.names))
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
            try:
                self.converter.check_schema(schema)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None

    def __len__(self) -> int:
        """Batches this rank yields per pass (the same on every rank)."""
        return sum(self.quota)

    def steps_left(self) -> int:
        """Batches this rank still yields in the current pass (the same on every rank)."""
        return sum(max(0, self._remaining(w)) for w in range(self.num_workers))

    # --- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        return {"offsets": list(self.offsets)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.offsets = list(state["offsets"])  # type: ignore[arg-type]

    def rewind(self) -> None:
        """Start the next pass at the first row, even after a partly read one (validation)."""
        self.offsets = [0] * len(self.offsets)

    def position(self, consumed: dict[int, int]) -> dict[str, object]:
        """This rank's place in the pass for a checkpoint: the pass ranges, and per global
        worker its rows consumed (``consumed``: global worker → rows, e.g. of the last batch
        trained; workers absent have consumed ``offsets``) and its untrained global rows."""
        workers = []
        for w in range(self.num_workers):
            gid = self.rank * self.num_workers + w
            done = consumed.get(gid, self.offsets[w])
            begin, end = self.worker_range(w)
            workers.append(
                {"gid": gid, "consumed": done, "remaining": self._global(begin + done, end)}
            )
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "pass_ranges": [list(r) for r in self.pass_ranges],
            "workers": workers,
        }

    def resume_pass(self, positions: list[dict[str, object]]) -> bool:
        """Continue the pass the ``positions`` of every rank (from :meth:`position`) describe.

        Same world size and workers: each worker continues exactly where it was (the batches
        an uninterrupted run would have read). Otherwise the rows no worker had trained yet
        are re-split across this job's ranks × workers. Returns whether it was exact.
        """
        p0 = positions[0]
        same = (p0["world_size"], p0["num_workers"]) == (self.world_size, self.num_workers)
        if same:
            self.start_pass([tuple(r) for r in p0["pass_ranges"]])
            mine = positions[self.rank]["workers"]
            self.offsets = [int(w["consumed"]) for w in mine]
            return True
        remaining = sorted(
            (int(b), int(e)) for p in positions for w in p["workers"] for b, e in w["remaining"]
        )
        self.start_pass(remaining)
        return False

    def _global(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Pass rows ``[begin, end)`` as global row intervals."""
        out, pos = [], 0
        for b, e in self.pass_ranges:
            lo, hi = max(begin, pos), min(end, pos + e - b)
            if lo < hi:
                out.append((b + lo - pos, b + hi - pos))
            pos += e - b
        return out

    # --- reading -----------------------------------------------------------------------

    def worker_range(self, worker: int) -> tuple[int, int]:
        """Row range ``[begin, end)`` of this rank's ``worker``, in pass coordinates."""
        return split_range(
            self.pass_rows,
            self.world_size * self.num_workers,
            self.rank * self.num_workers + worker,
        )

    def _chunks(self, begin: int, end: int) -> Iterator[Columns]:
        """Decoded chunks covering pass rows ``[begin, end)``."""
        for lo, hi in self._global(begin, end):
            yield from self._global_chunks(lo, hi)

    def _table(self, g: RowGroup) -> pa.Table:
        """Row group ``g`` whole: the converter's columns, partition values added, the rows the
        filter keeps (a filtered or partitioned group is read at once: one row group's memory)."""
        parts = self.partitions[g.file]
        cols = [c for c in self.converter.columns if c not in parts]
        table = with_partitions(pq.ParquetFile(g.file).read_row_group(g.index, columns=cols), parts)
        return table if g.keep is None else table.take(g.keep)

    def _global_chunks(self, begin: int, end: int) -> Iterator[Columns]:
        """Decoded chunks of at most ``chunk_rows`` rows covering global rows ``[begin, end)``."""
        cols = self.converter.columns
        for g in self.groups:
            lo, hi = max(begin, g.start), min(end, g.start + g.num_rows)
            if lo >= hi:
                continue
            with _naming_file(g):
                if g.keep is not None or self.partitions[g.file]:
                    table = self._table(g).slice(lo - g.start, hi - lo)
                    for at in range(0, table.num_rows, self.chunk_rows):
                        yield self._decode(table.slice(at, self.chunk_rows), g, lo - g.start + at)
                    continue
                pos = g.start
                for rb in pq.ParquetFile(g.file).iter_batches(
                    batch_size=self.chunk_rows, row_groups=[g.index], columns=cols
                ):
                    b0, b1 = max(lo, pos), min(hi, pos + rb.num_rows)
                    if b0 < b1:
                        rows = pa.Table.from_batches([rb.slice(b0 - pos, b1 - b0)])
                        yield self._decode(rows, g, b0 - g.start)
                    pos += rb.num_rows
                    if pos >= hi:
                        break

    def _decode(self, table: pa.Table, g: RowGroup, first: int) -> Columns:
        """Decode ``table``, whose first row is kept row ``first`` of group ``g``; a
        :class:`RowError` comes out at the file's row."""
        try:
            return self.converter.decode(table)
        except RowError as e:
            at = first + e.row
            row = int(g.keep[at]) if g.keep is not None else at
            raise e.shifted(file_row(pq.ParquetFile(g.file).metadata, g.index, row)) from None

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers = [info.id] if info is not None else list(range(self.num_workers))
        if info is not None and info.num_workers != self.num_workers:
            raise ValueError(
                f"reader built for {self.num_workers} workers but the loader runs {info.num_workers}"
            )
        # a finished pass (every range read to its quota) starts the next one over all rows
        if all(self._remaining(w) <= 0 for w in workers):
            if self.pass_rows != self.total_rows:
                self.start_pass()
            for w in workers:
                self.offsets[w] = 0
        # in-process reading of several worker ranges: one after another
        for w in workers:
            yield from self._iter_worker(w)

    def _remaining(self, worker: int) -> int:
        """Batches ``worker`` has still to yield in this pass (those before a resume count)."""
        consumed, B = self.offsets[worker], self.batch_size
        return self.quota[worker] - (consumed // B if self.drop_last else -(-consumed // B))

    def _iter_worker(self, worker: int) -> Iterator[Batch]:
        begin, end = self.worker_range(worker)
        consumed = self.offsets[worker]
        B = self.batch_size
        remaining = self._remaining(worker)
        gid = self.rank * self.num_workers + worker
        pending: Columns | None = None  # decoded rows not yet batched
        for chunk in self._chunks(begin + consumed, end):
            if remaining <= 0:
                break
            pending = chunk if pending is None else Columns.concat([pending, chunk])
            start = 0
            while pending.num_rows - start >= B and remaining > 0:
                consumed += B
                self.offsets[worker] = consumed
                remaining -= 1
                yield self.converter.to_batch(pending.slice(start, start + B), B, (gid, consumed))
                start += B
            pending = pending.slice(start, pending.num_rows) if start < pending.num_rows else None
        if remaining > 0 and pending is not None and not self.drop_last:
            consumed += pending.num_rows
            self.offsets[worker] = consumed
            remaining -= 1
            yield self.converter.to_batch(pending, B, (gid, consumed))
        # padding batches keep every rank at the same step count (validation only)
        if remaining > 0:
            schema = pq.read_schema(self.files[0]).empty_table()
            empty = with_partitions(schema, self.partitions[self.files[0]])
            empty = self.converter.decode(empty.select(self.converter.columns))
            for _ in range(remaining):
                yield self.converter.to_batch(empty, B, (gid, consumed))


def describe(reader: ParquetBatchReader) -> str:
    """One line: files, rows, this rank's range and batches per pass."""
    ranges = [reader.worker_range(w) for w in range(reader.num_workers)]
    part = "" if reader.pass_rows == reader.total_rows else f" (this pass: {reader.pass_rows})"
    return (
        f"{len(reader.files)} files, {reader.total_rows} rows{part}; rank {reader.rank}/"
        f"{reader.world_size} reads {sum(e - b for b, e in ranges)} rows in {len(reader)} "
        f"batches of {reader.batch_size}"
    )
