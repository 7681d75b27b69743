"""Tests for the synthetic funnel generator: layout, schema, determinism, ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from data_tools import synth

TRAIN_ROWS, VAL_ROWS, FILES, RG = 20_000, 6_000, 2, 4096
SMALL = {"train_rows": 3000, "val_rows": 1000, "files": 2, "row_group_size": 512}


def _read(split_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(split_dir.glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    meta = synth.generate(
        out, TRAIN_ROWS, VAL_ROWS, FILES, RG, seed=0, task_correlation=0.6, verbose=False
    )
    return out, meta


@pytest.fixture(scope="module")
def train(dataset: tuple[Path, dict]) -> pa.Table:
    return _read(dataset[0] / "train")


def test_files_and_row_groups(dataset: tuple[Path, dict]) -> None:
    out, meta = dataset
    assert (out / "meta.json").exists()
    for split, n_files, rows in (
        ("train", FILES, TRAIN_ROWS),
        ("val", max(1, FILES // 2), VAL_ROWS),
    ):
        paths = sorted((out / split).glob("*.parquet"))
        assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(n_files)]
        total = 0
        for p in paths:
            md = pq.ParquetFile(p).metadata
            assert md.num_row_groups > 1
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            assert all(s == RG for s in sizes[:-1]) and 0 < sizes[-1] <= RG
            total += md.num_rows
        assert total == rows == meta["splits"][split]["rows"]


def test_columns_and_dtypes(train: pa.Table) -> None:
    expected = (
        [(f.name, "int64") for f in synth.SPARSE_FEATURES if not f.multi_hot]
        + [(f.name, "list") for f in synth.SPARSE_FEATURES if f.multi_hot]
        + [(c, "float") for c in synth.DENSE_FEATURES]
        + [("click", "int8"), ("conversion", "int8"), ("watch_time", "float")]
        + [(c, "float") for c in synth.TRUTH_COLUMNS]
    )
    assert train.column_names == [n for n, _ in expected]
    assert len(synth.SPARSE_FEATURES) == 21 and len(synth.DENSE_FEATURES) == 12
    for name, kind in expected:
        t = train.schema.field(name).type
        if kind == "list":
            assert pa.types.is_list(t) and t.value_type == pa.int64(), name
        else:
            assert str(t) == kind, name
    assert {f.name: f.table for f in synth.SPARSE_FEATURES if f.table != f.name} == {
        "hist_item_ids": "item_id",
        "hist_category_ids": "category_id",
    }
    assert synth.TASKS == ("click", "conversion", "watch_time")


def test_ids_in_range_and_multi_hot_lengths(train: pa.Table) -> None:
    for f in synth.SPARSE_FEATURES:
        col = train[f.name].combine_chunks()
        assert col.null_count == 0
        if f.multi_hot:
            lengths = np.diff(col.offsets.to_numpy())
            assert lengths.min() == f.min_len and lengths.max() == f.max_len, f.name
            assert len(np.unique(lengths)) > 2, f.name
            ids = col.values.to_numpy()
        else:
            ids = col.to_numpy()
        assert ids.min() >= 0 and ids.max() < f.vocab, f.name
    assert (np.diff(train["hist_item_ids"].combine_chunks().offsets.to_numpy()) == 0).any()
    dense = np.stack([train[c].to_numpy() for c in synth.DENSE_FEATURES], axis=1)
    assert (
        np.isfinite(dense).all()
        and np.all(np.abs(dense.mean(0)) < 0.2)
        and np.all(dense.std(0) < 2.0)
    )


def test_labels_and_conversion_null_mask(train: pa.Table) -> None:
    click = train["click"].to_numpy()
    conv = train["conversion"].combine_chunks()
    assert set(np.unique(click)) == {0, 1}
    np.testing.assert_array_equal(conv.is_null().to_numpy(zero_copy_only=False), click == 0)
    assert set(np.unique(conv.drop_null().to_numpy())) == {0, 1}
    watch = train["watch_time"].to_numpy()
    assert (watch >= 0).all() and train["watch_time"].null_count == 0
    for c in ("p_click", "p_conversion"):
        p = train[c].to_numpy()
        assert ((p > 0) & (p < 1)).all()
    assert 0.10 <= click.mean() <= 0.20
    assert 0.10 <= conv.drop_null().to_numpy().mean() <= 0.30


def test_zipf_and_permutation(train: pa.Table) -> None:
    counts = np.bincount(train["user_id"].to_numpy(), minlength=200_000)
    seen = counts[counts > 0]
    assert counts.max() >= 100 * np.median(seen)
    top10 = set(np.argsort(counts)[-10:].tolist())
    assert top10 != set(range(10))
    cat = np.bincount(train["category_id"].to_numpy(), minlength=1000)
    assert cat.max() >= 20 * np.median(cat[cat > 0])


def test_oracle_metrics(dataset: tuple[Path, dict], train: pa.Table) -> None:
    click = train["click"].to_numpy()
    p_click = train["p_click"].to_numpy()
    auc = roc_auc_score(click, p_click)
    assert 0.75 <= auc <= 0.85
    assert synth.roc_auc(click, p_click) == pytest.approx(auc, abs=1e-9)
    clicked = click == 1
    conv = train["conversion"].to_numpy(zero_copy_only=False)[clicked].astype(np.int8)
    conv_auc = roc_auc_score(conv, train["p_conversion"].to_numpy()[clicked])
    assert 0.72 <= conv_auc <= 0.88
    log_watch = np.log1p(train["watch_time"].to_numpy().astype(np.float64))
    mse = np.mean((log_watch - train["watch_time_log_mean"].to_numpy()) ** 2)
    assert mse == pytest.approx(0.25, abs=0.02)
    assert 1 - mse / log_watch.var() > 0.5
    o = dataset[1]["splits"]["train"]["oracle"]
    assert o["click_auc"] == pytest.approx(auc, abs=1e-9)
    assert o["conversion_auc"] == pytest.approx(conv_auc, abs=1e-9)
    assert o["watch_mse"] == pytest.approx(mse, rel=1e-6)


def test_tasks_correlated_but_different(train: pa.Table) -> None:
    def logit(p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float64)
        return np.log(p / (1 - p))

    lc, lv = logit(train["p_click"].to_numpy()), logit(train["p_conversion"].to_numpy())
    assert 0.2 <= np.corrcoef(lc, lv)[0, 1] <= 0.95
    lw = train["watch_time_log_mean"].to_numpy()
    assert 0.2 <= np.corrcoef(lc, lw)[0, 1] <= 0.95


def test_roc_auc_ties() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.2])
    assert synth.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(synth.roc_auc(np.zeros(3), np.arange(3)))


def test_determinism(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", **SMALL, seed=7, verbose=False)
    synth._build_model.cache_clear()  # rebuild the latent model from the seed
    b = synth.generate(tmp_path / "b", **SMALL, seed=7, verbose=False)
    c = synth.generate(tmp_path / "c", **SMALL, seed=8, verbose=False)
    for split in ("train", "val"):
        ta, tb, tc = (_read(tmp_path / d / split) for d in "abc")
        assert ta.equals(tb)
        assert not ta.equals(tc)
        assert not np.array_equal(ta["user_id"].to_numpy(), tc["user_id"].to_numpy())
    assert a["splits"] == b["splits"] and a["splits"] != c["splits"]


def test_reuse_and_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    synth.main(
        [
            "--out",
            str(out),
            "--seed",
            "7",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
        ]
    )
    assert "wrote" in capsys.readouterr().out
    files = sorted(out.rglob("*.parquet")) + [out / "meta.json"]
    mtimes = [p.stat().st_mtime_ns for p in files]
    meta = synth.generate(out, **SMALL, seed=7)
    assert "reusing" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert meta == json.loads((out / "meta.json").read_text())
    # Different parameters regenerate, and stale part files of the old layout disappear.
    meta2 = synth.generate(out, **{**SMALL, "files": 1}, seed=7, verbose=False)
    assert meta2["params"]["files"] == 1
    assert [p.name for p in (out / "train").glob("*.parquet")] == ["part-00000.parquet"]
    assert (
        pq.ParquetFile(out / "train" / "part-00000.parquet").metadata.num_rows
        == SMALL["train_rows"]
    )


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synth.generate(tmp_path, **SMALL, task_correlation=1.5)
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--files", "0"])


# --------------------------------------------------------------------------- interactions


@pytest.fixture(scope="module")
def interactions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("interactions")
    meta = synth.generate(out, 40_000, 4_000, 2, 8192, seed=0, workload="interactions")
    return out, meta


def test_interactions_schema(interactions: tuple[Path, dict]) -> None:
    out, meta = interactions
    table = _read(out / "train")
    peers = synth.WORKLOADS["peers"].schema()
    assert table.schema.equals(synth.WORKLOADS["interactions"].schema())
    assert table.schema.names == peers.names  # the peers' columns: 16 single-hot, 8 dense
    assert table.num_rows == 40_000 and meta["params"]["workload"] == "interactions"
    click, purchase = table["click"].to_numpy(), table["purchase"].to_numpy()
    assert table["purchase"].null_count == 0 and not (purchase & ~click).any()
    p_click, p_purchase = table["p_click"].to_numpy(), table["p_purchase"].to_numpy()
    assert ((p_purchase > 0) & (p_purchase <= p_click)).all()
    v = meta["splits"]["val"]
    assert 0.12 < v["click_rate"] < 0.18 and 0.70 < v["oracle"]["click_auc"] < 0.90
    assert 0.015 < v["purchase_rate"] < 0.06 and v["oracle"]["purchase_auc"] > 0.75


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p / (1 - p))


def _interaction_variance(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Weighted variance of the two-way interaction residual of ``y`` over the cells (a, b):
    cell mean - row mean - column mean + grand mean, cells with >= 20 rows (what no additive
    function f(a) + g(b) can represent)."""
    df = {"y": y, "a": a, "b": b}
    keys_a, ia = np.unique(df["a"], return_inverse=True)
    keys_b, ib = np.unique(df["b"], return_inverse=True)
    n = np.zeros((len(keys_a), len(keys_b)))
    total = np.zeros_like(n)
    np.add.at(n, (ia, ib), 1)
    np.add.at(total, (ia, ib), y)
    ok = n >= 20
    cell = np.where(ok, total / np.maximum(n, 1), 0.0)
    w = np.where(ok, n, 0.0)
    row = (cell * w).sum(1) / np.maximum(w.sum(1), 1)
    col = (cell * w).sum(0) / np.maximum(w.sum(0), 1)
    grand = (cell * w).sum() / w.sum()
    resid = cell - row[:, None] - col[None, :] + grand
    return float((w * resid**2).sum() / w.sum())


