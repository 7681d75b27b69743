"""Behaviour sequences from Parquet list columns: the ids of each row's list, checked against the
table they are looked up in, the most recent ``max_len`` kept (lists hold events oldest first).

:func:`sequence_ids` returns what the converter puts into the batch's KJT under the sequence's
name (flat ids and per-row lengths ≤ ``max_len``), so a sequence is sliced, concatenated, padded,
sharded and resumed as any multi-hot feature is. Bad rows raise :class:`RowError`, which names
the column and the row; the reader adds the file and turns the row into the file's row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl_dist.config import SequenceFeature, SparseFeature
from mtl_dist.config.sequence import SequencePart
from mtl_dist.data.ids import is_strings, sparse_ids


class RowError(ValueError):
    """A bad value at ``row`` (of the decoded table; the reader shifts it to the file's row) of
    ``column``: ``column 'c', row r: what``."""

    def __init__(self, column: str, row: int, what: str) -> None:
        super().__init__(f"column '{column}', row {row}: {what}")
        self.column, self.row, self.what = column, row, what

    def shifted(self, row: int) -> RowError:
        """The same error at ``row`` instead."""
        return RowError(self.column, row, self.what)


def as_sparse(s: SequenceFeature, table: SparseFeature) -> SparseFeature:
    """The multi-hot sparse feature reading ``s``'s column into ``table``'s rows under ``s``'s
    ``invalid_ids``."""
    return dataclasses.replace(
        table, name=s.source, multi_hot=True, invalid_ids=s.invalid_ids, collision="modulo"
    )


def check_type(s: SequenceFeature, tp: pa.DataType, column: str = "") -> None:
    """Raise ``ValueError`` naming the column (``column``, default ``s``'s) unless ``tp`` is a
    list of integer / string ids."""
    if not (pa.types.is_list(tp) or pa.types.is_large_list(tp)) or not (
        pa.types.is_integer(tp.value_type) or is_strings(tp.value_type)
    ):
        raise ValueError(
            f"column '{column or s.source}' (sequence {s.name}): expected a list of integer or string "
            f"ids, got {tp}"
        )


def sequence_ids(
    s: SequenceFeature, table: SparseFeature, col: pa.ChunkedArray, hash_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids and per-row lengths ``[n]`` (int32, each ≤ ``max_len``) of sequence ``s``.

    A null list is an empty history (``on_null = "empty"``) or an error; an empty list is an
    empty history. Ids outside ``table``'s rows and nulls inside a list follow ``invalid_ids``
    (as :func:`~mtl_dist.data.ids.sparse_ids`); ``table``'s ``hash_buckets`` hash them as it
    does. Then each row keeps its last ``max_len`` ids.

    Raises:
        RowError: naming the column and the first bad row (a null list under ``on_null =
            "error"``, a null or out-of-range id under ``invalid_ids = "error"``).
        ValueError: the column is not a list of ids.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    check_type(s, arr.type)
    if arr.null_count and s.on_null == "error":
        row = int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0])
        raise RowError(
            s.source,
            row,
            f"null list ({arr.null_count} rows; write [] or set on_null = 'empty')",
        )
    if s.invalid_ids == "error":
        _check_ids(s, table, arr)
    flat, lengths = sparse_ids(as_sparse(s, table), arr, hash_seed)
    return keep_last(flat, lengths, s.max_len)


def aligned_ids(
    s: SequenceFeature,
    parts: list[SequencePart],
    tables: dict[str, SparseFeature],
    table: pa.Table,
    hash_seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`sequence_ids` of each of ``s``'s id lists (``parts``: its ids, then its side
    columns), after checking that every side list holds as many ids as the ids list, row by row
    (a null list counts as empty).

    Raises:
        RowError: naming the side column and the first row whose length differs (before, or
            after ``clip`` / ``hash`` dropped a null inside a list)."""
    for p in parts:
        check_type(s, table.column(p.column).type, p.column)
    base = _lengths(table.column(s.source))
    for p in parts[1:]:
        lens = _lengths(table.column(p.column))
        bad = np.flatnonzero(lens != base)
        if bad.size:
            r = int(bad[0])
            raise RowError(
                p.column,
                r,
                f"{lens[r]} ids where '{s.source}' has {base[r]} (side columns align with it, "
                f"one id per event; {bad.size} rows differ in this read)",
            )
    out = []
    for p in parts:
        one = dataclasses.replace(s, name=p.key, column=p.column, table=p.table)
        out.append(sequence_ids(one, tables[p.table], table.column(p.column), hash_seed))
        bad = np.flatnonzero(out[-1][1] != out[0][1])  # nulls inside lists dropped by clip / hash
        if bad.size:
            r = int(bad[0])
            raise RowError(
                p.column, r, f"a null id inside the list would misalign it with '{s.source}'"
            )
    return out


def check_float_type(s: SequenceFeature, tp: pa.DataType, column: str) -> None:
    """Raise ``ValueError`` naming the column unless ``tp`` is a list of floats or integers."""
    if not (pa.types.is_list(tp) or pa.types.is_large_list(tp)) or not (
        pa.types.is_floating(tp.value_type) or pa.types.is_integer(tp.value_type)
    ):
        raise ValueError(
            f"column '{column}' (float side column of sequence {s.name}): expected a list of "
            f"floats, got {tp}"
        )


def float_rule(s: SequenceFeature) -> tuple[float | None, str]:
    """What a value of ``s``'s float side columns must be, besides finite in float32: ``(the
    lowest value allowed, or None; what a bad value is, as the errors name it)``. Under
    ``float_transform = "log1p"`` the lowest is 0. The reader and the serving client (through
    the package metadata) refuse the same values."""
    if s.float_transform == "log1p":
        return 0.0, "a null, NaN, infinite or negative value (float_transform = 'log1p')"
    return None, "a null, NaN or infinite value (or beyond float32)"


def aligned_floats(s: SequenceFeature, table: pa.Table, lengths: np.ndarray) -> np.ndarray:
    """``s``'s ``float_side_columns`` as ``[n, L · C]`` float32 (``L = max_len``, ``C`` the
    columns; position-major: row i's value of column c at kept position j is at ``j · C + c``),
    each row's last ``max_len`` values left-aligned as the ids are (oldest kept first), zeros
    after its length. Values are stored as read (``float_transform`` applies in the model).

    Args:
        lengths: ``[n]`` the ids' kept lengths (after :func:`aligned_ids`).

    Raises:
        RowError: naming the float column and the first bad row: a null list (unless the ids'
            list is null too and ``on_null = "empty"``), a null, NaN or infinite value, a value
            below 0 under ``float_transform = "log1p"``, a length other than the ids', or an id
            list that lost a null id to ``clip`` / ``hash`` (the values would misalign).
        ValueError: a column is not a list of numbers.
    """
    n, L, C = table.num_rows, s.max_len, len(s.float_side_columns)
    out = np.zeros((n, L, C), dtype=np.float32)
    if not C:
        return out.reshape(n, 0)
    ids = table.column(s.source)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    base = _lengths(ids)
    ids_null = ~ids.is_valid().to_numpy(zero_copy_only=False)
    lost = np.flatnonzero(np.minimum(base, L) != lengths)
    for c, name in enumerate(s.float_side_columns):
        arr = table.column(name)
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        check_float_type(s, arr.type, name)
        null = ~arr.is_valid().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(null & ~(ids_null & (s.on_null == "empty")))
        if bad.size:
            raise RowError(name, int(bad[0]), f"null list ({bad.size} rows; write [])")
        lens = _lengths(arr)
        bad = np.flatnonzero(lens != base)
        if bad.size:
            r = int(bad[0])
            raise RowError(
                name,
                r,
                f"{lens[r]} values where '{s.source}' has {base[r]} (float side columns align "
                f"with it, one value per event; {bad.size} rows differ in this read)",
            )
        if lost.size:
            raise RowError(
                name, int(lost[0]), f"a null id inside '{s.source}' would misalign the values"
            )
        flat = arr.flatten()
        values = pc.fill_null(flat, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        wrong = ~np.isfinite(values) | ~np.isfinite(values.astype(np.float32))
        low, what = float_rule(s)
        if low is not None:
            wrong |= values < low
        if wrong.any():
            at = int(np.flatnonzero(wrong)[0])
            row = int(np.searchsorted(np.cumsum(lens), at, side="right"))
            raise RowError(name, row, f"{what}: {flat[at].as_py()!r}")
        kept, kept_lens = keep_last(values.astype(np.float32), lens, L)
        pos = np.arange(int(kept_lens.sum())) - np.repeat(
            np.cumsum(kept_lens) - kept_lens, kept_lens
        )
        out[np.repeat(np.arange(n), kept_lens), pos, c] = kept
    return out.reshape(n, L * C)


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pc.fill_null(pc.list_value_length(arr), 0).to_numpy()


def _check_ids(s: SequenceFeature, table: SparseFeature, arr: pa.Array) -> None:
    """``invalid_ids = "error"``: the first null id or id outside ``table``'s rows, by row."""
    flat = arr.flatten()
    bad = ~flat.is_valid().to_numpy(zero_copy_only=False)
    if not table.hash_buckets and pa.types.is_integer(flat.type):
        ids = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False)
        bad |= (ids < 0) | (ids >= table.vocab_size)
    if not bad.any():
        return
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
    at = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
    value = flat[at].as_py()
    what = "a null id" if value is None else f"id {value} outside [0, {table.vocab_size})"
    raise RowError(
        s.source,
        row,
        f"{what} ({int(bad.sum())} bad ids in this read; table '{table.table_name}'; set "
        "invalid_ids = 'clip' | 'hash' | 'drop')",
    )


def keep_last(flat: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's last ``max_len`` ids: ``(flat ids, lengths [n] int32)``.

    Example::

        keep_last(np.array([1, 2, 3, 4]), np.array([3, 1]), 2)  # ([2, 3, 4], [2, 1])
    """
    if lengths.size == 0 or lengths.max(initial=0) <= max_len:
        return flat, lengths.astype(np.int32, copy=False)
    ends = np.cumsum(lengths, dtype=np.int64)
    kept = np.minimum(lengths, max_len)
    starts = ends - kept
    index = np.repeat(starts - np.cumsum(kept) + kept, kept) + np.arange(int(kept.sum()))
    return flat[index], kept.astype(np.int32)


def file_row(metadata, group: int, row_in_group: int) -> int:
    """The file's row of row ``row_in_group`` of row group ``group`` (``metadata``: the file's
    ``pyarrow.parquet.FileMetaData``)."""
    return sum(metadata.row_group(i).num_rows for i in range(group)) + row_in_group
