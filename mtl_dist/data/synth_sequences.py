"""``mtl-datagen --workload sequences``: a candidate item, the user's recent items (a list
column, oldest first) and two tasks, one of which only attention over the history can learn.

Items fall into ``clusters`` (item ``i`` is in cluster ``i mod clusters``). ``click`` depends on
whether some past item shares the candidate's cluster (``match``): a single past item decides it,
wherever it sits in the history, so the mean of 1..``max_hist`` embeddings (where the matching
one weighs 1 / length) hides it and target attention, whose weight on an item depends on its
similarity to the candidate, finds it. ``like`` depends on the candidate and the user only (no
history): the control, where pooling and attention should tie.

Columns: ``user_id`` (int64), ``item_id`` (int64), ``hist_item_ids`` (``list<int64>``, 0 to
``max_hist`` items, oldest first; some rows empty), ``category_id`` (the candidate's cluster)
and ``hist_category_ids`` (each past item's: an aligned side column), ``dense_0``, ``dense_1`` (float32 noise),
``click``, ``like`` (int8) and their true probabilities ``p_click``, ``p_like`` (float32).
``configs/sequences.toml`` reads them. Deterministic in ``seed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEMS, USERS, CLUSTERS, MAX_HIST = 500, 1000, 20, 20


def make_rows(n: int, rng: np.random.Generator, max_hist: int = MAX_HIST) -> pa.Table:
    """``n`` rows of the workload (see the module docstring), drawn from ``rng``."""
    user = rng.integers(0, USERS, n)
    item = rng.integers(0, ITEMS, n)
    lens = rng.integers(0, max_hist + 1, n)
    hist = rng.integers(0, ITEMS, int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    rows = np.repeat(np.arange(n), lens)
    same = (hist % CLUSTERS) == (item[rows] % CLUSTERS)
    match = np.bincount(rows[same], minlength=n) > 0
    user_effect = np.sin(user * 0.37)  # fixed per user, in [-1, 1]
    item_effect = np.cos(item * 0.11)
    p_click = _sigmoid(4.0 * match - 2.0 + 0.3 * user_effect)
    p_like = _sigmoid(1.2 * item_effect + 0.8 * user_effect - 0.5)
    dense = rng.standard_normal((2, n)).astype(np.float32)
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "item_id": pa.array(item, pa.int64()),
            "hist_item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist)),
            "category_id": pa.array(item % CLUSTERS, pa.int64()),
            "hist_category_ids": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(hist % CLUSTERS)
            ),
            "dense_0": pa.array(dense[0]),
            "dense_1": pa.array(dense[1]),
            "click": pa.array((rng.random(n) < p_click).astype(np.int8)),
            "like": pa.array((rng.random(n) < p_like).astype(np.int8)),
            "p_click": pa.array(p_click.astype(np.float32)),
            "p_like": pa.array(p_like.astype(np.float32)),
        }
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def generate_sequences(
    out_dir: str | os.PathLike[str],
    train_rows: int = 200_000,
    val_rows: int = 40_000,
    files: int = 2,
    row_group_size: int = 16_384,
    seed: int = 0,
    max_hist: int = MAX_HIST,
) -> dict:
    """Write ``out_dir/train/part-*.parquet`` (``files`` files), ``out_dir/val/part-0.parquet``
    and ``meta.json``; returns the meta."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, rows, k in (("train", train_rows, files), ("val", val_rows, 1)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(np.diff(np.linspace(0, rows, k + 1).astype(int))):
            table = make_rows(int(n), rng, max_hist)
            pq.write_table(table, out / split / f"part-{i}.parquet", row_group_size=row_group_size)
    meta = {
        "workload": "sequences", "train_rows": train_rows, "val_rows": val_rows, "seed": seed,
        "items": ITEMS, "users": USERS, "clusters": CLUSTERS, "max_hist": max_hist,
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
