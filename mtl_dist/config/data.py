"""The input sections: ``[data]``, ``[features]`` (``[[features.sparse]]`` entries) and
``[[tasks]]``, with the names their choice keys allow.

``data.train_filter`` / ``val_filter`` are plain strings here: their syntax is checked where they
are parsed (``mtl_dist.data.source.RowFilter.parse``, at the train entry point's start-up), since
this package imports nothing from mtl_dist outside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mtl_dist.config.base import one_of, opt

Pooling = Literal["sum", "mean"]
POOLINGS = get_args(Pooling)
InvalidIds = Literal["error", "clip", "hash", "drop"]
INVALID_IDS = get_args(InvalidIds)
Collision = Literal["modulo", "managed"]
COLLISIONS = get_args(Collision)
Eviction = Literal["lfu", "lru"]
EVICTIONS = get_args(Eviction)
TaskKind = Literal["binary", "regression"]
TASK_KINDS = get_args(TaskKind)
Transform = Literal["none", "log1p"]
TRANSFORMS = get_args(Transform)
OnInvalid = Literal["error", "mask"]
ON_INVALID = get_args(OnInvalid)
DenseNan = Literal["error", "zero"]
DENSE_NANS = get_args(DenseNan)


@dataclass
class SparseFeature:
    """A categorical column looked up in an embedding table (one row of ``[[features.sparse]]``)."""

    name: str = opt(
        "",
        "Parquet column: integer or string ids (single-hot) or a list of them (multi-hot); "
        "string ids need hash_buckets",
    )
    vocab_size: int = opt(0, "ids lie in [0, vocab_size); rows of the table")
    hash_buckets: int = opt(
        0,
        "if > 0, ids are hashed into this many rows instead: integer id mod buckets, string "
        "xxh3_64(utf-8 bytes, data.hash_seed) mod buckets",
    )
    embedding_dim: int = opt(16, "embedding width D")
    table: str = opt("", "table name; features naming the same table share it (default: name)")
    multi_hot: bool = opt(False, "column holds variable-length id lists")
    pooling: Pooling = opt("sum", f"pooling of a multi-hot list: {one_of(POOLINGS)}")
    invalid_ids: InvalidIds = opt(
        "error",
        "ids outside [0, vocab_size) and nulls inside lists: "
        + one_of(
            INVALID_IDS,
            clip="(into [0, vocab_size-1])",
            hash="(id mod vocab_size)",
            drop="(from the bag)",
        )
        + "; clip/hash drop list nulls too",
    )
    collision: Collision = opt(
        "modulo",
        "how ids map to the hash_buckets rows: "
        + one_of(
            COLLISIONS,
            modulo="(id mod buckets: distinct ids may share a row)",
            managed="(TorchRec managed collision: the ids seen most (lfu) or last (lru) each "
            "own a row, the rest share the table's miss row; row-wise sharded)",
        ),
    )
    eviction: Eviction = opt(
        "lfu", f"collision = managed: which ids keep their rows, {one_of(EVICTIONS)}"
    )
    eviction_interval: int = opt(
        10,
        "collision = managed: admit new ids (evicting others) every N training steps; in "
        "between, new ids read the miss row. Each admission costs about one step",
    )
    admit_min_count: int = opt(
        0,
        "feature admission: ids (after hashing) seen fewer than N times in the training split "
        "read one shared out-of-vocabulary row, the table's last (one row more); the counts "
        "travel in checkpoints and exported models, so scoring and the served program map "
        "ids alike (0: off)",
    )

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def id_rows(self) -> int:
        """The rows ids map to before admission: ``hash_buckets`` or ``vocab_size``."""
        return self.hash_buckets or self.vocab_size

    @property
    def num_rows(self) -> int:
        """The table's rows: :attr:`id_rows`, + the shared OOV row under admission."""
        return self.id_rows + (1 if self.admit_min_count else 0)


@dataclass
class TaskSpec:
    """One prediction task (one row of ``[[tasks]]``)."""

    name: str = opt("", "task name, used in logs and metric tags")
    kind: TaskKind = opt(
        "binary",
        one_of(TASK_KINDS, binary="(logit, BCE loss)", regression="(value, MSE loss)"),
    )
    label: str = opt("", "label column; null / NaN values are masked out of loss and metrics")
    truth: str = opt("", "optional column with the true probability / expected value (oracle)")
    transform: Transform = opt("none", f"regression target transform: {one_of(TRANSFORMS)}")
    weight: float = opt(1.0, "fixed loss weight (the fixed balancer; initial weight of others)")
    missing_values: list[float] = opt(
        [], "label values that mean 'no label', e.g. [-1] (null and NaN always do)"
    )
    condition: str = opt(
        "", "a binary task whose label must be 1 for this label to count (conversion: 'click')"
    )
    sample_weight: str = opt("", "column of per-row loss weights (finite, >= 0)")
    on_invalid: OnInvalid = opt(
        "error",
        "label outside the task's domain (binary not 0/1, infinite target): " + one_of(ON_INVALID),
    )
    negative_rate: float = opt(
        1.0,
        "binary: keep each negative with this rate in training (downsampling); predictions and "
        "metrics are corrected back: p' = p / (p + (1 - p) / rate)",
    )


