"""Sparse ids from an Arrow column: integer or string keys, single- or multi-hot, checked against
the feature's schema and its ``invalid_ids`` policy, string keys hashed.

String keys (``string``, ``large_string``, ``binary``, ``dictionary<…, string>``) map to row
``xxh3_64(value, seed) mod hash_buckets`` (:func:`hash_strings`); integer ids are checked
against ``[0, vocab_size)`` or taken ``mod hash_buckets``. A feature with
``collision = "managed"`` keeps its raw id instead — the integer id, or the string's xxh3_64 —
taken ``mod (2**63 - 1)`` (:data:`RAW_ID_SPACE`: non-negative int64, never INT64_MAX, which
TorchRec's managed-collision module reserves for an empty slot); the module maps it to a row.
See :func:`sparse_ids`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from mtl_dist.config import SparseFeature

RAW_ID_SPACE = 2**63 - 1  # raw ids of managed-collision features lie in [0, RAW_ID_SPACE)


def sparse_ids(
    f: SparseFeature, col: pa.ChunkedArray, hash_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids and per-row bag lengths ``[n]`` of one sparse column, after ``invalid_ids``.

    Invalid ids are nulls inside a list, empty strings and, without ``hash_buckets``, ids
    outside ``[0, vocab_size)``; a null single-hot id is an empty bag, never invalid.
    Integer ids are checked and hashed in their stored type (a uint64 id beyond int64 is
    not wrapped to a negative one first); string ids are hashed (:func:`hash_strings`).
    ``collision = "managed"``: every id (a negative one too) is valid and kept as a raw id
    ``mod RAW_ID_SPACE``. Returned as int64.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not is_ids(arr.type):
        raise ValueError(
            f"column '{f.name}': expected integer or string ids or a list of them, got {arr.type}"
        )
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int32)
        flat = arr.flatten()
        invalid = ~flat.is_valid().to_numpy(zero_copy_only=False) if flat.null_count else None
    else:
        lengths = arr.is_valid().to_numpy(zero_copy_only=False).astype(np.int32)
        flat = arr.drop_null() if arr.null_count else arr
        invalid = None
    if is_strings(flat.type):
        if not f.hash_buckets:
            raise ValueError(
                f"column '{f.name}': string ids need hash_buckets = N (each value maps to "
                f"xxh3_64(its UTF-8 bytes, seed data.hash_seed) mod N), got {arr.type}"
            )
        ids, empty = hash_strings(flat, hash_seed)
        invalid = empty if invalid is None else invalid | empty
        what = "null or empty string id(s)"
    else:
        ids = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False)
        what = "null id(s) inside lists"
    # every integer type but uint64 fits int64; uint64 stays unsigned until checked
    wide = np.uint64 if ids.dtype == np.uint64 else np.int64
    ids = ids.astype(wide, copy=False)
    if invalid is not None and invalid.any():
        if f.invalid_ids == "error":
            raise ValueError(
                f"column '{f.name}': {int(invalid.sum())} {what} (drop them upstream or set "
                "invalid_ids = 'drop' | 'clip' | 'hash', which drop them)"
            )
        ids, lengths = _drop(ids, lengths, invalid)
    if f.collision == "managed":  # the managed-collision module maps raw ids to rows
        return np.mod(ids, wide(RAW_ID_SPACE)).astype(np.int64), lengths
    if f.hash_buckets:
        return np.mod(ids, wide(f.hash_buckets)).astype(np.int64), lengths
    bad = (ids < 0) | (ids >= f.vocab_size) if wide is np.int64 else ids >= f.vocab_size
    if not bad.any():
        return ids.astype(np.int64, copy=False), lengths
    if f.invalid_ids == "error":
        raise ValueError(
            f"column '{f.name}': id {int(ids[bad][0])} outside [0, {f.vocab_size}) "
            f"({int(bad.sum())} of {ids.size} ids; raise vocab_size, set hash_buckets, or set "
            "invalid_ids = 'clip' | 'hash' | 'drop')"
        )
    if f.invalid_ids == "clip":
        return np.clip(ids, 0, f.vocab_size - 1).astype(np.int64), lengths
    if f.invalid_ids == "hash":
        return np.mod(ids, wide(f.vocab_size)).astype(np.int64), lengths
    ids, lengths = _drop(ids, lengths, bad)
    return ids.astype(np.int64), lengths


def is_strings(tp: pa.DataType) -> bool:
    """string / large_string / binary / large_binary, or a dictionary of them."""
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return (
        pa.types.is_string(tp)
        or pa.types.is_large_string(tp)
        or pa.types.is_binary(tp)
        or pa.types.is_large_binary(tp)
    )


def is_ids(tp: pa.DataType) -> bool:
    """Integer or string ids, or a list of them."""
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        tp = tp.value_type
    return pa.types.is_integer(tp) or is_strings(tp)


def hash_strings(values: pa.Array, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``xxh3_64(value, seed)`` of every value ``[n]`` (uint64; 0 for a null) and which are
    empty or null (``[n]`` bool, None when none is).

    The hash is XXH3's 64-bit variant (xxHash, ``XXH3_64bits_withSeed``) over a string's UTF-8
    bytes (a binary value's own bytes), so a server in any language reproduces it. Each
    distinct value is hashed once: the array is dictionary-encoded (an Arrow dictionary column
    already is) and only its dictionary is hashed, then indexed.
    """
    if not pa.types.is_dictionary(values.type):
        values = pc.dictionary_encode(values)
    words = values.dictionary
    if pa.types.is_string(words.type) or pa.types.is_large_string(words.type):
        words = words.cast(pa.large_binary())  # the UTF-8 bytes, no copy per value in Python
    dictionary = words.to_pylist()
    table = np.fromiter(
        (xxhash.xxh3_64_intdigest(v, seed) for v in dictionary), np.uint64, len(dictionary)
    )
    empty = np.fromiter((len(v) == 0 for v in dictionary), bool, len(dictionary))
    index = values.indices
    nulls = ~index.is_valid().to_numpy(zero_copy_only=False) if index.null_count else None
    index = pc.fill_null(index, 0).to_numpy(zero_copy_only=False) if len(dictionary) else index
    if not len(dictionary):  # every value null
        return np.zeros(len(values), np.uint64), np.ones(len(values), bool)
    out, bad = table[index], empty[index]
    if nulls is not None:
        bad |= nulls
    return out, (bad if bad.any() else None)


def _drop(ids: np.ndarray, lengths: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``ids`` and bag ``lengths`` ``[n]`` without the ids where ``drop`` is set."""
    rows = np.repeat(np.arange(lengths.size), lengths)
    kept = np.bincount(rows[~drop], minlength=lengths.size).astype(np.int32)
    return ids[~drop], kept
