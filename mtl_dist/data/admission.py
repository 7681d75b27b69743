"""Feature admission: ids seen fewer than ``admit_min_count`` times in training share one row.

Rare ids overfit first (Zhang et al., CIKM 2022): an id seen a handful of times gets a row
fitted to those few labels. With ``[[features.sparse]] admit_min_count = N`` every id (a row
index after hashing / ``invalid_ids``) whose count over the whole training split is below N
reads the table's shared out-of-vocabulary row instead — the last row, ``id_rows``, one more
than the feature's ids take — in training, validation, scoring and the served program alike.

The counts are exact and static: every rank counts the whole training path before training
(:func:`count_training_ids`, one read of the admitted columns; no collective, the same on
every rank and at any world size). They live in the model (``Ranker.id_counts``,
:class:`~mtl_dist.models.admission.IdCounts`), so checkpoints and exported models carry them,
and scoring and the served program map ids from the model's counts, not from data.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from mtl_dist.config import JobConfig, SparseFeature
from mtl_dist.data.ids import sparse_ids
from mtl_dist.data.source import list_parquet_files


def admitted_features(features: list[SparseFeature]) -> list[SparseFeature]:
    """The features with admission on (``admit_min_count > 0``), in config order."""
    return [f for f in features if f.admit_min_count > 0]


def counted_features(cfg: JobConfig) -> list[SparseFeature]:
    """The features whose ids are counted: every one under ``model.embedding.l2_frequency``,
    else those with admission."""
    if cfg.model.embedding.l2_frequency:
        return list(cfg.features.sparse)
    return admitted_features(cfg.features.sparse)


def count_training_ids(cfg: JobConfig) -> dict[str, np.ndarray]:
    """Per counted feature (:func:`counted_features`), how often each row id occurs in
    ``data.train_path``: int64 ``[id_rows]`` (every id of a multi-hot list counts). ``{}``
    when none is (nothing is read). Raises ``ValueError`` naming the column for ids training
    would refuse."""
    features = counted_features(cfg)
    if not features:
        return {}
    counts = {f.name: np.zeros(f.id_rows, np.int64) for f in features}
    for path in list_parquet_files(cfg.data.train_path):
        pf = pq.ParquetFile(path)
        for rb in pf.iter_batches(batch_size=65_536, columns=[f.name for f in features]):
            for f in features:
                ids, _ = sparse_ids(f, rb.column(f.name), cfg.data.hash_seed)
                counts[f.name] += np.bincount(ids, minlength=f.id_rows)
    return counts


def admitted_masks(
    features: list[SparseFeature], counts: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per admitted feature, which of its ``[id_rows]`` ids keep their own row (bool)."""
    return {f.name: counts[f.name] >= f.admit_min_count for f in admitted_features(features)}


def admit(ids: np.ndarray, admitted: np.ndarray) -> np.ndarray:
    """Row ids ``[N]`` (each in ``[0, V)``) with every id not ``admitted [V]`` replaced by the
    shared row ``V``.

    Example::

        admit(np.array([0, 1, 2]), np.array([True, False, True]))   # array([0, 3, 2])
    """
    return np.where(admitted[ids], ids, admitted.shape[0]) if ids.size else ids
