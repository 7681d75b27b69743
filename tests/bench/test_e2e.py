"""The end-to-end benchmark's smoke run: a small workload through every column of the table —
ours at 1 × 1 and 2 × 1 under torchrun, each installed peer, the step profiles — with every
figure finite and the files written."""

import json
import math

import pytest

from mtl_dist.observe.profiling import PHASES
from mtl_dist.tools.bench import e2e
from mtl_dist.tools.bench.peers import peers_installed


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    argv = [
        "--rows", "60000", "--test-rows", "5000", "--batch", "1024", "--threads", "1",
        "--ours", "1x1,2x1", "--repeats", "1", "--profile-steps", "3", "--profile-layouts", "2x1", "--hw-seconds", "0.5",
        "--precisions", "fp32", "--data-root", str(out / "data"), "--out", str(out),
    ]  # fmt: skip
    return out, e2e.main(argv)


def test_table_rows_and_files(result):
    out, r = result
    installed = [p for p, ok in peers_installed().items() if ok]
    assert [(x["system"], x["layout"]) for x in r["table"]] == [
        ("mtl-dist", "1x1"),
        ("mtl-dist", "2x1"),
        *[(p, "1x1") for p in installed],
    ]
    assert json.loads((out / "e2e.json").read_text())["table"] == r["table"]
    md = (out / "e2e.md").read_text()
    assert md.count("| mtl-dist |") == 2 and "2 processes × 1 thread" in md
    for p in installed:
        assert f"| {p} |" in md


def test_every_figure_is_finite_and_plausible(result):
    _, r = result
    for row in r["table"]:
        assert row["samples_per_s"] > 0 and math.isfinite(row["samples_per_s"])
        assert len(row["rounds"]) == 1 and row["samples_per_s"] == max(row["rounds"])
        assert 50 < row["peak_rss_mb"] < 16_000
        for t in e2e.TASKS:
            # 60k rows of one epoch learn something: clearly above chance, below the oracle + noise
            assert 0.55 < row["auc"][t] < row["oracle_auc"][t] + 0.05, (row["system"], t)
            assert row["oracle_auc"][t] == pytest.approx(r["oracle_auc"][t])
    assert r["scaling"] > 0 and math.isfinite(r["scaling"])
    assert r["scaling_steady"] > 0 and math.isfinite(r["scaling_steady"])
    for row in r["table"][:2]:  # ours: the rate after 10 warm-up steps is reported too
        assert row["steady_samples_per_s"] > 0
    peers = [x for x in r["table"] if x["system"] != "mtl-dist"]
    for row in r["table"]:
        assert (row["speed_vs_best_peer"] is None) == (not peers)
    fastest = max(x["samples_per_s"] for x in r["table"] if x["system"] == "mtl-dist")
    assert r["ours_vs_peer"] == {x["system"]: fastest / x["samples_per_s"] for x in peers}


def test_step_profile_splits_the_step(result):
    _, r = result
    prof = r["profiles"]["2x1"]
    assert set(prof["ms"]) == set(PHASES)
    assert sum(prof["share"].values()) == pytest.approx(1.0, abs=1e-6)
    # a real TorchRec + DDP step on 2 ranks has each of these
    phases = ("data", "embedding_fwd", "dense_fwd", "embedding_bwd", "dense_bwd", "collectives")
    for phase in (*phases, "optimizer"):
        assert prof["ms"][phase] > 0, phase


def test_roofline_from_this_runs_matmul_rate(result):
    _, r = result
    # 16 tables x 16 + 8 dense = 264 inputs; 4 experts (256, 128), 2 gates, 2 towers (64,)
    macs = 4 * (264 * 256 + 256 * 128) + 2 * 264 * 4 + 2 * (128 * 64 + 64)
    assert r["model_mflop_per_sample"] == pytest.approx(6 * macs / 1e6)
    for k in ("1x1", "1x2", "2x1"):
        assert r["matmul_gflops"][k] > 1
        assert r["roofline_samples_per_s"][k] == pytest.approx(
            r["matmul_gflops"][k] * 1e3 / r["model_mflop_per_sample"]
        )


def test_an_undefined_auc_is_printed_as_undefined_and_a_nan_refused():
    """Issue 25: an AUC that is undefined at validation (one class: None in metrics.json) is
    'undefined' in the table and its gap, never a KeyError or a number; a NaN still stops."""
    import math

    import pytest

    from mtl_dist.tools.bench.e2e import TASKS, check_finite, markdown, with_ratios

    row = {
        "system": "mtl-dist", "precision": "fp32", "layout": "1x2", "procs": 1, "threads": 2,
        "samples_per_s": 1000.0, "steady_samples_per_s": 1100.0, "peak_rss_mb": 500.0,
        "auc": {t: (None if i == 1 else 0.75) for i, t in enumerate(TASKS)},
        "oracle_auc": {t: 0.8 for t in TASKS},
    }  # fmt: skip
    result = {
        "cpu": "test CPU",
        "table": with_ratios([row]),
        "matmul_gflops": {"1x2": 100.0},
        "roofline_samples_per_s": {"1x2": 2000.0},
        "model_mflop_per_sample": 2.5,
    }
    check_finite(result)
    text = markdown(result)
    assert "0.7500 (0.8000, +0.0500) | undefined (0.8000, undefined)" in text
    assert "None" not in text and "nan" not in text
    row["auc"][TASKS[0]] = math.nan
    with pytest.raises(RuntimeError, match="non-finite figure"):
        check_finite(result)
