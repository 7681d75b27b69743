"""Deterministic synthetic recommender-funnel dataset (Parquet) with known ground truth.

Why: a multi-task ranking model can only be judged against what is achievable; here every
row carries the true probabilities / mean it was drawn from, so model metrics can be
compared with the oracle's (stored in ``meta.json``).

Layout written by :func:`generate` / ``mtl-datagen``::

    DIR/train/part-00000.parquet ...   (``files`` files, row groups of ``row_group_size``)
    DIR/val/part-00000.parquet ...     (``val_files`` files, default max(1, files // 2))
    DIR/meta.json                      (parameters, column lists, oracle metrics)

Columns, in file order:

* 17 single-hot sparse ``int64`` ids: user_id (200k), item_id (100k), author_id (50k),
  category_id (1000), subcategory_id (5000), city_id (2000), device_type (8), os_type (4),
  app_version (50), hour_of_day (24), day_of_week (7), age_bucket (10), gender (3),
  user_level (8), item_age_bucket (20), price_bucket (30), network_type (5).
* 4 multi-hot ``list<int64>`` columns of variable length (empty lists occur):
  user_tags (vocab 1000, 0..8 ids), item_tags (vocab 1000, 1..5), hist_item_ids (item_id
  space, 0..20), hist_category_ids (category_id space, 0..10).
  Ids are Zipf distributed over ``[0, vocab)`` and mapped through a fixed random permutation
  per table, so frequent ids are not 0, 1, 2, ...
* 12 dense ``float32`` features dense_0 .. dense_11 (normals and standardised log-normals).
* Labels: ``click`` int8 0/1; ``conversion`` int8, null where click == 0 (only observed after
  a click); ``watch_time`` float32 seconds >= 0 with log1p(watch_time) ~ max(0, N(mu(x), 0.5)).
* Ground truth (float32): ``p_click`` = P(click | x), ``p_conversion`` =
  P(conversion | click, x) (every row), ``watch_time_log_mean`` = E[log1p(watch_time) | x].

Generative model: each table has latent vectors ``[vocab, 8]`` (damped for rare ids, so the
signal sits mostly on frequent, learnable ids) and each feature a scale (some matter a lot,
a few nearly nothing); multi-hot features contribute the mean of their ids' rows, dense
features a random linear map. ``z`` = sum, standardised. As in the MMoE paper's synthetic
data, task t scores ``u_t = w_t . z`` with ``w_conv = rho w_click + sqrt(1 - rho^2) w_orth``
(likewise for watch), adds ``sum_i sin(a_i u_t + b_i)`` and a task-only interaction of one
or two features (click: hour x device, conversion: price x user_level, watch: item age +
category). Scales/offsets are calibrated once on a seeded sample to hit the target click
rate / AUC and conversion rate / AUC. ``--workload interactions`` (the peers' columns)
replaces the task-only terms with pairwise products f_a(x_a) * f_b(x_b) of projections of the
features' latent rows, five per task, two pairs shared by both tasks (see ``_INTERACTION_TERMS``
and :func:`interaction_share`). All latent parameters come from ``seed`` only; rows
are generated in fixed-size chunks, each with its own seeded stream, so same parameters and
seed give identical values, with memory bounded for any size.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GENERATOR_VERSION = 1
LATENT_DIM = 8
CHUNK_ROWS = 65_536  # rows generated per seeded chunk; independent of row_group_size
CALIBRATION_ROWS = 100_000
RARE_ID_SCALE = 500.0  # latent damping (1 + rank / RARE_ID_SCALE) ** -0.5
COLD_USER_RATE = 0.15  # rows whose history lists are empty
WATCH_BASE, WATCH_SCALE, WATCH_SIGMA = 3.0, 1.0, 0.5
TARGETS = {"click_rate": 0.15, "click_auc": 0.80, "conversion_rate": 0.20, "conversion_auc": 0.80}


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

_DENSE_LOGNORMAL_SIGMA = 0.75
# Task-only terms: (coefficient, features multiplied together) on per-task scalar tables.
_TASK_TERMS: dict[str, list[tuple[float, tuple[str, ...]]]] = {
    "click": [(0.6, ("hour_of_day", "device_type"))],
    "conversion": [(0.8, ("price_bucket",)), (0.6, ("price_bucket", "user_level"))],
    "watch_time": [(0.8, ("item_age_bucket",)), (0.6, ("category_id",))],
}
# ``--workload interactions``: pairwise products f_a(x_a) * f_b(x_b), where f_a is a fixed
# projection of feature a's latent rows (damped for rare ids, so learnable), one projection per
# pair. Pairs named for both tasks use the same f's (the tasks correlate through them); the
# others belong to one task. They carry more than half of each task's score variance
# (``interaction_share``), the additive projection of z and its sines the rest.
_INTERACTION_TERMS: dict[str, list[tuple[float, tuple[str, ...]]]] = {
    "click": [
        (1.0, ("user_id", "category_id")),  # shared: a user's taste for a category
        (0.7, ("item_id", "age_bucket")),  # shared: an item's appeal by age
        (1.3, ("hour_of_day", "device_type")),
        (1.0, ("gender", "subcategory_id")),
        (1.0, ("city_id", "author_id")),
    ],
    "conversion": [
        (1.0, ("user_id", "category_id")),
        (0.7, ("item_id", "age_bucket")),
        (0.9, ("price_bucket", "user_level")),
        (0.7, ("item_age_bucket", "os_type")),
        (0.5, ("user_id", "price_bucket")),
    ],
    "watch_time": [],
}


@dataclass
class _Model:
    """Every latent parameter of the generator, drawn once from the seed."""

    workload: Workload
    perm: dict[str, np.ndarray]  # table -> id of each Zipf rank
    cdf: dict[str, np.ndarray]  # feature -> Zipf CDF over ranks
    latent: dict[str, np.ndarray]  # table -> [vocab, k] float32, indexed by id
    dense_w: np.ndarray  # [n_dense, k]
    w: dict[str, np.ndarray]  # task -> unit [k]
    sin_a: np.ndarray
    sin_b: np.ndarray
    task_tables: dict[str, list[tuple[float, tuple[str, ...], list[np.ndarray]]]]
    z_mean: np.ndarray = field(default_factory=lambda: np.zeros(LATENT_DIM))
    z_std: np.ndarray = field(default_factory=lambda: np.ones(LATENT_DIM))
    s_mean: dict[str, float] = field(default_factory=dict)
    s_std: dict[str, float] = field(default_factory=dict)
    calib: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- math helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz-Stegun 7.1.26 erf, |error| < 2e-7); numpy has no erf."""
    ax = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = (
        (((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
    ) * t
    erf = 1.0 - poly * np.exp(-ax * ax)
    return 0.5 * (1.0 + np.sign(x) * erf)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties given average ranks; nan if one class is absent."""
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(
        np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True
    )
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tie group
    rank_sum = float(avg_rank[inv.ravel()][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of ``probs`` (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    w = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _expected_auc(p_sorted: np.ndarray, weight_sorted: np.ndarray) -> float:
    """AUC the oracle would reach in expectation when rows (sorted by score) carry
    label probability ``p`` and sampling weight ``weight``."""
    pos = weight_sorted * p_sorted
    neg = weight_sorted * (1.0 - p_sorted)
    neg_below = np.cumsum(neg) - neg
    return float((pos * neg_below).sum() / (pos.sum() * neg.sum()))


def _solve_offset(s: np.ndarray, scale: float, weight: np.ndarray, rate: float) -> float:
    """Offset b with weighted mean of sigmoid(scale * s + b) == rate (Newton, monotone)."""
    total = weight.sum()
    b = math.log(rate / (1.0 - rate))
    for _ in range(60):
        p = _sigmoid(scale * s + b)
        f = float((weight * p).sum() / total) - rate
        if abs(f) < 1e-10:
            break
        g = float((weight * p * (1.0 - p)).sum() / total)
        b -= float(np.clip(f / max(g, 1e-12), -4.0, 4.0))
    return b


def _calibrate(s: np.ndarray, weight: np.ndarray, rate: float, auc: float) -> tuple[float, float]:
    """(scale, offset) so that sigmoid(scale * s + offset) hits ``rate`` and expected ``auc``."""
    order = np.argsort(s, kind="stable")
    s_sorted, w_sorted = s[order], weight[order]

    def auc_at(scale: float) -> tuple[float, float]:
        b = _solve_offset(s_sorted, scale, w_sorted, rate)
        return _expected_auc(_sigmoid(scale * s_sorted + b), w_sorted), b

    lo, hi = 0.05, 10.0
    best, best_offset = auc_at(hi)
    if best <= auc:  # target unreachable: use the sharpest scale allowed
        return hi, best_offset
    for _ in range(30):  # bisection on log(scale); AUC rises with the scale
        mid = math.sqrt(lo * hi)
        got, offset = auc_at(mid)
        if abs(got - auc) < 1e-4:
            break
        lo, hi = (mid, hi) if got < auc else (lo, mid)
    return mid, offset


# --------------------------------------------------------------------------- generator


@functools.lru_cache(maxsize=4)
def _build_model(seed: int, task_correlation: float, workload: str = "funnel") -> _Model:
    """Draw every latent parameter from ``seed`` and calibrate on a seeded sample.

    Cached: a pure function of its arguments (about a second), reused by repeated calls.
    """
    wl = WORKLOADS[workload]
    rng = np.random.default_rng([seed, 1])
    k = LATENT_DIM
    perm: dict[str, np.ndarray] = {}
    latent: dict[str, np.ndarray] = {}
    for table, vocab in wl.tables.items():
        perm[table] = rng.permutation(vocab).astype(np.int64)
        damp = (1.0 + np.arange(vocab) / RARE_ID_SCALE) ** -0.5
        by_id = np.empty((vocab, k), dtype=np.float32)
        by_id[perm[table]] = rng.standard_normal((vocab, k)) * damp[:, None]
        latent[table] = by_id
    cdf = {f.name: _zipf_cdf(f.vocab, f.zipf) for f in wl.sparse}
    dense_w = rng.standard_normal((wl.n_dense, k)) * (0.6 / math.sqrt(wl.n_dense))

    q, _ = np.linalg.qr(rng.standard_normal((k, 3)))  # orthonormal columns
    rho = task_correlation
    orth = math.sqrt(max(0.0, 1.0 - rho * rho))
    w = {"click": q[:, 0], "conversion": rho * q[:, 0] + orth * q[:, 1]}
    w["watch_time"] = rho * q[:, 0] + orth * q[:, 2]
    sin_a = rng.uniform(0.5, 1.5, size=3)
    sin_b = rng.uniform(-math.pi, math.pi, size=3)
    vocab_of = {f.name: f.vocab for f in wl.sparse}
    if workload == "interactions":
        table_of = {f.name: f.table for f in wl.sparse}
        pairs: dict[tuple[str, ...], list[np.ndarray]] = {}  # one projection per pair and side
        for terms in _INTERACTION_TERMS.values():
            for _, feats in terms:
                if feats not in pairs:
                    v = rng.standard_normal((len(feats), k)) / math.sqrt(k)
                    pairs[feats] = [
                        (latent[table_of[n]] @ v[i]).astype(np.float64) for i, n in enumerate(feats)
                    ]
        task_tables = {
            t: [(c, feats, pairs[feats]) for c, feats in terms]
            for t, terms in _INTERACTION_TERMS.items()
        }
    else:
        task_tables = {
            t: [(c, feats, [rng.standard_normal(vocab_of[n]) for n in feats]) for c, feats in terms]
            for t, terms in _TASK_TERMS.items()
        }
    model = _Model(wl, perm, cdf, latent, dense_w, w, sin_a, sin_b, task_tables)

    # Calibration on a sample with its own stream: standardisation and logit scale/offset.
    cols, dense = _sample_features(model, np.random.default_rng([seed, 2]), CALIBRATION_ROWS)
    z_raw = _raw_z(model, cols, dense)
    model.z_mean, model.z_std = z_raw.mean(axis=0), z_raw.std(axis=0)
    raw = _raw_scores(model, (z_raw - model.z_mean) / model.z_std, cols)
    for t in TASKS:
        model.s_mean[t], model.s_std[t] = float(raw[t].mean()), float(raw[t].std())
    s = {t: (raw[t] - model.s_mean[t]) / model.s_std[t] for t in TASKS}
    ones = np.ones(CALIBRATION_ROWS)
    cs, cb = _calibrate(s["click"], ones, TARGETS["click_rate"], TARGETS["click_auc"])
    p_click = _sigmoid(cs * s["click"] + cb)
    vs, vb = _calibrate(
        s["conversion"], p_click, TARGETS["conversion_rate"], TARGETS["conversion_auc"]
    )
    model.calib = {
        "click_scale": cs,
        "click_offset": cb,
        "conversion_scale": vs,
        "conversion_offset": vb,
    }
    return model


def _sample_ids(model: _Model, f: SparseFeature, rng: np.random.Generator, n: int) -> np.ndarray:
    ranks = np.searchsorted(model.cdf[f.name], rng.random(n), side="right")
    return model.perm[f.table][np.minimum(ranks, f.vocab - 1)]


def _sample_features(
    model: _Model, rng: np.random.Generator, n: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Sparse columns (ids, or (int32 offsets, ids) for multi-hot) and dense [n, n_dense] float32."""
    cols: dict[str, Any] = {}
    cold = rng.random(n) < COLD_USER_RATE
    for f in model.workload.sparse:
        if not f.multi_hot:
            cols[f.name] = _sample_ids(model, f, rng, n)
            continue
        lengths = rng.integers(f.min_len, f.max_len + 1, size=n)
        if f.name.startswith("hist_"):
            lengths[cold] = 0
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        cols[f.name] = (offsets, _sample_ids(model, f, rng, int(offsets[-1])))
    n_dense = model.workload.n_dense
    dense = rng.standard_normal((n, n_dense))
    s2 = _DENSE_LOGNORMAL_SIGMA**2
    ln_mean, ln_std = math.exp(s2 / 2), math.sqrt((math.exp(s2) - 1) * math.exp(s2))
    odd = slice(n_dense // 2, n_dense)  # second half: skewed, standardised log-normals
    dense[:, odd] = (np.exp(_DENSE_LOGNORMAL_SIGMA * dense[:, odd]) - ln_mean) / ln_std
    return cols, dense.astype(np.float32)


def _raw_z(model: _Model, cols: dict[str, Any], dense: np.ndarray) -> np.ndarray:
    """Unstandardised latent state [n, k]: weighted sum of every feature's contribution."""
    z = dense.astype(np.float64) @ model.dense_w
    for f in model.workload.sparse:
        table = model.latent[f.table]
        if not f.multi_hot:
            z += f.weight * table[cols[f.name]]
            continue
        offsets, ids = cols[f.name]
        lengths = np.diff(offsets)
        rows = lengths > 0  # reduceat over non-empty starts sums exactly each list's ids
        if rows.any():
            sums = np.add.reduceat(table[ids], offsets[:-1][rows], axis=0)
            z[rows] += f.weight * sums / lengths[rows, None]  # mean; empty lists add zero
    return z


def _term_scores(model: _Model, cols: dict[str, Any], task: str) -> np.ndarray:
    """The task-only terms of ``task``'s score: sum of coef * product of per-feature tables."""
    s = np.zeros(len(next(iter(cols.values()))))
    for coef, feats, tables in model.task_tables[task]:
        term = np.full(s.shape, coef)
        for name, tab in zip(feats, tables, strict=True):
            term *= tab[cols[name]]
        s += term
    return s


def _raw_scores(model: _Model, z: np.ndarray, cols: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-task score before standardisation: shared projection, sine terms, task-only terms."""
    out = {}
    for t in TASKS:
        u = z @ model.w[t]
        s = u.copy()
        for a, b in zip(model.sin_a, model.sin_b, strict=True):
            s += np.sin(a * u + b)
        out[t] = s + _term_scores(model, cols, t)
    return out


def interaction_share(
    seed: int = 0, task_correlation: float = 0.6, rows: int = 50_000
) -> dict[str, float]:
    """Share of the click and conversion scores' variance that the pairwise products of
    ``--workload interactions`` carry (var(terms) / var(score), on a seeded sample of ``rows``)."""
    model = _build_model(seed, task_correlation, "interactions")
    cols, dense = _sample_features(model, np.random.default_rng([seed, 4]), rows)
    z = (_raw_z(model, cols, dense) - model.z_mean) / model.z_std
    raw = _raw_scores(model, z, cols)
    return {t: float(_term_scores(model, cols, t).var() / raw[t].var()) for t in TASKS[:2]}


def _make_chunk(
    model: _Model, rng: np.random.Generator, n: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """``n`` rows as an Arrow table plus the arrays the oracle metrics need."""
    cols, dense = _sample_features(model, rng, n)
    z = (_raw_z(model, cols, dense) - model.z_mean) / model.z_std
    raw = _raw_scores(model, z, cols)
    s = {t: (raw[t] - model.s_mean[t]) / model.s_std[t] for t in TASKS}
    c = model.calib
    p_click = _sigmoid(c["click_scale"] * s["click"] + c["click_offset"]).astype(np.float32)
    p_conv = _sigmoid(c["conversion_scale"] * s["conversion"] + c["conversion_offset"]).astype(
        np.float32
    )
    mu = WATCH_BASE + WATCH_SCALE * s["watch_time"]
    # log1p(watch_time) = max(0, N(mu, sigma)); its exact mean is the truncated-normal mean.
    ratio = mu / WATCH_SIGMA
    pdf = np.exp(-0.5 * ratio * ratio) / math.sqrt(2.0 * math.pi)
    watch_mean = (mu * _norm_cdf(ratio) + WATCH_SIGMA * pdf).astype(np.float32)

    click = rng.random(n) < p_click
    conv = rng.random(n) < p_conv
    log_watch = np.maximum(0.0, mu + WATCH_SIGMA * rng.standard_normal(n))
    watch_time = np.expm1(log_watch).astype(np.float32)

    wl = model.workload
    keys = dict(wl.strings)
    arrays: list[pa.Array] = []
    for f in wl.sparse:
        if f.name in keys:
            arrays.append(string_keys(cols[f.name], keys[f.name]))
        elif f.multi_hot:
            offsets, ids = cols[f.name]
            arrays.append(
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
            )
        else:
            arrays.append(pa.array(cols[f.name], pa.int64()))
    arrays += [pa.array(dense[:, i]) for i in range(dense.shape[1])]
    p_purchase = p_click * p_conv
    columns = {
        "click": pa.array(click.astype(np.int8)),
        "conversion": pa.array(conv.astype(np.int8), type=pa.int8(), mask=~click),
        "purchase": pa.array((click & conv).astype(np.int8)),
        "watch_time": pa.array(watch_time),
        "p_click": pa.array(p_click),
        "p_conversion": pa.array(p_conv),
        "p_purchase": pa.array(p_purchase),
        "watch_time_log_mean": pa.array(watch_mean),
    }
    arrays += [columns[name] for name in (*wl.labels, *wl.truth)]
    stats = {"click": click, "p_click": p_click}
    if "purchase" in wl.labels:  # two binary tasks on every row
        stats |= {"purchase": click & conv, "p_purchase": p_purchase}
    else:
        stats |= {
            "conversion": conv[click],
            "p_conversion": p_conv[click],
            "log_watch": np.log1p(watch_time.astype(np.float64)),
            "watch_mean": watch_mean,
        }
    return pa.Table.from_arrays(arrays, schema=wl.schema()), stats


def _split_sizes(rows: int, parts: int) -> list[int]:
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


def _write_split(
    model: _Model,
    seed: int,
    split_index: int,
    split_dir: Path,
    rows: int,
    files: int,
    row_group_size: int,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Write one split as ``files`` Parquet files of exact ``row_group_size`` row groups."""
    split_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for fi, nrows in enumerate(_split_sizes(rows, files)):
        path = split_dir / f"part-{fi:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        with pq.ParquetWriter(tmp, model.workload.schema(), write_page_checksum=True) as writer:
            pending: list[pa.Table] = []
            pending_rows = 0
            for ci, start in enumerate(range(0, nrows, CHUNK_ROWS)):
                n = min(CHUNK_ROWS, nrows - start)
                table, stats = _make_chunk(
                    model, np.random.default_rng([seed, 3, split_index, fi, ci]), n
                )
                for key, arr in stats.items():
                    parts.setdefault(key, []).append(arr)
                pending.append(table)
                pending_rows += n
                if pending_rows >= row_group_size:  # emit whole row groups, carry the rest
                    merged = pa.concat_tables(pending)
                    full = pending_rows - pending_rows % row_group_size
                    writer.write_table(merged.slice(0, full), row_group_size=row_group_size)
                    pending, pending_rows = [merged.slice(full)], pending_rows - full
            if pending_rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=row_group_size)
        os.replace(tmp, path)
        names.append(str(path.relative_to(split_dir.parent)))
    return names, {key: np.concatenate(arrs) for key, arrs in parts.items()}


FIRST_DAY = datetime.date(2026, 11, 1)


def day_name(i: int) -> str:
    """The ``dt=`` value of day ``i`` of a ``days`` layout (day 0 is 2026-11-01)."""
    return (FIRST_DAY + datetime.timedelta(days=i)).isoformat()


def _into_days(out: Path, names: list[str], days: int, val: bool) -> list[str]:
    """Move a split's files into ``out/dt=<day>/``: training files round-robin over days
    ``0 .. days-1``, validation files on day ``days``; returns their new relative names."""
    moved = []
    for i, name in enumerate(names):
        day = day_name(days if val else i % days)
        dest = out / f"dt={day}" / f"{'val' if val else 'train'}-{Path(name).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / name, dest)
        moved.append(str(dest.relative_to(out)))
    return moved


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def _oracle_metrics(st: dict[str, np.ndarray]) -> dict[str, Any]:
    """Rates and the metrics of the true probabilities / mean against the drawn labels."""
    clicks = int(st["click"].sum())
    if "purchase" in st:  # the peers' workload: two binary tasks on every row
        return {
            "rows": int(st["click"].size),
            "clicks": clicks,
            "purchases": int(st["purchase"].sum()),
            "click_rate": clicks / st["click"].size,
            "purchase_rate": float(st["purchase"].mean()),
            "oracle": {
                f"{t}_{m}": f(st[t], st[f"p_{t}"])
                for t in ("click", "purchase")
                for m, f in (("auc", roc_auc), ("logloss", log_loss))
            },
        }
    log_watch = st["log_watch"]
    mse = float(np.mean((log_watch - st["watch_mean"]) ** 2))
    var = float(np.var(log_watch))
    return {
        "rows": int(st["click"].size),
        "clicks": clicks,
        "conversions": int(st["conversion"].sum()),
        "click_rate": clicks / st["click"].size,
        "conversion_rate": float(st["conversion"].mean()) if clicks else None,
        "log_watch_mean": float(log_watch.mean()),
        "oracle": {
            "click_auc": _none_if_nan(roc_auc(st["click"], st["p_click"])),
            "click_logloss": log_loss(st["click"], st["p_click"]),
            "conversion_auc": _none_if_nan(roc_auc(st["conversion"], st["p_conversion"])),
            "conversion_logloss": log_loss(st["conversion"], st["p_conversion"])
            if clicks
            else None,
            "watch_mse": mse,
            "watch_r2": 1.0 - mse / var if var > 0 else None,
        },
    }


def _summary(meta: dict[str, Any]) -> str:
    p, v = meta["params"], meta["splits"]["val"]
    o = v["oracle"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    if p.get("workload") in ("peers", "strings", "interactions"):
        return (
            f"train {p['train_rows']} rows, val {p['val_rows']} rows ({p['workload']} workload); val "
            f"click "
            f"rate {fmt(v['click_rate'])} oracle AUC {fmt(o['click_auc'])}, purchase rate "
            f"{fmt(v['purchase_rate'])} oracle AUC {fmt(o['purchase_auc'])}"
        )
    return (
        f"train {p['train_rows']} rows / {p['files']} files, val {p['val_rows']} rows / "
        f"{p['val_files']} files; val click rate {fmt(v['click_rate'])} oracle AUC {fmt(o['click_auc'])}, "
        f"conversion rate {fmt(v['conversion_rate'])} AUC {fmt(o['conversion_auc'])}, "
        f"watch MSE {fmt(o['watch_mse'])} R2 {fmt(o['watch_r2'])}"
    )


def generate(
    out_dir: str | os.PathLike[str],
    train_rows: int = 300_000,
    val_rows: int = 50_000,
    files: int = 4,
    row_group_size: int = 16_384,
    seed: int = 0,
    task_correlation: float = 0.6,
    val_files: int | None = None,
    *,
    workload: str = "funnel",
    days: int = 0,
    force: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write the dataset under ``out_dir`` and return its meta (also in ``meta.json``).

    ``days`` > 0 lays it out as impression logs partitioned by day instead of ``train/`` and
    ``val/``: ``out_dir/dt=2026-11-01/`` … one directory per day, the training files spread
    over the first ``days`` days (round-robin) and the validation files on the day after, so
    the standard protocol reads ``data.train_filter = "dt < '<day after>'"`` and
    ``data.val_filter = "dt == '<day after>'"`` on the same path.

    Reuses an existing dataset whose ``meta.json`` has identical parameters (and whose files
    are all present) unless ``force``; prints one summary line when ``verbose``.
    """
    val_files = max(1, files // 2) if val_files is None else val_files
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if not 0.0 <= task_correlation <= 1.0:
        raise ValueError(f"task_correlation must be in [0, 1], got {task_correlation}")
    if seed < 0 or row_group_size < 1 or files < 1 or val_files < 1 or days < 0:
        raise ValueError("seed, days must be >= 0 and row_group_size, files, val_files >= 1")
    if train_rows < files or val_rows < val_files:
        raise ValueError("need at least one row per file in each split")
    out = Path(out_dir)
    meta_path = out / "meta.json"
    params = {
        "version": GENERATOR_VERSION,
        "train_rows": int(train_rows),
        "val_rows": int(val_rows),
        "files": int(files),
        "val_files": int(val_files),
        "row_group_size": int(row_group_size),
        "seed": int(seed),
        "task_correlation": float(task_correlation),
    }
    if workload != "funnel":  # funnel datasets written before workloads existed stay reusable
        params["workload"] = workload
    if days:
        params["days"] = int(days)
    if not force and meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = {}
        files_there = all(
            (out / f).exists() for s in old.get("splits", {}).values() for f in s["files"]
        )
        if old.get("params") == params and files_there:
            if verbose:
                print(f"reusing {out} (meta.json parameters match): {_summary(old)}")
            return old

    t0 = time.perf_counter()
    meta_path.unlink(missing_ok=True)  # an interrupted run must never look reusable
    for split in ("train", "val"):
        for stale in (out / split).glob("part-*.parquet"):
            stale.unlink()
    for stale in out.glob("dt=*/*-part-*.parquet"):
        stale.unlink()
    model = _build_model(seed, task_correlation, workload)
    wl = model.workload
    splits: dict[str, Any] = {}
    for index, (split, rows, n_files) in enumerate(
        (("train", train_rows, files), ("val", val_rows, val_files))
    ):
        names, stats = _write_split(model, seed, index, out / split, rows, n_files, row_group_size)
        if days:
            names = _into_days(out, names, days, split == "val")
            if not any((out / split).iterdir()):
                (out / split).rmdir()
        splits[split] = {"files": names, **_oracle_metrics(stats)}
    meta = {
        "generator": "mtl_dist.data.synth",
        "params": params,
        "columns": {
            "strings": dict(wl.strings),  # features written as string keys (and their form)
            "sparse": [
                {"name": f.name, "vocab": f.vocab, "table": f.table}
                for f in wl.sparse
                if not f.multi_hot
            ],
            "multi_hot": [
                {
                    "name": f.name,
                    "vocab": f.vocab,
                    "table": f.table,
                    "min_len": f.min_len,
                    "max_len": f.max_len,
                }
                for f in wl.sparse
                if f.multi_hot
            ],
            "dense": wl.dense,
            "labels": {n: str(wl.schema().field(n).type) for n in wl.labels},
            "truth": dict(zip(wl.labels, wl.truth, strict=True)),
        },
        "calibration": {**model.calib, "targets": TARGETS},
        "splits": splits,
        "generation_seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    if verbose:
        print(f"wrote {out} in {meta['generation_seconds']:.1f}s: {_summary(meta)}")
    return meta


def ctcvr_view(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], verbose: bool = True
) -> dict[str, Any]:
    """The funnel dataset at ``src`` as the peers take it, written under ``dst``.

    Same rows and files; the single-hot sparse features and the dense ones, ``click`` and
    ``purchase`` = click and conversion (the ESMM paper's CTCVR label: 0 where there was no
    click) on every row, with ``p_click`` and ``p_purchase`` = p_click * p_conversion. The
    multi-hot lists, ``conversion`` and ``watch_time`` are left out: the peers' MMoE takes
    neither variable-length ids nor null labels. Reused when ``dst/meta.json`` names the same
    source parameters.
    """
    src, out = Path(src), Path(dst)
    meta = json.loads((src / "meta.json").read_text())
    if meta["columns"]["multi_hot"] == [] or "conversion" not in meta["columns"]["labels"]:
        raise ValueError(f"{src} is not a funnel dataset")
    source = {"path": str(src.resolve()), "params": meta["params"]}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("source") == source and all(
            (out / f).exists() for s in old["splits"].values() for f in s["files"]
        ):
            return old
    meta_path.unlink(missing_ok=True)
    sparse = [f["name"] for f in meta["columns"]["sparse"]]
    dense = list(meta["columns"]["dense"])
    splits: dict[str, Any] = {}
    for split, info in meta["splits"].items():
        stats: dict[str, list[np.ndarray]] = {}
        for name in info["files"]:
            table = pq.read_table(src / name)
            click = table["click"].to_numpy().astype(bool)
            conv = table["conversion"].fill_null(0).to_numpy().astype(bool)
            p_click = table["p_click"].to_numpy()
            p_purchase = (p_click * table["p_conversion"].to_numpy()).astype(np.float32)
            view = table.select([*sparse, *dense]).append_column("click", table["click"])
            view = view.append_column("purchase", pa.array((click & conv).astype(np.int8)))
            view = view.append_column("p_click", table["p_click"])
            view = view.append_column("p_purchase", pa.array(p_purchase))
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                view,
                out / name,
                row_group_size=meta["params"]["row_group_size"],
                write_page_checksum=True,
            )
            for key, arr in (("click", click), ("p_click", p_click)):
                stats.setdefault(key, []).append(arr)
            stats.setdefault("purchase", []).append(click & conv)
            stats.setdefault("p_purchase", []).append(p_purchase)
        st = {key: np.concatenate(arrs) for key, arrs in stats.items()}
        splits[split] = {"files": info["files"], **_oracle_metrics(st)}
    view_meta = {
        "generator": "mtl_dist.data.synth.ctcvr_view",
        "source": source,
        "params": {**meta["params"], "workload": "funnel_ctcvr"},
        "columns": {
            "strings": {},
            "sparse": meta["columns"]["sparse"],
            "multi_hot": [],
            "dense": dense,
            "labels": {"click": "int8", "purchase": "int8"},
            "truth": {"click": "p_click", "purchase": "p_purchase"},
        },
        "splits": splits,
    }
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(view_meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    if verbose:
        v = splits["val"]
        print(
            f"wrote {out} (funnel as click / purchase on every row): val click rate "
            f"{v['click_rate']:.3f} oracle AUC {v['oracle']['click_auc']:.3f}, purchase rate "
            f"{v['purchase_rate']:.3f} oracle AUC {v['oracle']['purchase_auc']:.3f}"
        )
    return view_meta


def main(argv: Sequence[str] | None = None) -> None:
    """``mtl-datagen`` entry point."""
    ap = argparse.ArgumentParser(prog="mtl-datagen", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (train/, val/, meta.json)")
    ap.add_argument("--train-rows", type=int, default=300_000)
    ap.add_argument("--val-rows", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=4, help="train files")
    ap.add_argument(
        "--val-files", type=int, default=None, help="val files (default max(1, files // 2))"
    )
    ap.add_argument("--row-group-size", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-correlation", type=float, default=0.6, help="rho in [0, 1]")
    ap.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="funnel",
        help="funnel (default: 21 sparse incl. multi-hot, 12 dense, click/conversion/watch_time), "
        "peers (16 single-hot, 8 dense, click and purchase on every row), interactions (the "
        "peers' columns, each task's logit dominated by pairwise products of feature effects) or "
        "strings (peers with user / item / author keys as strings and subcategory_id as a "
        "Criteo-style hex token)",
    )
    ap.add_argument(
        "--days",
        type=int,
        default=0,
        help="lay the data out as daily hive partitions OUT/dt=2026-11-01/...: training files "
        "over the first DAYS days, validation files on the day after (0: train/ and val/)",
    )
    ap.add_argument("--force", action="store_true", help="regenerate even if meta.json matches")
    a = ap.parse_args(argv)
    try:
        generate(
            a.out,
            a.train_rows,
            a.val_rows,
            a.files,
            a.row_group_size,
            a.seed,
            a.task_correlation,
            a.val_files,
            workload=a.workload,
            days=a.days,
            force=a.force,
        )
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
