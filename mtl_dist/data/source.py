"""Where the rows come from: Parquet files (paths, globs, directories, or URIs ``pyarrow.fs``
resolves), their hive partitions, and a row filter written as text.

* :func:`list_parquet_files` (here) resolves ``data.train_path`` / ``val_path``: a directory
  (searched recursively), a glob, a file, a comma-separated list of those, or a URI
  (``file://``, ``s3://``, ``gs://``, ``hdfs://``: whatever ``pyarrow.fs.FileSystem.from_uri``
  takes; the files are then named by URI, which ``pyarrow.parquet`` opens through the same
  filesystem). It returns the files as a sorted list per part and raises ``FileNotFoundError``
  naming the part that matched nothing.
* :mod:`mtl_dist.data.partitions`: the ``key=value`` directories on a file's path as typed
  columns of its rows (:func:`infer_partitions`, :func:`with_partitions`, ...).
* :mod:`mtl_dist.data.row_filter`: :class:`RowFilter` (``data.train_filter`` / ``val_filter``),
  a boolean expression over file and partition columns, parsed without evaluating Python and
  checked against each file's column types; :func:`check_filters` for a job config.

Every name of those two modules that readers import from here is re-exported (``__all__``).
"""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.fs as pafs

from mtl_dist.data.partitions import (
    infer_partitions,
    partition_notes,
    partition_values,
    raw_partitions,
    with_partitions,
)
from mtl_dist.data.row_filter import RowFilter, check_filters

__all__ = [
    "RowFilter",
    "check_filters",
    "infer_partitions",
    "list_parquet_files",
    "partition_notes",
    "partition_values",
    "raw_partitions",
    "with_partitions",
]


def list_parquet_files(spec: str) -> list[str]:
    """Resolve a directory, a glob, a file, a URI or a comma-separated list of them into sorted
    Parquet files (URIs stay URIs). Raises ``FileNotFoundError`` naming the part that matched
    nothing."""
    files: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if "://" in part:
            found = _list_uri(part)
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "**", "*.parquet"), recursive=True))
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part, recursive=True))
        elif os.path.exists(part):
            found = [part]
        else:
            raise FileNotFoundError(f"Parquet path not found: {part}")
        if not found:
            raise FileNotFoundError(f"no Parquet files under: {part}")
        files += found
    return files


def _list_uri(uri: str) -> list[str]:
    scheme = uri.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise FileNotFoundError(f"{uri}: {e}") from None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"Parquet path not found: {uri}")
    if info.type == pafs.FileType.File:
        return [uri]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    paths = sorted(
        f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    return [f"{scheme}://{p}" for p in paths]