def test_interactions_truth_is_not_additive(interactions: tuple[Path, dict]) -> None:
    table = _read(interactions[0] / "train")
    lc = _logit(table["p_click"].to_numpy())
    lp = _logit(table["p_purchase"].to_numpy())

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy()

    # click's logit holds hour x device as a product: a large two-way interaction on those
    # cells, against a pair that appears in no term (same kind of low-cardinality features)
    inter = _interaction_variance(lc, col("hour_of_day"), col("device_type"))
    control = _interaction_variance(lc, col("day_of_week"), col("os_type"))
    assert inter > 0.02 * lc.var() and inter > 20 * control
    # purchase's holds price x user_level; click's does not
    inter_p = _interaction_variance(lp, col("price_bucket"), col("user_level"))
    assert inter_p > 0.1 * lp.var()
    assert inter_p > 20 * _interaction_variance(lc, col("price_bucket"), col("user_level"))
    # by construction, the pairwise products carry most of each task's score
    share = synth.interaction_share(seed=0, rows=20_000)
    assert share["click"] > 0.5 and share["conversion"] > 0.5
    # the shared pairs make the tasks correlate, the task-only ones keep them apart
    assert 0.2 <= np.corrcoef(lc, lp)[0, 1] <= 0.95


def test_interactions_deterministic(tmp_path: Path, interactions: tuple[Path, dict]) -> None:
    kw = {**SMALL, "workload": "interactions", "verbose": False}
    synth.generate(tmp_path / "a", **kw, seed=3)
    synth._build_model.cache_clear()
    synth.generate(tmp_path / "b", **kw, seed=3)
    synth.generate(tmp_path / "c", **kw, seed=4)
    synth.generate(tmp_path / "p", **{**kw, "workload": "peers"}, seed=3)
    ta, tb, tc, tp = (_read(tmp_path / d / "train") for d in "abcp")
    assert ta.equals(tb) and not ta.equals(tc)
    # the same features as the peers' workload of that seed, other labels
    assert ta.select(["user_id", "dense_0"]).equals(tp.select(["user_id", "dense_0"]))
    assert not np.array_equal(ta["p_click"].to_numpy(), tp["p_click"].to_numpy())


