"""Validation metrics over all ranks equal scikit-learn's on the concatenated rows (1e-6)."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from mtl_dist.config import TaskSpec
from mtl_dist.observe.metrics import (
    compute_metrics,
    format_table,
    group_auc,
    metric_units,
    write_json,
)
from tests.conftest import torchrun


def sk_gauc(pred: np.ndarray, label: np.ndarray, group: np.ndarray) -> float:
    """The plain definition: per group with both classes, sklearn AUC, weighted by rows."""
    num = den = 0.0
    for gid in np.unique(group):
        sel = group == gid
        if 0 < label[sel].sum() < sel.sum():
            num += roc_auc_score(label[sel], pred[sel]) * sel.sum()
            den += sel.sum()
    return num / den


def test_metrics_with_two_processes_equal_sklearn(tmp_path):
    proc = torchrun(["tests/metrics_worker.py", str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert parts[0]["metrics"] == parts[1]["metrics"]  # every rank reports the same figures
    m, undefined = parts[0]["metrics"]
    cat = {
        k: torch.cat([p[k] for p in parts]).numpy()
        for k in ("preds", "labels", "mask", "truth", "group")
    }

    keep = cat["mask"][:, 0] > 0
    p, y, t, grp = (
        cat["preds"][keep, 0],
        cat["labels"][keep, 0],
        cat["truth"][keep, 0],
        cat["group"][keep],
    )
    click = m["click"]
    assert click["count"] == keep.sum()
    assert click["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert click["logloss"] == pytest.approx(log_loss(y, p), abs=1e-6)
    assert click["calibration"] == pytest.approx(p.astype(np.float64).mean() / y.mean(), abs=1e-6)
    assert click["gauc"] == pytest.approx(sk_gauc(p, y, grp), abs=1e-6)
    assert click["oracle_auc"] == pytest.approx(roc_auc_score(y, t), abs=1e-6)
    assert click["oracle_logloss"] == pytest.approx(log_loss(y, t), abs=1e-6)

    keep = cat["mask"][:, 1] > 0
    p, y = cat["preds"][keep, 1].astype(np.float64), cat["labels"][keep, 1].astype(np.float64)
    assert m["watch"]["mse"] == pytest.approx(mean_squared_error(y, p), abs=1e-6)
    assert m["watch"]["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-6)

    # one class over all ranks: AUC, oracle AUC, GAUC and calibration undefined, not 0 / NaN
    never = m["never"]
    assert never["count"] == 2 * 3000 - 200 - 400
    assert not {"auc", "oracle_auc", "gauc", "oracle_gauc", "calibration"} & set(never)
    assert undefined["never"]["auc"] == "one class only: 0 positive(s) among 5,400 labelled rows"
    assert set(undefined["never"]) == {"auc", "oracle_auc", "gauc", "oracle_gauc", "calibration"}
    assert set(undefined) == {"never"}  # "split" is defined: both classes over the ranks
    assert never["logloss"] > 0 and never["oracle_logloss"] > 0  # still defined
    # one class per rank, both over the gathered rows: defined, equal to sklearn's
    keep = cat["mask"][:, 3] > 0
    assert m["split"]["auc"] == pytest.approx(
        roc_auc_score(cat["labels"][keep, 3], cat["preds"][keep, 3]), abs=1e-6
    )
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere


def test_undefined_metrics_read_n_a_with_the_reason_in_the_table():
    tasks = [
        TaskSpec(name="conversion", label="conversion", truth="p"),
        TaskSpec(name="watch", kind="regression", label="watch_time", transform="log1p"),
    ]
    n = 50
    preds = torch.rand(n, 2)
    labels = torch.stack([torch.zeros(n), torch.randn(n)], 1)
    m, undefined = compute_metrics(tasks, preds, labels, torch.ones(n, 2), torch.rand(n, 2))
    table = format_table(tasks, m, undefined)
    auc_line = next(line for line in table.splitlines() if " auc " in line)
    assert "0.0000" not in auc_line and "n/a" in auc_line
    assert "auc and oracle_auc undefined: one class only: 0 positive(s) among 50" in auc_line
    assert "calibration undefined: no positive label" in table
    assert metric_units(tasks) == {"watch": "log1p(watch_time)"}
    assert "unit: log1p(watch_time)^2" in table and "unit: log1p(watch_time))" in table
    # no labelled row at all: every metric undefined, the count says why
    empty, why = compute_metrics(tasks, preds, labels, torch.zeros(n, 2), torch.rand(n, 2))
    assert empty["conversion"] == {"count": 0.0} and why["conversion"]["auc"] == "no labelled row"


def test_json_safe_replaces_non_finite_floats(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": [1.0, math.nan], "b": {"c": math.inf}, "d": "x"})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": {"c": None}, "d": "x"}


def test_group_auc_with_ties_and_one_class_groups():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 30, 2000)
    label = (rng.random(2000) < 0.3).astype(np.float32)
    pred = np.round(rng.random(2000) + label * 0.3, 1)  # coarse: many ties within groups
    label[group == 7] = 1  # a group with one class only: left out
    assert group_auc(pred, label, group) == pytest.approx(sk_gauc(pred, label, group), abs=1e-9)
    assert np.isnan(group_auc(pred[:3], np.ones(3), group[:3]))


def test_non_finite_predictions_leave_the_model_metrics_undefined():
    """A diverged model's NaN scores give torchmetrics an AUC of something; here every model
    figure is undefined with the count, while the oracle's stay."""
    tasks = [TaskSpec(name="click", label="click", truth="p")]
    preds = torch.rand(40, 1)
    preds[3] = float("nan")
    labels = (torch.rand(40, 1) < 0.5).float()
    values, undefined = compute_metrics(tasks, preds, labels, torch.ones(40, 1), torch.rand(40, 1))
    m = values["click"]
    assert not {"auc", "logloss", "calibration", "pred_mean"} & set(m)
    assert undefined["click"]["auc"] == "1 prediction(s) not finite"
    assert "oracle_auc" in m and "oracle_logloss" in m
