"""The generator's numbers: link functions, the oracle's metrics and the calibration of a
score to a target rate and AUC.

* :func:`sigmoid`, :func:`norm_cdf` (numpy has no erf), :func:`zipf_cdf` (``[vocab]``, rising
  to 1) on float arrays of any shape.
* :func:`roc_auc` (rank-sum, ties averaged; nan when one class is absent) and :func:`log_loss`
  of labels ``[n]`` against scores / probabilities ``[n]``.
* :func:`calibrate`: (scale, offset) so that ``sigmoid(scale * s + offset)`` over scores
  ``[n]`` with sampling weights ``[n]`` hits a rate and an expected AUC.
* :func:`oracle_metrics`: a split's rates and the true probabilities' metrics against the
  drawn labels (the ``meta.json`` split entry, JSON-ready: None for an undefined metric).

Nothing here raises on its inputs' values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def norm_cdf(x: np.ndarray) -> np.ndarray:
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


def zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
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
        p = sigmoid(scale * s + b)
        f = float((weight * p).sum() / total) - rate
        if abs(f) < 1e-10:
            break
        g = float((weight * p * (1.0 - p)).sum() / total)
        b -= float(np.clip(f / max(g, 1e-12), -4.0, 4.0))
    return b


def calibrate(s: np.ndarray, weight: np.ndarray, rate: float, auc: float) -> tuple[float, float]:
    """(scale, offset) so that sigmoid(scale * s + offset) hits ``rate`` and expected ``auc``."""
    order = np.argsort(s, kind="stable")
    s_sorted, w_sorted = s[order], weight[order]

    def auc_at(scale: float) -> tuple[float, float]:
        b = _solve_offset(s_sorted, scale, w_sorted, rate)
        return _expected_auc(sigmoid(scale * s_sorted + b), w_sorted), b

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


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def oracle_metrics(st: dict[str, np.ndarray]) -> dict[str, Any]:
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
