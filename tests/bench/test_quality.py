"""The quality table: a smoke run on tiny data (the funnel's CTCVR view, ours with MMoE and no
interaction, one peer, one seed) with the table's structure and every AUC finite, and the target
arithmetic on made-up runs."""

import json
import math

import pytest

from mtl_dist.tools.bench import quality
from mtl_dist.tools.bench.peers import peers_installed

TASKS = ("click", "purchase")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    peer = next((p for p, ok in peers_installed().items() if ok), None)
    argv = [
        "--workloads", "funnel", "--heads", "mmoe", "--interactions", "none",
        "--regularisation", "none", "--seeds", "1", "--rows", "12000", "--test-rows", "3000",
        "--batch", "1024", "--threads", "1", "--peers", peer or "none",
        "--data-root", str(out / "data"), "--out", str(out),
    ]  # fmt: skip
    return out, peer, quality.main(argv)


def test_smoke_table(result):
    out, peer, r = result
    systems = [x["system"] for x in r["table"]["funnel"]]
    assert systems == ([peer] if peer else []) + ["mtl-dist"]
    ours = r["table"]["funnel"][-1]
    assert [ours[k] for k in ("head", "interaction", "reg", "seeds")] == ["mmoe", "none", "", 1]
    for row in r["table"]["funnel"]:
        assert row["samples_per_s"] > 0
        for t in TASKS:
            assert math.isfinite(row["auc"][t]) and 0.0 <= row["auc"][t] <= 1.0
    for t in TASKS:  # ours learns something from 12k rows; the peers may not yet
        assert 0.55 < ours["auc"][t] < ours["oracle_auc"][t] + 0.05
        assert (row["target_met"] is None) == (row["system"] != "mtl-dist" or not peer)
    assert json.loads((out / "quality.json").read_text())["table"] == r["table"]
    md = (out / "quality.md").read_text()
    assert "**funnel**" in md and "| mtl-dist | mmoe + none |" in md and "Target" in md
    assert md.startswith("CPU: ")
    # --render rewrites the same table from quality.json alone, running nothing
    assert quality.main(["--render", "--out", str(out)])["table"] == r["table"]
    assert (out / "quality.md").read_text() == md


def _run(system, head, inter, seed, click, purchase, speed, reg=""):
    return {
        "workload": "w", "system": system, "head": head, "interaction": inter, "reg": reg,
        "seed": seed, "auc": {"click": click, "purchase": purchase},
        "oracle_auc": {"click": 0.8, "purchase": 0.9}, "samples_per_s": speed,
    }  # fmt: skip


def test_target_against_the_best_peer_per_task():
    runs = [
        _run("torch_rechub", "mmoe", "-", 0, 0.70, 0.80, 10_000),
        _run("deepctr_torch", "mmoe", "-", 0, 0.72, 0.78, 12_000),
        # both tasks >= best peer + 0.005 (0.725 / 0.805), and 2x the fastest peer
        _run("mtl-dist", "mmoe", "dcn_v2", 0, 0.726, 0.806, 25_000),
        _run("mtl-dist", "mmoe", "dcn_v2", 1, 0.728, 0.808, 20_000),
        _run("mtl-dist", "mmoe", "none", 0, 0.724, 0.830, 30_000),  # click short by 0.001
        _run("mtl-dist", "ple", "none", 0, 0.75, 0.85, 20_000),  # slow
    ]
    rows = {quality.name(r): r for r in quality.summarise(runs)["w"] if r["system"] == "mtl-dist"}
    dcn = rows["mmoe + dcn_v2"]
    assert dcn["seeds"] == 2 and dcn["auc"]["click"] == pytest.approx(0.727)
    assert dcn["auc_std"]["click"] == pytest.approx(math.sqrt(2e-6))
    assert dcn["auc_vs_best_peer"]["purchase"] == pytest.approx(0.007)
    assert dcn["speed_vs_best_peer"] == pytest.approx(25 / 12)  # its fastest seed
    assert dcn["target_met"] is True
    assert rows["mmoe + none"]["target_met"] is False
    assert rows["ple + none"]["target_met"] is False
    line = quality.verdict(quality.summarise(runs)["w"])
    assert "met** by 1 of 3 rows: mmoe + dcn_v2." in line
    assert "AUC part met by 2 of 3 rows (mmoe + dcn_v2, ple + none)" in line
    assert "speed part by 2 of 3 rows (mmoe + none, mmoe + dcn_v2)" in line
    assert [quality.name(r) for r in quality.summarise(runs)["w"]][2:] == [
        "mmoe + none", "mmoe + dcn_v2", "ple + none"
    ]  # fmt: skip
