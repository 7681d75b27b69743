"""The checks of ``[[features.sequence]]`` (:class:`~mtl_dist.config.data.SequenceFeature`:
user-behaviour sequences, see docs/sequences.md) and which sparse feature is a sequence's
query. :func:`check_sequences` runs with the other feature checks."""

from __future__ import annotations

from mtl_dist.config.base import ConfigError, suggest
from mtl_dist.config.data import MAX_SEQUENCE_LEN, SequenceFeature

EC_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise")  # TorchRec's EC sharder's


def sequence_query(s: SequenceFeature, sparse: list) -> str:
    """The name of the sparse feature whose embedding is ``s``'s query (see ``query``)."""
    if s.query:
        return s.query
    of_table = [f.name for f in sparse if f.table_name == s.table]
    return of_table[0] if len(of_table) == 1 else ""


def check_sequences(cfg) -> None:
    """Each sequence named once (no clash with a sparse feature), its table a sparse feature's
    (not managed), its query a single-hot feature of that table, ``max_len`` in
    ``[1, 4096]``, known choices, ``heads`` dividing the table's width.

    Raises:
        ConfigError: naming ``features.sequence[i] (name)`` and the key."""
    sparse = cfg.features.sparse
    tables = {f.table_name: f for f in sparse}
    names = {f.name for f in sparse}
    for i, s in enumerate(cfg.features.sequence):
        where = f"features.sequence[{i}] ({s.name or '?'})"
        if not s.name:
            raise ConfigError(f"{where}: 'name' is required")
        if s.name in names:
            raise ConfigError(f"{where}: duplicate feature name")
        names.add(s.name)
        if s.table not in tables:
            raise ConfigError(
                f"{where}: table {s.table!r} is no [[features.sparse]] table"
                + suggest(s.table, list(tables))
            )
        if tables[s.table].collision == "managed":
            raise ConfigError(f"{where}: table {s.table!r} is managed (collision = 'managed')")
        query = sequence_query(s, sparse)
        owner = {f.name: f for f in sparse}.get(query)
        if owner is None or owner.table_name != s.table:
            raise ConfigError(
                f"{where}: query {s.query!r} must name a sparse feature of table {s.table!r} "
                f"({[f.name for f in sparse if f.table_name == s.table]})"
            )
        if not 1 <= s.max_len <= MAX_SEQUENCE_LEN:
            raise ConfigError(
                f"{where}: max_len = {s.max_len}: must lie in [1, {MAX_SEQUENCE_LEN}]"
            )
        if any(h < 1 for h in s.din_hidden):
            raise ConfigError(f"{where}: din_hidden = {s.din_hidden}: widths must be >= 1")
        dim = tables[s.table].embedding_dim
        multi = [f.name for f in sparse if f.table_name == s.table and f.multi_hot]
        if multi:
            raise ConfigError(
                f"{where}: table {s.table!r} moves into the sequences' EmbeddingCollection, "
                f"where its features must be single-hot; {multi} are multi_hot"
            )
        if cfg.sharding.force and cfg.sharding.force not in EC_TYPES:
            raise ConfigError(
                f"{where}: sharding.force = {cfg.sharding.force!r}, but the sequences' "
                f"EmbeddingCollection shards {' | '.join(EC_TYPES)} only"
            )
        first = tables[cfg.features.sequence[0].table].embedding_dim
        if dim != first:
            raise ConfigError(
                f"{where}: table {s.table!r} is {dim} wide, but the sequences' tables share one "
                f"EmbeddingCollection, whose tables all have one width ({first})"
            )
        if s.pooling == "mha" and (s.heads < 1 or dim % s.heads):
            raise ConfigError(
                f"{where}: heads = {s.heads} must divide the table's embedding_dim {dim}"
            )
