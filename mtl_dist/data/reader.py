"""Stream Parquet as batches: each rank × loader worker reads its own contiguous row range.

The dataset's rows (all files, in sorted order, all row groups) form one global row index. It is
cut into ``world_size × num_workers`` contiguous ranges whose sizes differ by at most one row —
cut across file and row-group boundaries, so ranks stay balanced however the files are laid out
(whole files or row groups per rank would leave ranks unequal). Each worker streams its range
row group by row group with ``pyarrow``'s batch iterator, decoding ``chunk_rows`` rows at a time
(one Arrow→numpy pass per column per chunk, then batches are cut as views), so memory is bounded
by the chunk and batch sizes × prefetch depth plus one row group's column chunks, never by the
file size.

Every rank must run the same number of steps (the sharded embedding lookups are collectives), so
the step count per rank is computed from the Parquet metadata alone, identically on every rank:

* ``drop_last=True`` (training): each worker yields only full batches; ranks with more batches
  than the poorest rank drop their surplus (at most ``num_workers`` batches per rank).
* ``drop_last=False`` (validation): partial batches are padded to ``batch_size`` with masked rows,
  and ranks with fewer batches yield fully masked padding batches, so every real row is seen
  exactly once and metrics stay exact.

The position — rows consumed per global worker — is state: :meth:`ParquetBatchReader.state_dict`
and ``load_state_dict`` save and restore it, and every :class:`Batch` carries the position after
it, so a pipelined trainer can save the position of the last batch it actually trained.

A pass need not cover the whole dataset: :meth:`ParquetBatchReader.resume_pass` takes the rows
other ranks had not yet trained (global row intervals, from a checkpoint written under any
world size) and re-splits exactly those across this job's ranks × workers, so a run resumed
with a different number of processes still reads every remaining row once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from mtl_dist.data.batch import ArrowBatchConverter, Batch, Columns
from mtl_dist.data.source import (
    RowFilter,
    infer_partitions,
    list_parquet_files,
    partition_notes,
    raw_partitions,
    with_partitions,
)

__all__ = [
    "Overlap",
    "ParquetBatchReader",
    "Selection",
    "count_selected",
    "describe",
    "filter_overlap",
    "list_parquet_files",
    "overlap_warning",
    "require_selected",
]


@dataclass(frozen=True, eq=False)
class RowGroup:
    """One row group and its place in the global row index (of the rows a filter keeps)."""

    file: str
    index: int
    start: int  # global row index of its first (kept) row
    num_rows: int  # rows kept
    keep: np.ndarray | None = None  # indices of the kept rows in the group (None: all)


def _schema_with_partitions(schema: pa.Schema, parts: dict[str, int | str]) -> pa.Schema:
    """The columns a row of the file has as the reader reads it: a partition key replaces a
    file column of the same name (the reader reads the key from the path)."""
    kept = schema.empty_table().drop_columns([k for k in parts if k in schema.names])
    return with_partitions(kept, parts).schema


def index_row_groups(
    files: list[str],
    partitions: dict[str, dict[str, int | str]] | None = None,
    row_filter: RowFilter | None = None,
) -> list[RowGroup]:
    """Global row index. Without a filter from Parquet footers only (no data read). With one,
    it is bound to each file's columns and partition values (a literal of the wrong type
    stops here, naming the file), a file whose partition values fail it is skipped unread,
    and each remaining row group's filter columns are read to find the rows it keeps.

    ``partitions``: ``{file: {key: value}}``, default :func:`infer_partitions` of ``files``
    (one type per key over all of them).

    Counts come from row-group metadata: ``fragment.count_rows()`` on a row-group subset is
    known to return the whole file's count on pyarrow 26.
    """
    if partitions is None:
        partitions = infer_partitions(files)
    notes = partition_notes(files) if row_filter is not None else {}
    groups: list[RowGroup] = []
    start = 0
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        parts = partitions.get(path, {})
        meta = pf.metadata
        row_filter_here, expression = None, None
        if row_filter is not None:
            names = set(pf.schema_arrow.names)
            unknown = sorted(row_filter.columns - set(parts) - names)
            if unknown:
                raise ValueError(
                    f"{path}: filter {row_filter.text!r} reads column(s) {unknown} that are "
                    "neither in the file nor partition keys of its path"
                )
            schema = _schema_with_partitions(pf.schema_arrow, parts)
            origins = {
                k: f"a partition key of {path}" + (f"; {notes[k]}" if notes.get(k) else "")
                for k in parts
            }
            expression = row_filter.bind(schema, path, origins)
            if row_filter.columns <= set(parts):  # partitions alone decide: the whole file
                one = with_partitions(pa.table({"__one__": [0]}), parts)
                if not len(row_filter.keep(one, expression)):
                    continue
            else:
                row_filter_here = row_filter
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            keep = None
            if n and row_filter_here is not None:
                cols = sorted(row_filter_here.columns - set(parts))
                table = with_partitions(pf.read_row_group(i, columns=cols), parts)
                keep = row_filter_here.keep(table, expression)
                n = len(keep)
            if n:
                groups.append(RowGroup(path, i, start, n, keep))
                start += n
    return groups


# --- start-up checks of the filters (next to the reader's index; the caller decides) ----------


@dataclass(frozen=True)
class Selection:
    """What a filter keeps of a dataset: rows and files kept of all, and the partitions found
    (``key=value/...`` directories, of the keys the filter reads when it reads any)."""

    path: str
    filter_text: str
    rows: int
    files: int
    total_rows: int
    total_files: int
    partitions: tuple[str, ...]


def _partition_dirs(files: list[str], keys: frozenset[str] | None) -> tuple[str, ...]:
    out = []
    for f in files:
        parts = raw_partitions(f)
        if keys and keys & set(parts):
            parts = {k: v for k, v in parts.items() if k in keys}
        d = "/".join(f"{k}={v}" for k, v in parts.items())
        if d and d not in out:
            out.append(d)
    return tuple(sorted(out, reverse=True))  # newest first for dates


def _listed(items: tuple[str, ...], most: int = 12) -> str:
    if not items:
        return "none (no key=value directories)"
    head = ", ".join(items[:most])
    return head if len(items) <= most else f"{head}, ... ({len(items)} in all)"


def count_selected(path: str | list[str], row_filter: RowFilter | None) -> Selection:
    """Rows and files of the dataset at ``path`` (as ``data.*_path``, or its files) that
    ``row_filter`` keeps (all of them without a filter). Reads footers and the filter's
    columns only; raises the reader's errors (a filter of the wrong type, an unknown
    column)."""
    files = list_parquet_files(path) if isinstance(path, str) else list(path)
    name = path if isinstance(path, str) else ",".join(files)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if row_filter is None:
        groups = index_row_groups(files)
    else:
        groups = index_row_groups(files, infer_partitions(files), row_filter)
    return Selection(
        path=name,
        filter_text=row_filter.text if row_filter is not None else "",
        rows=sum(g.num_rows for g in groups),
        files=len({g.file for g in groups}),
        total_rows=total,
        total_files=len(files),
        partitions=_partition_dirs(files, row_filter.columns if row_filter else None),
    )


def require_selected(path: str | list[str], row_filter: RowFilter | None) -> Selection:
    """:func:`count_selected`, and ``ValueError`` when the filter keeps no row, e.g.
    ``data.val_filter "dt == '2026-12-01'" selects no row of /logs (2 files, 700 rows):
    partitions found: dt=2026-11-30, dt=2026-11-29``."""
    sel = count_selected(path, row_filter)
    if sel.rows == 0:
        what = f'{row_filter.key} "{row_filter.text}"' if row_filter else "the dataset"
        raise ValueError(
            f"{what} selects no row of {sel.path} ({sel.total_files} files, "
            f"{sel.total_rows} rows): partitions found: {_listed(sel.partitions)}"
        )
    return sel


@dataclass(frozen=True)
class Overlap:
    """Rows (and files, partitions) both the training and the validation filter keep."""

    rows: int
    files: int
    partitions: tuple[str, ...]
    train_rows: int
    val_rows: int


def _same_file(path: str) -> str:
    local = path[len("file://") :] if path.startswith("file://") else path
    return local if "://" in local else os.path.realpath(local)


def filter_overlap(
    train_path: str | list[str],
    train_filter: RowFilter | None,
    val_path: str | list[str],
    val_filter: RowFilter | None,
) -> Overlap:
    """Rows of files in both datasets kept by both filters (each dataset's partitions typed
    over its own files, as its reader does), counted exactly row group by row group; only
    the files both datasets hold are read (``train_rows`` / ``val_rows`` count those files'
    kept rows)."""
    tfiles = list_parquet_files(train_path) if isinstance(train_path, str) else list(train_path)
    vfiles = list_parquet_files(val_path) if isinstance(val_path, str) else list(val_path)
    shared = {_same_file(f) for f in tfiles} & {_same_file(f) for f in vfiles}
    if not shared:  # disjoint files: nothing to index (the common case costs a listing)
        return Overlap(0, 0, (), 0, 0)
    ttyped, vtyped = infer_partitions(tfiles), infer_partitions(vfiles)  # typed over all files
    tfiles = [f for f in tfiles if _same_file(f) in shared]
    vfiles = [f for f in vfiles if _same_file(f) in shared]
    tgroups = index_row_groups(tfiles, {f: ttyped[f] for f in tfiles}, train_filter)
    vgroups = index_row_groups(vfiles, {f: vtyped[f] for f in vfiles}, val_filter)
    kept = {(_same_file(g.file), g.index): g for g in tgroups}
    rows, files, dirs = 0, set(), []
    for g in vgroups:
        t = kept.get((_same_file(g.file), g.index))
        if t is None:
            continue
        if t.keep is None or g.keep is None:  # one keeps the whole group: the other's rows
            n = min(t.num_rows, g.num_rows)
        else:
            n = len(np.intersect1d(t.keep, g.keep, assume_unique=True))
        if n:
            rows += n
            files.add(_same_file(g.file))
            d = "/".join(f"{k}={v}" for k, v in raw_partitions(g.file).items())
            if d and d not in dirs:
                dirs.append(d)
    return Overlap(
        rows=rows,
        files=len(files),
        partitions=tuple(sorted(dirs, reverse=True)),
        train_rows=sum(g.num_rows for g in tgroups),
        val_rows=sum(g.num_rows for g in vgroups),
    )


def overlap_warning(
    train_path: str | list[str],
    train_filter: RowFilter | None,
    val_path: str | list[str],
    val_filter: RowFilter | None,
) -> str | None:
    """A start-up warning when training and validation share rows (None when they do not),
    e.g. ``data.train_filter "dt <= '2026-11-07'" and data.val_filter "dt >= '2026-11-07'"
    overlap: 350 rows in 1 file(s) (350 of 2100 training rows, 350 of 700 validation rows in
    the files both read): dt=2026-11-07``."""
    o = filter_overlap(train_path, train_filter, val_path, val_filter)
    if not o.rows:
        return None
    tf = f'data.train_filter "{train_filter.text}"' if train_filter else "data.train_path"
    vf = f'data.val_filter "{val_filter.text}"' if val_filter else "data.val_path"
    return (
        f"{tf} and {vf} overlap: {o.rows} rows in {o.files} file(s) ({o.rows} of {o.train_rows} "
        f"training rows, {o.rows} of {o.val_rows} validation rows in the files both read): "
        f"{_listed(o.partitions)}"
    )


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous range ``[begin, end)`` of part ``index`` when ``total`` rows are cut in ``parts``.

    Sizes differ by at most one row.
    """
    q, r = divmod(total, parts)
    begin = index * q + min(index, r)
    return begin, begin + q + (1 if index < r else 0)


