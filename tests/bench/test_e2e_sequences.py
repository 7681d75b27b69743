"""``bench.e2e --sequences``: ours on the ``sequences`` workload at each ``max_len``, beside the
same model without its sequence on the same rows, as rows of ``e2e.md`` / ``e2e.json`` with
finite figures (a small workload, one epoch each)."""

import json
import math

import pytest
import tomllib

from mtl_dist.tools.bench import e2e
from mtl_dist.tools.bench.sequences import TASKS, job_toml


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e_seq")
    argv = [
        "--rows", "6000", "--test-rows", "2000", "--batch", "512", "--ours", "1x1",
        "--peers", "none", "--profile-steps", "0", "--hw-seconds", "0.2", "--precisions", "fp32",
        "--sequences", "5,20", "--sequence-poolings", "din", "--sequence-layout", "1x2",
        "--data-root", str(out / "data"), "--out", str(out),
    ]  # fmt: skip
    return out, e2e.main(argv)


def test_sequence_rows_exist_with_finite_figures(result):
    out, r = result
    rows = r["sequences"]
    assert [(x["max_len"], x["pooling"], x["layout"]) for x in rows] == [
        (5, "none", "1x2"), (5, "din", "1x2"), (20, "none", "1x2"), (20, "din", "1x2"),
    ]  # fmt: skip
    for row in rows:
        assert row["samples_per_s"] > 0 and math.isfinite(row["samples_per_s"])
        assert row["workload"] == "sequences" and row["rounds"] == [row["samples_per_s"]]
        assert 50 < row["peak_rss_mb"] < 16_000
        assert set(row["auc"]) == set(TASKS)
        for t in TASKS:
            assert 0.4 < row["auc"][t] < 1 and 0.5 < row["oracle_auc"][t] <= 1, (row, t)
    for none, din in (rows[0:2], rows[2:4]):
        assert none["speed_vs_no_sequence"] == 1.0
        assert din["speed_vs_no_sequence"] == pytest.approx(
            din["samples_per_s"] / none["samples_per_s"]
        )
    assert json.loads((out / "e2e.json").read_text())["sequences"] == rows
    md = (out / "e2e.md").read_text()
    assert "× no sequence" in md and "click AUC (oracle, gap)" in md and "like AUC" in md
    assert md.count("| 5 | din | ") == 1 and md.count("| 20 | none | ") == 1
    assert r["cpu"] in md and "CPU:" in md


def test_the_baseline_config_is_the_same_model_without_its_sequence():
    none, din = tomllib.loads(job_toml("none", 50)), tomllib.loads(job_toml("din", 50))
    assert "sequence" not in none["features"] and din["features"]["sequence"][0]["max_len"] == 50
    assert {**none, "features": None} == {**din, "features": None}
    assert none["features"]["sparse"] == din["features"]["sparse"]


def test_a_malformed_max_len_list_is_refused(tmp_path):
    args = e2e.parse_args(["--sequences", "20,x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--sequences"):
        e2e.sequence_rows(args)
    args = e2e.parse_args(
        ["--sequences", "20", "--sequence-poolings", "max", "--out", str(tmp_path)]
    )
    with pytest.raises(ValueError, match="poolings"):
        e2e.sequence_rows(args)
