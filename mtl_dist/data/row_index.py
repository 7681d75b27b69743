"""The global row index and its cut into per rank × worker row ranges (planning only: no row
is decoded here).

The dataset's rows (all files, in sorted order, all row groups) form one global row index
(:func:`index_row_groups`: a list of :class:`RowGroup`, each with its first global row and its
row count; with a :class:`~mtl_dist.data.row_filter.RowFilter`, only the rows it keeps are
indexed). It is cut into ``world_size × num_workers`` contiguous ranges whose sizes differ by
at most one row (:func:`split_range`) — cut across file and row-group boundaries, so ranks
stay balanced however the files are laid out (whole files or row groups per rank would leave
ranks unequal).

Every rank must run the same number of steps (the sharded embedding lookups are collectives),
so the step count per rank is computed from the Parquet metadata alone, identically on every
rank (:func:`batches_per_worker`, ``[rank][worker]`` → batches):

* ``drop_last=True`` (training): each worker yields only full batches; ranks with more batches
  than the poorest rank drop their surplus (at most ``num_workers`` batches per rank).
* ``drop_last=False`` (validation): partial batches are padded to ``batch_size`` with masked
  rows, and ranks with fewer batches yield fully masked padding batches, so every real row is
  seen exactly once and metrics stay exact.

Errors: ``ValueError`` naming the file for a file that is not readable Parquet, a filter that
reads a column neither in the file nor a partition key, or a literal of the wrong type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_dist.data.partitions import (
    infer_partitions,
    partition_notes,
    schema_with_partitions,
    with_partitions,
)
from mtl_dist.data.row_filter import RowFilter


@dataclass(frozen=True, eq=False)
class RowGroup:
    """One row group and its place in the global row index (of the rows a filter keeps)."""

    file: str
    index: int
    start: int  # global row index of its first (kept) row
    num_rows: int  # rows kept
    keep: np.ndarray | None = None  # indices of the kept rows in the group (None: all)


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
            schema = schema_with_partitions(pf.schema_arrow, parts)
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
