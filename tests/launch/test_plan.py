"""``mtl-plan``: TorchRec's planner for a cluster this machine is not (no GPU needed)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def mtl_plan(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtl_dist.tools.plan", "--config", "configs/default.toml", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_64_gpus_plan_a_billion_row_table():
    proc = mtl_plan(
        "--nodes", "8", "--gpus-per-node", "8", "--hbm-gb", "80", "--rows", "item_id=1e9"
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8 node(s) x 8 cuda rank(s) = world 64" in out
    (item,) = [ln for ln in out.splitlines() if ln.startswith("item_id ")]
    assert "1,000,000,000" in item
    sharding = item.split()[3]
    assert sharding in ("row_wise", "table_row_wise", "column_wise", "table_column_wise"), item
    # every table is listed with its ranks; memory per rank against the 80 GB capacity
    assert "estimated embedding memory per rank (HBM, capacity 80.000 GB)" in out
    used = re.search(r"max memory per rank: ([\d.]+) GB of 80.000 GB", out)
    assert used and 0.5 < float(used.group(1)) < 80, out
    step = re.search(r"estimated embedding step time .*: ([\d.]+) ms", out)
    assert step and float(step.group(1)) > 0, out


def test_two_small_gpus_cannot_fit_and_say_why():
    proc = mtl_plan(
        "--nodes", "1", "--gpus-per-node", "2", "--hbm-gb", "1", "--ddr-gb", "1",
        "--rows", "item_id=1e9",
    )  # fmt: skip
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    err = proc.stderr
    assert "do not fit on 2 cuda rank(s)" in err, err
    assert re.search(r"short by [\d.]+ GB", err), err
    assert "table item_id: 1,000,000,000 rows" in err, err


def test_bad_rows_argument_names_the_tables():
    proc = mtl_plan("--rows", "no_such_table=10")
    assert proc.returncode == 2 and "no table 'no_such_table'" in proc.stderr
