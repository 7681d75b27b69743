"""``python -m mtl_dist.tools.compare`` end to end: real torchrun runs (2 heads x 2 seeds, few steps),
the table recomputed from the runs' own metrics.json, and failures named."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtl_dist.config import TaskSpec, load_config
from mtl_dist.tools.compare import main, sweep_tables
from tests.conftest import ROOT

HEADS, SEEDS = ["shared_bottom", "mmoe"], [0, 1]
SMALL = [
    "--set", "train.max_steps=20", "--set", "train.val_max_batches=2",
    "--set", "train.batch_size=256", "--set", "model.experts.hidden=32",
    "--set", "model.shared_bottom.hidden=32", "--set", "train.log_every=10",
]  # fmt: skip


def _argv(synth_data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/default.toml"), "--out", str(out), "--nproc", "1",
        "--set", f"data.train_path={synth_data / 'train'}",
        "--set", f"data.val_path={synth_data / 'val'}", *SMALL, *extra,
    ]  # fmt: skip


def compare(synth_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The command as users run it, in a subprocess."""
    cmd = [sys.executable, "-m", "mtl_dist.tools.compare", *_argv(synth_data, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:])
    return proc


@pytest.fixture(scope="module")
def compared(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = ["--heads", ",".join(HEADS), "--seeds", ",".join(map(str, SEEDS))]
    proc = compare(synth_data, out, *args)
    assert proc.returncode == 0
    return out, proc, args


def _runs(out: Path, head: str) -> list[dict]:
    return [json.loads((out / head / f"seed{s}" / "metrics.json").read_text()) for s in SEEDS]


def test_table_is_mean_and_std_over_the_seeds_runs(compared):
    out, proc, _ = compared
    for name in ("compare.csv", "compare.md", "compare.png", "task_relations.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for head in HEADS:  # one run dir per head and seed, each with its log and TensorBoard events
        for s in SEEDS:
            run = out / head / f"seed{s}"
            assert (run / "train.log").exists() and any((run / "tb").rglob("events.*"))
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["head"] for r in rows] == HEADS
    for row in rows:
        runs = _runs(out, row["head"])
        assert [r["config"]["train"]["seed"] for r in runs] == SEEDS
        assert int(row["seeds"]) == 2
        for task, k in (("click", "auc"), ("conversion", "logloss"), ("watch_time", "mse")):
            values = [r["metrics"][task][k] for r in runs]
            oracles = [r["metrics"][task][f"oracle_{k}"] for r in runs]
            mean, std = float(row[f"{task}/{k}_mean"]), float(row[f"{task}/{k}_std"])
            assert math.isfinite(mean) and math.isfinite(std) and std > 0, (task, k, row)
            assert mean == pytest.approx(np.mean(values), abs=1e-12)
            assert std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            gap = np.mean(np.abs(np.array(oracles) - values))
            assert float(row[f"{task}/{k}_gap"]) == pytest.approx(gap, abs=1e-12)
    md = (out / "compare.md").read_text()
    assert "### click (binary)" in md and "| mmoe |" in md and "| oracle |" in md
    # relations come first, before any training
    assert proc.stdout.index("Pearson") < proc.stdout.index("[1/4] shared_bottom/seed0")
    assert "| click | watch_time | 160000 |" in proc.stdout


def test_rerun_reuses_finished_runs(compared, synth_data, capsys):
    out, _, args = compared
    before = (out / "mmoe" / "seed1" / "metrics.json").stat().st_mtime_ns
    main(_argv(synth_data, out, *args))
    assert capsys.readouterr().out.count(": reused,") == 4
    assert (out / "mmoe" / "seed1" / "metrics.json").stat().st_mtime_ns == before


def test_sweep_advantage_is_paired_over_seeds(compared):
    """The sweep's table from real runs: advantage = mmoe - shared_bottom per seed (AUC),
    shared_bottom - mmoe (MSE)."""
    out, _, _ = compared
    results = {h: _runs(out, h) for h in HEADS}
    tasks = load_config(["--config", str(ROOT / "configs/default.toml")]).tasks
    rows, md = sweep_tables({0.9: results, 0.0: results}, tasks, "shared_bottom")
    assert [(r["correlation"], r["head"]) for r in rows] == [
        (0.9, "shared_bottom"), (0.9, "mmoe"), (0.0, "shared_bottom"), (0.0, "mmoe"),
    ]  # fmt: skip
    mmoe = rows[1]
    auc = [m["metrics"]["click"]["auc"] - b["metrics"]["click"]["auc"] for m, b in
           zip(results["mmoe"], results["shared_bottom"])]  # fmt: skip
    mse = [b["metrics"]["watch_time"]["mse"] - m["metrics"]["watch_time"]["mse"] for m, b in
           zip(results["mmoe"], results["shared_bottom"])]  # fmt: skip
    assert mmoe["click/auc_adv_mean"] == pytest.approx(np.mean(auc), abs=1e-12)
    assert mmoe["click/auc_adv_std"] == pytest.approx(np.std(auc, ddof=1), abs=1e-12)
    assert mmoe["watch_time/mse_adv_mean"] == pytest.approx(np.mean(mse), abs=1e-12)
    assert "click/auc_adv_mean" not in rows[0]  # the baseline has no advantage over itself
    assert "Advantage over shared_bottom" in md


def test_unknown_head_stops_before_training(synth_data, tmp_path):
    with pytest.raises(
        SystemExit, match="run nope/seed0: --model.head: expected shared_bottom .*, got 'nope'"
    ):
        main(_argv(synth_data, tmp_path, "--heads", "mmoe,nope", "--seeds", "0"))
    assert not (tmp_path / "mmoe").exists()  # nothing trained


def test_bad_override_is_named(synth_data, tmp_path):
    with pytest.raises(SystemExit, match="train.max_stepz.*did you mean 'train.max_steps'"):
        main(_argv(synth_data, tmp_path, "--heads", "mmoe", "--set", "train.max_stepz=3"))


def test_failed_run_names_the_run_and_its_log(synth_data, tmp_path):
    bad = tmp_path / "no_such_dir"
    with pytest.raises(SystemExit) as e:
        main(
            _argv(
                synth_data,
                tmp_path,
                "--heads",
                "mmoe",
                "--seeds",
                "3",
                "--set",
                f"data.val_path={bad}",
            )
        )
    msg, log = str(e.value), tmp_path / "mmoe" / "seed3" / "train.log"
    assert "run mmoe/seed3 failed" in msg and str(log) in msg
    assert f"FileNotFoundError: Parquet path not found: {bad}" in msg
    assert "Traceback" in log.read_text()


def test_undefined_metric_is_left_out_of_the_mean_not_averaged_in(tmp_path):
    """Seed 1's validation set has one class for conversion (metrics.json: no 'auc', a reason
    under 'undefined_metrics'): the head's conversion AUC is seed 0's alone, '1 of 2 seeds'."""
    from mtl_dist.tools.compare import report, summarize

    tasks = [TaskSpec(name="click", label="click"), TaskSpec(name="conversion", label="conv")]
    reason = "one class only: 0 positive(s) among 900 labelled rows"

    def run(seed: int, conv: dict, why: dict | None = None) -> dict:
        click = {"count": 1000.0, "auc": 0.70 + 0.01 * seed, "oracle_auc": 0.75, "logloss": 0.5}
        return {"metrics": {"click": click, "conversion": {"count": 900.0, "logloss": 0.1, **conv}},
                "undefined_metrics": {"conversion": why} if why else {},
                "samples_per_s": 1.0, "train_s": 1.0, "config": {}}  # fmt: skip

    one_class = {"auc": reason}
    results = {
        "mmoe": [run(0, {"auc": 0.62, "oracle_auc": 0.66}), run(1, {}, one_class)],
        "ple": [run(0, {}, one_class), run(1, {}, one_class)],
    }
    summary = summarize(results, tasks)
    conv = summary["mmoe"]["conversion"]["auc"]
    assert conv.values == [0.62] and conv.mean == 0.62 and conv.seeds == 2 and conv.partial
    assert conv.gap == pytest.approx(0.04) and conv.reasons == (reason,)
    assert not summary["ple"]["conversion"]["auc"].defined
    md = report(tmp_path, summary, results, tasks, seeds=2)
    assert "0.6200 ± 0.0000 (1 of 2 seeds)" in md
    ple_row = next(line for line in md.splitlines() if line.startswith("| ple") and "n/a" in line)
    assert "nan" not in ple_row.lower().replace("n/a", "")
    assert f"auc: {reason}" in md
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    by_head = {r["head"]: r for r in rows}
    assert float(by_head["mmoe"]["conversion/auc_mean"]) == 0.62
    assert by_head["mmoe"]["conversion/auc_seeds"] == "1"
    assert by_head["ple"].get("conversion/auc_mean", "") == ""  # an empty cell, not 'nan'
    assert "nan" not in (tmp_path / "compare.csv").read_text().lower()


def test_balancers_expand_every_head_and_reach_the_runs(tmp_path):
    from mtl_dist.tools.compare import CompareError, head_args, plan_runs, with_balancers

    heads = with_balancers(["mmoe", "ple+esmm"], ["fixed", "famo"])
    assert heads == ["mmoe+fixed", "mmoe+famo", "ple+esmm+fixed", "ple+esmm+famo"]
    assert with_balancers(["mmoe"], []) == ["mmoe"]
    runs = plan_runs("configs/default.toml", [], heads, [0], tmp_path)
    assert [r.config["loss"]["balancer"] for r in runs] == ["fixed", "famo"] * 2
    assert [r.config["model"]["esmm"]["enabled"] for r in runs] == [False, False, True, True]
    assert runs[1].dir == tmp_path / "mmoe+famo" / "seed0"
    with pytest.raises(CompareError, match="unknown modifier 'famu'.*famo"):
        head_args("mmoe+famu")