def test_ctcvr_view(tmp_path: Path) -> None:
    src = tmp_path / "funnel"
    meta = synth.generate(src, **SMALL, seed=1, verbose=False)
    view = synth.ctcvr_view(src, tmp_path / "view", verbose=False)
    for split in ("train", "val"):
        full, t = _read(src / split), _read(tmp_path / "view" / split)
        assert t.num_rows == full.num_rows
        assert t.schema.names == [*synth.SPARSE_SINGLE, *synth.DENSE_FEATURES, "click",
                                  "purchase", "p_click", "p_purchase"]  # fmt: skip
        conv = full["conversion"].fill_null(0).to_numpy().astype(bool)
        expect = full["click"].to_numpy().astype(bool) & conv
        assert np.array_equal(t["purchase"].to_numpy().astype(bool), expect)
        np.testing.assert_allclose(
            t["p_purchase"].to_numpy(),
            full["p_click"].to_numpy() * full["p_conversion"].to_numpy(),
            rtol=1e-6,
        )
        assert view["splits"][split]["rows"] == meta["splits"][split]["rows"]
    assert view["columns"]["labels"] == {"click": "int8", "purchase": "int8"}
    mtime = (tmp_path / "view" / "meta.json").stat().st_mtime_ns
    assert synth.ctcvr_view(src, tmp_path / "view", verbose=False) == view  # reused
    assert (tmp_path / "view" / "meta.json").stat().st_mtime_ns == mtime
