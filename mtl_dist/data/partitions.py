"""Hive partitions: the ``key=value`` directories between a dataset's root and a file
(``dt=2026-11-01/part-0.parquet``) are columns of every row of that file.

Like ``pyarrow.dataset.dataset(path, partitioning="hive")``, a key has one type over the whole
dataset (:func:`infer_partitions`): int64 when every one of its values is an integer
(``-?[0-9]+``) within int64 (``04`` reads 4), else string for every file (``shop=3``,
``shop=04``, ``shop=x1``: three strings, ``'3'``, ``'04'``, ``'x1'``; ``id=99999999999999999999``,
beyond int64, makes ``id`` a string). (pyarrow types integers int32; here they are int64.) They
can be read as features, labels or GAUC groups like file columns (:func:`with_partitions` adds
them to a table as constant columns, :func:`schema_with_partitions` to a schema).

Paths may be URIs (``s3://bucket/dt=1/x.parquet``): the scheme is left out. Nothing here reads
a file or raises; a directory without ``=`` (or with an empty key) is not a partition.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pyarrow as pa

# an integer as text, and the range int64 holds (the row filter checks its literals by them)
INT_TEXT = re.compile(r"-?[0-9]+\Z")
INT64_RANGE = (-(2**63), 2**63 - 1)


def _as_int(value: str) -> int | None:
    """``value`` as an integer when it is one within int64 (else None)."""
    if not INT_TEXT.match(value):
        return None
    n = int(value)
    return n if INT64_RANGE[0] <= n <= INT64_RANGE[1] else None


def raw_partitions(path: str) -> dict[str, str]:
    """The ``key=value`` directories on ``path`` as written, outermost first."""
    out: dict[str, str] = {}
    for part in PurePosixPath(path.split("://", 1)[-1]).parts[:-1]:
        key, eq, value = part.partition("=")
        if eq and key:
            out[key] = value
    return out


def partition_values(path: str) -> dict[str, int | str]:
    """The ``key=value`` directories on ``path`` of ONE file, typed by that file alone (an
    integer within int64: int, else the text). A dataset's files must be typed together:
    :func:`infer_partitions`."""
    return {k: (n if (n := _as_int(v)) is not None else v) for k, v in raw_partitions(path).items()}


def infer_partitions(files: list[str]) -> dict[str, dict[str, int | str]]:
    """``{file: {key: value}}`` with one type per partition key over all ``files`` (see the
    module docstring): int when every value of the key is an integer within int64, else the
    directory text for every file — what ``pyarrow.dataset`` infers for hive partitions."""
    raw = {f: raw_partitions(f) for f in files}
    ints = {k for parts in raw.values() for k in parts}
    for parts in raw.values():
        ints -= {k for k, v in parts.items() if _as_int(v) is None}
    return {
        f: {k: (_as_int(v) if k in ints else v) for k, v in parts.items()}  # type: ignore[misc]
        for f, parts in raw.items()
    }


def partition_notes(files: list[str]) -> dict[str, str]:
    """``{key: why it has its type}`` for messages, e.g. ``'string for every file: directory
    shop=x1 is not an integer'`` (empty for a key none of whose values is an integer)."""
    raw = {f: raw_partitions(f) for f in files}
    values: dict[str, list[str]] = {}
    for parts in raw.values():
        for k, v in parts.items():
            values.setdefault(k, [])
            if v not in values[k]:
                values[k].append(v)
    notes = {}
    for k, vs in values.items():
        bad = [v for v in vs if _as_int(v) is None]
        if not bad:
            notes[k] = "int64: every value is an integer"
        elif len(bad) == len(vs):
            notes[k] = ""
        else:
            v = bad[0]
            why = "beyond int64" if INT_TEXT.match(v) else "not an integer"
            notes[k] = f"string for every file: directory {k}={v} is {why}"
    return notes


def with_partitions(table: pa.Table, parts: dict[str, int | str]) -> pa.Table:
    """``table`` with each partition value as a constant column."""
    for key, value in parts.items():
        if key not in table.column_names:
            kind = pa.string() if isinstance(value, str) else pa.int64()
            table = table.append_column(key, pa.array([value] * table.num_rows, kind))
    return table


def schema_with_partitions(schema: pa.Schema, parts: dict[str, int | str]) -> pa.Schema:
    """The columns a row of the file has as the reader reads it: a partition key replaces a
    file column of the same name (the reader reads the key from the path)."""
    kept = schema.empty_table().drop_columns([k for k in parts if k in schema.names])
    return with_partitions(kept, parts).schema
