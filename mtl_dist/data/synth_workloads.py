"""The generated workloads' columns: sparse features (vocab, Zipf exponent, weight), dense
features, labels and their ground-truth columns, and the Arrow schema each workload writes.

* :data:`SPARSE_FEATURES`: the funnel's 21 sparse columns (17 single-hot ``int64``, 4
  multi-hot ``list<int64>``); :data:`DENSE_FEATURES`: ``dense_0 .. dense_11`` (float32);
  :data:`TASKS` / :data:`TRUTH_COLUMNS`: its labels and their true probability / mean columns.
* :data:`WORKLOADS`: name → :class:`Workload` (``funnel``, ``peers``, ``interactions``,
  ``strings``); :meth:`Workload.schema` is the file schema, in column order: sparse, dense,
  labels, truth.
* :func:`string_keys`: ids ``[n]`` as the string keys of the ``strings`` workload.

Pure data: nothing here draws a row or raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class SparseFeature:
    """One sparse column: ids drawn Zipf(``zipf``) over ``[0, vocab)`` from table ``table``."""

    name: str
    vocab: int
    multi_hot: bool
    table: str
    zipf: float  # Zipf exponent of the id distribution
    weight: float  # scale of its latent contribution to z (its importance)
    min_len: int = 1  # list length range for multi-hot columns
    max_len: int = 1


def _single(name: str, vocab: int, zipf: float, weight: float) -> SparseFeature:
    return SparseFeature(name, vocab, False, name, zipf, weight)


SPARSE_FEATURES: list[SparseFeature] = [
    _single("user_id", 200_000, 1.10, 1.0),
    _single("item_id", 100_000, 1.15, 1.0),
    _single("author_id", 50_000, 1.15, 0.6),
    _single("category_id", 1000, 1.20, 0.8),
    _single("subcategory_id", 5000, 1.15, 0.5),
    _single("city_id", 2000, 1.20, 0.3),
    _single("device_type", 8, 1.30, 0.3),
    _single("os_type", 4, 1.30, 0.15),
    _single("app_version", 50, 1.20, 0.02),
    _single("hour_of_day", 24, 1.10, 0.2),
    _single("day_of_week", 7, 1.10, 0.02),
    _single("age_bucket", 10, 1.20, 0.4),
    _single("gender", 3, 1.30, 0.2),
    _single("user_level", 8, 1.20, 0.3),
    _single("item_age_bucket", 20, 1.20, 0.3),
    _single("price_bucket", 30, 1.20, 0.3),
    _single("network_type", 5, 1.30, 0.02),
    SparseFeature("user_tags", 1000, True, "user_tags", 1.10, 0.8, 0, 8),
    SparseFeature("item_tags", 1000, True, "item_tags", 1.10, 0.8, 1, 5),
    SparseFeature("hist_item_ids", 100_000, True, "item_id", 1.15, 1.0, 0, 20),
    SparseFeature("hist_category_ids", 1000, True, "category_id", 1.20, 0.8, 0, 10),
]
# The peers' benchmark workload (``--workload peers``): 16 single-hot features, 8 dense ones and
# two binary tasks labelled on every row, click and purchase (= click and conversion, the
# ESMM paper's CTCVR label), as torch-rechub's and DeepCTR-Torch's MMoE examples take them.
PEERS_SPARSE = [f for f in SPARSE_FEATURES if not f.multi_hot and f.name != "network_type"]


@dataclass(frozen=True)
class Workload:
    """What a dataset holds: its sparse features, dense feature count and label columns."""

    name: str
    sparse: tuple[SparseFeature, ...]
    n_dense: int
    labels: tuple[str, ...]  # label columns written, in order
    truth: tuple[str, ...]  # their true probability / mean columns
    # features written as strings: name -> key prefix ("u" gives "u17"), or "hex" for a
    # Criteo-style 8-hex-digit token (a bijective scramble of the id)
    strings: tuple[tuple[str, str], ...] = ()

    @property
    def tables(self) -> dict[str, int]:
        return {f.table: f.vocab for f in self.sparse}

    @property
    def dense(self) -> list[str]:
        return [f"dense_{i}" for i in range(self.n_dense)]

    def schema(self) -> pa.Schema:
        types = {"click": pa.int8(), "conversion": pa.int8(), "purchase": pa.int8()}
        keys = dict(self.strings)
        return pa.schema(
            [
                pa.field(
                    f.name,
                    pa.string()
                    if f.name in keys
                    else pa.list_(pa.int64())
                    if f.multi_hot
                    else pa.int64(),
                )  # fmt: skip
                for f in self.sparse
            ]
            + [pa.field(n, pa.float32()) for n in self.dense]
            + [pa.field(n, types.get(n, pa.float32())) for n in self.labels]
            + [pa.field(n, pa.float32()) for n in self.truth]
        )


SPARSE_SINGLE = [f.name for f in SPARSE_FEATURES if not f.multi_hot]
MULTI_HOT = [f.name for f in SPARSE_FEATURES if f.multi_hot]
TABLES: dict[str, int] = {f.table: f.vocab for f in SPARSE_FEATURES}
DENSE_FEATURES = [f"dense_{i}" for i in range(12)]
TASKS = ("click", "conversion", "watch_time")
LABEL_COLUMNS = TASKS
TRUTH_COLUMNS = ("p_click", "p_conversion", "watch_time_log_mean")
TASK_TRUTH = dict(zip(TASKS, TRUTH_COLUMNS, strict=True))

WORKLOADS = {
    # conversion is null where click == 0 (observed only after a click)
    "funnel": Workload("funnel", tuple(SPARSE_FEATURES), len(DENSE_FEATURES), TASKS, TRUTH_COLUMNS),
    "peers": Workload(
        "peers", tuple(PEERS_SPARSE), 8, ("click", "purchase"), ("p_click", "p_purchase")
    ),
    # the peers' features and tasks, but each task's logit is dominated by pairwise products of
    # feature effects (``_INTERACTION_TERMS``), so an explicit interaction layer has work to do
    "interactions": Workload(
        "interactions", tuple(PEERS_SPARSE), 8, ("click", "purchase"), ("p_click", "p_purchase")
    ),
    # the peers' workload as real logs hold it: user / item / author keys as strings and a
    # Criteo-style hex token (the same ids underneath, so the labels and oracle are the same)
    "strings": Workload(
        "strings",
        tuple(PEERS_SPARSE),
        8,
        ("click", "purchase"),
        ("p_click", "p_purchase"),
        (("user_id", "u"), ("item_id", "i"), ("author_id", "a"), ("subcategory_id", "hex")),
    ),
}


def string_keys(ids: np.ndarray, kind: str) -> pa.Array:
    """Ids ``[n]`` as string keys: ``<prefix><id>``, or (``hex``) 8 hex digits of the id times
    an odd constant mod 2^32 (Knuth's multiplicative hash: a bijection, so no two ids share
    a token)."""
    if kind == "hex":
        scrambled = (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
        return pa.array(np.char.mod("%08x", scrambled).tolist(), pa.string())
    return pa.array(np.char.add(kind, ids.astype(str)).tolist(), pa.string())


SCHEMA = WORKLOADS["funnel"].schema()
