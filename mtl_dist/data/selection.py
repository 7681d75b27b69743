"""Start-up checks of the row filters: what a filter selects of a dataset, and the rows the
training and the validation filter both keep (next to the reader's index; the caller decides
what to do with them).

* :func:`count_selected` → :class:`Selection` (rows / files kept of all, the partitions found);
  :func:`require_selected` raises ``ValueError`` when a filter keeps no row, naming the
  partitions there are.
* :func:`filter_overlap` → :class:`Overlap` (rows, files and partitions both keep), counted
  exactly row group by row group; :func:`overlap_warning` words it for the log (None when the
  two share no row).

They read Parquet footers and the filters' columns only, and raise the index's errors
(``ValueError``: a file that is not Parquet, a filter of the wrong type, an unknown column;
``FileNotFoundError`` from :func:`~mtl_dist.data.source.list_parquet_files`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from mtl_dist.data.partitions import infer_partitions, raw_partitions
from mtl_dist.data.row_filter import RowFilter
from mtl_dist.data.row_index import index_row_groups
from mtl_dist.data.source import list_parquet_files


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
    """The distinct ``key=value/...`` directories of ``files`` (only the ``keys`` when they name
    any of a file's keys), newest first."""
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
    rows, files, hit = 0, set(), []
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
            hit.append(g.file)
    return Overlap(
        rows=rows,
        files=len(files),
        partitions=_partition_dirs(hit, None),
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