SequencePooling = Literal["din", "mha", "mean"]
SEQUENCE_POOLINGS = get_args(SequencePooling)
OnNull = Literal["empty", "error"]
ON_NULLS = get_args(OnNull)
FloatTransform = Literal["log1p", "none"]
FLOAT_TRANSFORMS = get_args(FloatTransform)
MAX_SEQUENCE_LEN = 4096


@dataclass
class SequenceFeature:
    """A behaviour sequence (one row of ``[[features.sequence]]``): a Parquet ``list<int>``
    column of item ids, oldest first (the most recent event last)."""

    name: str = opt("", "feature name: the KJT key and the head input's block (attribution)")
    column: str = opt("", "Parquet list<int> column of the ids, oldest first (default: name)")
    table: str = opt(
        "",
        "the [[features.sparse]] table the ids are looked up in (e.g. the candidate's item "
        "table); that table moves into an EmbeddingCollection shared by both",
    )
    query: str = opt(
        "",
        "the sparse feature whose embedding attends over the sequence (default: the one "
        "feature of table)",
    )
    max_len: int = opt(50, "keep the most recent max_len ids of each list (the last ones)")
    pooling: SequencePooling = opt(
        "din",
        "how the sequence becomes one vector [B, D]: "
        + one_of(
            SEQUENCE_POOLINGS,
            din="(DIN local activation unit over [q, k, q-k, q*k], weights not softmax-"
            "normalised, masked to the true length)",
            mha="(multi-head scaled dot-product attention, query = the candidate)",
            mean="(masked mean: the pooled baseline)",
        ),
    )
    din_hidden: list[int] = opt([36], "pooling = din: the activation unit's hidden widths")
    heads: int = opt(2, "pooling = mha: attention heads (the table's embedding_dim divides by it)")
    on_null: OnNull = opt(
        "empty",
        "a null list: " + one_of(ON_NULLS, empty="(no history)", error="(names file, column, row)"),
    )
    side_columns: list[str] = opt(
        [],
        "aligned list columns of ids, one per event as in column (e.g. each past item's "
        "category); each looked up in its side_tables entry, joined to the item's embedding",
    )
    side_tables: list[str] = opt(
        [],
        "the [[features.sparse]] table of each side column (its one feature, e.g. the "
        "candidate's category_id, extends the query)",
    )
    float_side_columns: list[str] = opt(
        [],
        "aligned list<float> columns, one value per event as in column (e.g. seconds since "
        "the event); projected to the keys' width and added to each past item's key",
    )
    float_transform: FloatTransform = opt(
        "log1p",
        "applied to every float side value before the projection: "
        + one_of(
            FLOAT_TRANSFORMS,
            log1p="(log(1 + x), for values >= 0 such as seconds; a negative value names file, "
            "column, row)",
            none="(as stored)",
        ),
    )
    per_task: bool = opt(
        False,
        "din / mha: each task its own query projection (the sequence block is then tasks x "
        "wider, task by task)",
    )
    recent_k: int = opt(5, "monitoring: attention/<name>/recent_share is the weight on the last k")
    invalid_ids: InvalidIds = opt(
        "error",
        "ids outside the table's rows and nulls inside a list: "
        + one_of(INVALID_IDS, error="(names file, column, row)")
        + " (as [[features.sparse]])",
    )

    @property
    def source(self) -> str:
        """The Parquet column read."""
        return self.column or self.name


@dataclass
class FeaturesConfig:
    sparse: list[SparseFeature] = opt([], "sparse features ([[features.sparse]] tables in TOML)")
    dense: list[str] = opt([], "dense float columns fed beside the pooled embeddings")
    sequence: list[SequenceFeature] = opt(
        [], "behaviour sequences ([[features.sequence]] in TOML; docs/sequences.md)"
    )


@dataclass
class DataConfig:
    train_path: str = opt(
        "data/synth/train",
        "training Parquet: a directory (hive partitions key=value/ become columns), a glob, "
        "comma-separated files, or a URI pyarrow.fs resolves (file://, s3://, gs://, ...)",
    )
    val_path: str = opt("data/synth/val", "validation Parquet: as train_path")
    num_workers: int = opt(0, "loader worker processes per rank (0 reads in the training process)")
    prefetch_batches: int = opt(2, "batches each worker reads ahead (memory bound: batch x this)")
    dense_nan: DenseNan = opt(
        "error",
        "NaN / infinite dense values: "
        + one_of(DENSE_NANS, error="(names the column)")
        + "; nulls read as 0",
    )
    hash_seed: int = opt(
        0, "seed of xxh3_64, the hash of string ids (a row = xxh3_64(utf-8 bytes, seed) mod N)"
    )
    train_filter: str = opt(
        "",
        "rows to train on: an expression over file and hive-partition columns, e.g. "
        "\"dt >= '2026-11-01' and dt < '2026-11-08'\" (== != < <= > >= in, and or not)",
    )
    val_filter: str = opt("", "rows to validate on, as train_filter (e.g. \"dt == '2026-11-08'\")")
