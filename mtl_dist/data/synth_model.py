"""The generative model: latent parameters drawn from a seed, the per-task latent scores and
the labels drawn from them.

Each table has latent vectors ``[vocab, LATENT_DIM]`` (damped for rare ids, so the signal sits
mostly on frequent, learnable ids) and each feature a scale; multi-hot features contribute the
mean of their ids' rows, dense features a random linear map. ``z`` ``[n, LATENT_DIM]`` = sum,
standardised. Task t scores ``u_t = w_t . z`` with ``w_conv = rho w_click + sqrt(1 - rho^2)
w_orth`` (likewise for watch), adds ``sum_i sin(a_i u_t + b_i)`` and task-only terms
(``_TASK_TERMS``; ``--workload interactions``: pairwise products of projections of latent rows,
``_INTERACTION_TERMS``, see :func:`interaction_share`). Scales / offsets are calibrated once on
a seeded sample to hit :data:`TARGETS`.

* :func:`build_model` (cached) → :class:`LatentModel`, every parameter from ``seed`` only;
  ``KeyError`` for an unknown workload.
* :func:`make_chunk`: ``n`` rows as an Arrow table of the workload's schema, plus the arrays
  ``[n]`` (or ``[clicks]`` for conversion) :func:`~mtl_dist.data.synth_stats.oracle_metrics`
  takes. Same model and generator state give identical rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mtl_dist.data.synth_stats import calibrate, norm_cdf, sigmoid, zipf_cdf
from mtl_dist.data.synth_workloads import TASKS, WORKLOADS, SparseFeature, Workload, string_keys

LATENT_DIM = 8
CALIBRATION_ROWS = 100_000
RARE_ID_SCALE = 500.0  # latent damping (1 + rank / RARE_ID_SCALE) ** -0.5
COLD_USER_RATE = 0.15  # rows whose history lists are empty
WATCH_BASE, WATCH_SCALE, WATCH_SIGMA = 3.0, 1.0, 0.5
TARGETS = {"click_rate": 0.15, "click_auc": 0.80, "conversion_rate": 0.20, "conversion_auc": 0.80}

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
class LatentModel:
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


@functools.lru_cache(maxsize=4)
def build_model(seed: int, task_correlation: float, workload: str = "funnel") -> LatentModel:
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
    cdf = {f.name: zipf_cdf(f.vocab, f.zipf) for f in wl.sparse}
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
    model = LatentModel(wl, perm, cdf, latent, dense_w, w, sin_a, sin_b, task_tables)

    # Calibration on a sample with its own stream: standardisation and logit scale/offset.
    cols, dense = _sample_features(model, np.random.default_rng([seed, 2]), CALIBRATION_ROWS)
    z_raw = _raw_z(model, cols, dense)
    model.z_mean, model.z_std = z_raw.mean(axis=0), z_raw.std(axis=0)
    raw = _raw_scores(model, (z_raw - model.z_mean) / model.z_std, cols)
    for t in TASKS:
        model.s_mean[t], model.s_std[t] = float(raw[t].mean()), float(raw[t].std())
    s = {t: (raw[t] - model.s_mean[t]) / model.s_std[t] for t in TASKS}
    ones = np.ones(CALIBRATION_ROWS)
    cs, cb = calibrate(s["click"], ones, TARGETS["click_rate"], TARGETS["click_auc"])
    p_click = sigmoid(cs * s["click"] + cb)
    vs, vb = calibrate(
        s["conversion"], p_click, TARGETS["conversion_rate"], TARGETS["conversion_auc"]
    )
    model.calib = {
        "click_scale": cs,
        "click_offset": cb,
        "conversion_scale": vs,
        "conversion_offset": vb,
    }
    return model


def _sample_ids(
    model: LatentModel, f: SparseFeature, rng: np.random.Generator, n: int
) -> np.ndarray:
    ranks = np.searchsorted(model.cdf[f.name], rng.random(n), side="right")
    return model.perm[f.table][np.minimum(ranks, f.vocab - 1)]


def _sample_features(
    model: LatentModel, rng: np.random.Generator, n: int
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


def _raw_z(model: LatentModel, cols: dict[str, Any], dense: np.ndarray) -> np.ndarray:
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


def _term_scores(model: LatentModel, cols: dict[str, Any], task: str) -> np.ndarray:
    """The task-only terms of ``task``'s score: sum of coef * product of per-feature tables."""
    s = np.zeros(len(next(iter(cols.values()))))
    for coef, feats, tables in model.task_tables[task]:
        term = np.full(s.shape, coef)
        for name, tab in zip(feats, tables, strict=True):
            term *= tab[cols[name]]
        s += term
    return s


def _raw_scores(model: LatentModel, z: np.ndarray, cols: dict[str, Any]) -> dict[str, np.ndarray]:
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
    model = build_model(seed, task_correlation, "interactions")
    cols, dense = _sample_features(model, np.random.default_rng([seed, 4]), rows)
    z = (_raw_z(model, cols, dense) - model.z_mean) / model.z_std
    raw = _raw_scores(model, z, cols)
    return {t: float(_term_scores(model, cols, t).var() / raw[t].var()) for t in TASKS[:2]}


def make_chunk(
    model: LatentModel, rng: np.random.Generator, n: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """``n`` rows as an Arrow table plus the arrays the oracle metrics need."""
    cols, dense = _sample_features(model, rng, n)
    z = (_raw_z(model, cols, dense) - model.z_mean) / model.z_std
    raw = _raw_scores(model, z, cols)
    s = {t: (raw[t] - model.s_mean[t]) / model.s_std[t] for t in TASKS}
    c = model.calib
    p_click = sigmoid(c["click_scale"] * s["click"] + c["click_offset"]).astype(np.float32)
    p_conv = sigmoid(c["conversion_scale"] * s["conversion"] + c["conversion_offset"]).astype(
        np.float32
    )
    mu = WATCH_BASE + WATCH_SCALE * s["watch_time"]
    # log1p(watch_time) = max(0, N(mu, sigma)); its exact mean is the truncated-normal mean.
    ratio = mu / WATCH_SIGMA
    pdf = np.exp(-0.5 * ratio * ratio) / math.sqrt(2.0 * math.pi)
    watch_mean = (mu * norm_cdf(ratio) + WATCH_SIGMA * pdf).astype(np.float32)

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
