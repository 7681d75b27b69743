"""``mtl-datagen --workload sequences``: a candidate item, the user's recent items (a list
column, oldest first) and two tasks, one of which only attention over the history can learn.

Items fall into ``clusters`` (item ``i`` is in cluster ``i mod clusters``). ``click`` depends on
whether some past item shares the candidate's cluster (``match``): a single past item decides it,
wherever it sits in the history, so the mean of 1..``max_hist`` embeddings (where the matching
one weighs 1 / length) hides it and target attention, whose weight on an item depends on its
similarity to the candidate, finds it. ``like`` depends on the candidate and the user only (no
history): the control, where pooling and attention should tie. ``recent`` depends on how
recently the user saw an item of the candidate's cluster: ``s = max over matching past items of
exp(-age / 6 h)`` (0 without one), so a match an hour ago decides it and one a day ago hardly
counts; the ids alone (no positions in the model) cannot tell the two apart, the float side
column ``hist_age_s`` can.

Columns: ``user_id`` (int64), ``item_id`` (int64), ``hist_item_ids`` (``list<int64>``, 0 to
``max_hist`` items, oldest first; some rows empty), ``category_id`` (the candidate's cluster)
and ``hist_category_ids`` (each past item's: an aligned side column), ``dense_0``, ``dense_1`` (float32 noise),
``click``, ``like`` (int8) and their true probabilities ``p_click``, ``p_like`` (float32);
``hist_age_s`` (``list<float32>``, aligned: seconds since each past event, the newest
``Exp(1 h)`` old and each older one ``Exp(1 h)`` older still, so increasing toward older items),
``recent`` (int8) and ``p_recent`` (float32). ``configs/sequences.toml`` reads the first ones,
``configs/sequences_recency.toml`` the ages and ``recent``. Deterministic in ``seed``; the
columns before ``hist_age_s`` are drawn first, so they are what they were without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEMS, USERS, CLUSTERS, MAX_HIST = 500, 1000, 20, 20
GAP_S, RECENCY_S = 3600.0, 6 * 3600.0  # mean gap between events; the recency decay


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
    click = (rng.random(n) < p_click).astype(np.int8)
    like = (rng.random(n) < p_like).astype(np.int8)
    # drawn after the columns above, which stay as they were before hist_age_s
    gaps = rng.exponential(GAP_S, hist.size)
    age = _ages_newest_last(gaps, lens)
    near = np.zeros(n)
    np.maximum.at(near, rows[same], np.exp(-age[same] / RECENCY_S))
    p_recent = _sigmoid(5.0 * near - 2.5 + 0.3 * user_effect)
    recent = (rng.random(n) < p_recent).astype(np.int8)
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
            "click": pa.array(click),
            "like": pa.array(like),
            "p_click": pa.array(p_click.astype(np.float32)),
            "p_like": pa.array(p_like.astype(np.float32)),
            "hist_age_s": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(age.astype(np.float32))
            ),
            "recent": pa.array(recent),
            "p_recent": pa.array(p_recent.astype(np.float32)),
        }
    )


def _ages_newest_last(gaps: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Seconds since each event ``[N]`` from per-event gaps ``[N]`` (rows of ``lens``, oldest
    first): the last event of a row is its gap old, each earlier one its own gap older than the
    next, i.e. the reversed cumulative sum within the row."""
    if gaps.size == 0:
        return gaps
    ends = np.cumsum(lens)
    total = np.cumsum(gaps[::-1])[::-1]  # sum of gaps from here to the flat end
    after = np.append(total, 0.0)[np.repeat(ends, lens)]  # the same from the row's end
    return total - after


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