def batches_per_worker(
    total: int, world_size: int, num_workers: int, batch_size: int, drop_last: bool
) -> list[list[int]]:
    """``[rank][worker]`` → batches that worker yields, equal in sum over every rank.

    See the module docstring for the drop / pad rule.
    """
    parts = world_size * num_workers
    counts = []
    for rank in range(world_size):
        row = []
        for w in range(num_workers):
            b, e = split_range(total, parts, rank * num_workers + w)
            row.append((e - b) // batch_size if drop_last else -(-(e - b) // batch_size))
        counts.append(row)
    sums = [sum(r) for r in counts]
    target = min(sums) if drop_last else max(sums)
    for row in counts:
        excess = sum(row) - target  # > 0 only when dropping, < 0 only when padding
        for w in reversed(range(num_workers)):
            if excess > 0:
                cut = min(excess, row[w])
                row[w] -= cut
                excess -= cut
        if excess < 0:
            row[-1] -= excess
    return counts


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
            schema = _schema_with_partitions(schema, self.partitions[path])
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
            if g.keep is not None or self.partitions[g.file]:
                try:
                    table = self._table(g).slice(lo - g.start, hi - lo)
                    for at in range(0, table.num_rows, self.chunk_rows):
                        yield self.converter.decode(table.slice(at, self.chunk_rows))
                except (pa.ArrowInvalid, OSError) as e:
                    raise ValueError(
                        f"{g.file}: failed to read row group {g.index} ({e})"
                    ) from None
                except ValueError as e:
                    raise ValueError(f"{g.file}: {e}") from None
                continue
            try:
                pf = pq.ParquetFile(g.file)
                pos = g.start
                for rb in pf.iter_batches(
                    batch_size=self.chunk_rows, row_groups=[g.index], columns=cols
                ):
                    b0, b1 = max(lo, pos), min(hi, pos + rb.num_rows)
                    if b0 < b1:
                        yield self.converter.decode(
                            pa.Table.from_batches([rb.slice(b0 - pos, b1 - b0)])
                        )
                    pos += rb.num_rows
                    if pos >= hi:
                        break
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{g.file}: failed to read row group {g.index} ({e})") from None
            except ValueError as e:  # bad values: name the file (the converter names the column)
                raise ValueError(f"{g.file}: {e}") from None

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
