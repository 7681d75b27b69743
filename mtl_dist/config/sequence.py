"""The checks of ``[[features.sequence]]`` (:class:`~mtl_dist.config.data.SequenceFeature`:
user-behaviour sequences, see docs/sequences.md) and which sparse feature is a sequence's
query. :func:`check_sequences` runs with the other feature checks."""

from __future__ import annotations

from dataclasses import dataclass

from mtl_dist.config.base import ConfigError, claim_name, suggest
from mtl_dist.config.data import MAX_SEQUENCE_LEN, SequenceFeature

EC_TYPES = ("table_wise", "column_wise", "row_wise")  # the EC's (distributed/sharding.py)


def sequence_query(s: SequenceFeature, sparse: list) -> str:
    """The name of the sparse feature whose embedding is ``s``'s query (see ``query``)."""
    if s.query:
        return s.query
    of_table = [f.name for f in sparse if f.table_name == s.table]
    return of_table[0] if len(of_table) == 1 else ""


@dataclass(frozen=True)
class SequencePart:
    """One aligned id list of a sequence: its KJT key, Parquet column, table and the sparse
    feature of that table whose embedding is its part of the query."""

    key: str
    column: str
    table: str
    query: str


def sequence_parts(s: SequenceFeature, sparse: list) -> list[SequencePart]:
    """``s``'s id lists in order: its ids (key ``s.name``), then each side column (key
    ``<name>/<column>``); a side table's query is its one feature ("" if not exactly one)."""
    parts = [SequencePart(s.name, s.source, s.table, sequence_query(s, sparse))]
    for col, table in zip(s.side_columns, s.side_tables):
        of_table = [f.name for f in sparse if f.table_name == table]
        query = of_table[0] if len(of_table) == 1 else ""
        parts.append(SequencePart(f"{s.name}/{col}", col, table, query))
    return parts


def check_sequences(cfg) -> None:
    """Each sequence named once (no clash with a sparse feature), every table it reads (its
    ``table``, its ``side_tables``) a sparse feature's, not managed, with single-hot features
    only and one width for all; its query a feature of its table, each side table with exactly
    one feature; side columns and tables paired, side columns under a policy that keeps the
    lists aligned (not ``drop``); ``max_len`` in ``[1, 4096]``; ``heads`` dividing the width.

    Raises:
        ConfigError: naming ``features.sequence[i] (name)`` and the key."""
    sparse = cfg.features.sparse
    names = {f.name for f in sparse}
    for i, s in enumerate(cfg.features.sequence):
        where = f"features.sequence[{i}] ({s.name or '?'})"
        claim_name(names, s.name, where)
        if len(s.side_columns) != len(s.side_tables):
            raise ConfigError(
                f"{where}: side_columns {s.side_columns} and side_tables {s.side_tables} pair "
                "up one to one"
            )
        if s.side_columns and s.invalid_ids == "drop":
            raise ConfigError(
                f"{where}: invalid_ids = 'drop' would misalign side_columns with column; use "
                "'error' | 'clip' | 'hash'"
            )
        for part in sequence_parts(s, sparse):
            _check_part(cfg, where, s, part)
        _check_floats(where, s)
        if not 1 <= s.max_len <= MAX_SEQUENCE_LEN:
            raise ConfigError(
                f"{where}: max_len = {s.max_len}: must lie in [1, {MAX_SEQUENCE_LEN}]"
            )
        if any(h < 1 for h in s.din_hidden):
            raise ConfigError(f"{where}: din_hidden = {s.din_hidden}: widths must be >= 1")
        dim = {f.table_name: f for f in sparse}[s.table].embedding_dim
        width = dim * (1 + len(s.side_columns))
        if s.pooling == "mha" and (s.heads < 1 or width % s.heads):
            raise ConfigError(
                f"{where}: heads = {s.heads} must divide the table's embedding_dim {width}"
            )
        if s.per_task and s.pooling == "mean":
            raise ConfigError(f"{where}: per_task needs a query: pooling din | mha, not mean")
        if cfg.sharding.force and cfg.sharding.force not in EC_TYPES:
            raise ConfigError(
                f"{where}: sharding.force = {cfg.sharding.force!r}, but the sequences' "
                f"EmbeddingCollection shards {' | '.join(EC_TYPES)} only"
            )


def _check_floats(where: str, s: SequenceFeature) -> None:
    """``float_side_columns``: each named once, none an id column of ``s``, under a policy
    that keeps them aligned with the ids (not ``invalid_ids = 'drop'``).

    Raises:
        ConfigError: naming ``where`` and the column."""
    seen: set[str] = set()
    ids = [s.source, *s.side_columns]
    for col in s.float_side_columns:
        if not col:
            raise ConfigError(f"{where}: float_side_columns: an empty column name")
        if col in seen:
            raise ConfigError(f"{where}: float_side_columns: {col!r} is listed twice")
        if col in ids:
            raise ConfigError(
                f"{where}: float_side_columns: {col!r} is also an id column of the sequence "
                f"(column / side_columns: {ids})"
            )
        seen.add(col)
    if s.float_side_columns and s.invalid_ids == "drop":
        raise ConfigError(
            f"{where}: invalid_ids = 'drop' would misalign float_side_columns with column; use "
            "'error' | 'clip' | 'hash'"
        )


def _check_part(cfg, where: str, s: SequenceFeature, part: SequencePart) -> None:
    """One id list's table and query (see :func:`check_sequences`)."""
    sparse = cfg.features.sparse
    tables = {f.table_name: f for f in sparse}
    key = "table" if part.key == s.name else "side_tables"
    if part.table not in tables:
        raise ConfigError(
            f"{where}: {key}: {part.table!r} is no [[features.sparse]] table"
            + suggest(part.table, list(tables))
        )
    if tables[part.table].collision == "managed":
        raise ConfigError(f"{where}: table {part.table!r} is managed (collision = 'managed')")
    of_table = [f.name for f in sparse if f.table_name == part.table]
    owner = {f.name: f for f in sparse}.get(part.query)
    if owner is None or owner.table_name != part.table:
        what = f"query {s.query!r} must name" if key == "table" else "needs exactly one"
        raise ConfigError(f"{where}: {what} a sparse feature of table {part.table!r} ({of_table})")
    multi = [f.name for f in sparse if f.table_name == part.table and f.multi_hot]
    if multi:
        raise ConfigError(
            f"{where}: table {part.table!r} moves into the sequences' EmbeddingCollection, "
            f"where its features must be single-hot; {multi} are multi_hot"
        )
    dim, first = tables[part.table].embedding_dim, tables[cfg.features.sequence[0].table]
    if dim != first.embedding_dim:
        raise ConfigError(
            f"{where}: table {part.table!r} is {dim} wide, but the sequences' tables share one "
            f"EmbeddingCollection, whose tables all have one width ({first.embedding_dim})"
        )
