"""The converter's column types checked against a file's schema at start-up (from its footer),
so a reader fails on a wrong-typed file before any rank decodes its rows."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mtl_dist.data.ids import is_ids, is_strings
from mtl_dist.data.sequence import check_float_type, check_type


def check_schema(conv: Any, schema: pa.Schema) -> None:
    """Raise ``ValueError`` naming the first column whose Arrow type ``conv`` (an
    :class:`~mtl_dist.data.batch.ArrowBatchConverter`: its sparse features, sequences and their
    parts, KJT keys, columns and ``group_by``) rejects.

    Lets a reader fail on a wrong-typed file at start-up, from its footer, instead of when
    (and on whichever rank) its rows are first decoded. Missing columns are not checked here.
    """
    for f in conv.sparse:
        tp = schema.field(f.name).type if f.name in schema.names else None
        if tp is not None and not is_ids(tp):
            raise ValueError(
                f"column '{f.name}': expected integer or string ids or a list of them, got {tp}"
            )
        item = tp.value_type if tp is not None and pa.types.is_list(tp) else tp
        if item is not None and is_strings(item) and not f.hash_buckets:
            raise ValueError(
                f"column '{f.name}': string ids need hash_buckets = N (each value maps to "
                f"xxh3_64(its UTF-8 bytes, seed data.hash_seed) mod N), got {tp}"
            )
    for s, ps in zip(conv.sequences, conv.parts):
        for c in (p.column for p in ps if p.column in schema.names):
            check_type(s, schema.field(c).type, c)
        for c in (c for c in s.float_side_columns if c in schema.names):
            check_float_type(s, schema.field(c).type, c)
    lists = {p.column for ps in conv.parts for p in ps} | set(conv.keys)
    lists |= {c for s in conv.sequences for c in s.float_side_columns}
    numeric = [c for c in conv.columns if c not in lists and c in schema.names]
    for name in numeric:
        tp = schema.field(name).type
        integer = name == conv.group_by
        if not (pa.types.is_integer(tp) or pa.types.is_boolean(tp)) and (
            integer or not pa.types.is_floating(tp)
        ):
            raise ValueError(
                f"column '{name}': expected {'an integer' if integer else 'a number'}, got {tp}"
            )
