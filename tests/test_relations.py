"""Task relations on a hand-made Parquet file: figures equal numpy / scikit-learn on the rows
where both labels exist."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import mutual_info_score

from mtl_dist.config import TaskSpec
from mtl_dist.tools.relations import discretise, task_relations

TASKS = [
    TaskSpec("click", "binary", "click"),
    TaskSpec("buy", "binary", "buy"),
    TaskSpec("watch", "regression", "watch", transform="log1p"),
]


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """Two files; ``buy`` null on a third of the rows, ``watch`` null or NaN on some others."""
    rng = np.random.default_rng(0)
    n = 600
    click = (rng.random(n) < 0.4).astype(np.int8)
    buy = ((rng.random(n) < 0.3) | (click & (rng.random(n) < 0.5))).astype(np.int8)
    watch = np.expm1(rng.gamma(2.0, 1.0, n) + click).astype(np.float32)
    buy_null = rng.random(n) < 1 / 3
    watch_null = rng.random(n) < 0.1
    watch[rng.random(n) < 0.05] = np.nan  # NaN counts as missing too
    out = tmp_path_factory.mktemp("labels")
    table = pa.table(
        {
            "click": pa.array(click),
            "buy": pa.array(buy, mask=buy_null),
            "watch": pa.array(watch, mask=watch_null),
            "other": pa.array(np.arange(n)),  # not read
        }
    )
    pq.write_table(table.slice(0, 250), out / "a.parquet")
    pq.write_table(table.slice(250), out / "b.parquet")
    as_float = {
        "click": click.astype(np.float64),
        "buy": np.where(buy_null, np.nan, buy),
        "watch": np.where(watch_null, np.nan, np.log1p(watch.astype(np.float64))),
    }
    return str(out), as_float


def test_pearson_and_mi_equal_numpy_and_sklearn(labels):
    path, y = labels
    rows = {(r["task_a"], r["task_b"]): r for r in task_relations(path, TASKS, bins=5)}
    assert list(rows) == [("click", "buy"), ("click", "watch"), ("buy", "watch")]
    for (a, b), r in rows.items():
        both = ~np.isnan(y[a]) & ~np.isnan(y[b])
        assert 0 < both.sum() < 600
        assert r["rows"] == both.sum()
        ya, yb = y[a][both], y[b][both]
        assert r["pearson"] == pytest.approx(np.corrcoef(ya, yb)[0, 1], abs=1e-12)
        # regression labels: 5 quantile bins (edges at the 20/40/60/80% quantiles)
        codes = {
            name: v if name != "watch" else np.digitize(v, np.quantile(v, [0.2, 0.4, 0.6, 0.8]))
            for name, v in ((a, ya), (b, yb))
        }
        assert r["mutual_info"] == pytest.approx(mutual_info_score(codes[a], codes[b]), abs=1e-12)
    # the rows where buy is null are excluded: the relation depends on them otherwise
    assert rows[("click", "buy")]["rows"] == (~np.isnan(y["buy"])).sum()
    assert rows[("click", "buy")]["pearson"] > 0.1 and rows[("click", "watch")]["pearson"] > 0.1


def test_quantile_bins_merge_ties_and_constant_labels_give_nan(tmp_path):
    y = np.array([0.0] * 6 + [1.0, 2.0, 3.0, 4.0])  # 20/40/60/80% quantiles: 0, 0, 0.4, 2.2
    assert discretise(y, "regression", 5).tolist() == [1] * 6 + [2, 2, 3, 3]
    pq.write_table(pa.table({"a": [1, 1, 1, None], "b": [0, 1, None, 1]}), tmp_path / "x.parquet")
    tasks = [TaskSpec("a", "binary", "a"), TaskSpec("b", "binary", "b")]
    (r,) = task_relations(str(tmp_path), tasks)
    assert r["rows"] == 2 and math.isnan(r["pearson"]) and math.isnan(r["mutual_info"])


def test_missing_label_column_is_named(tmp_path):
    pq.write_table(pa.table({"a": [1, 0]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no label column\(s\) \['b'\]"):
        task_relations(str(tmp_path), [TaskSpec("a", "binary", "a"), TaskSpec("b", "binary", "b")])
