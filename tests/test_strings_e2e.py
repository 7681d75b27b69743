"""Real logs from the README's words: ``mtl-datagen --workload strings --days 3`` (string keys,
daily hive partitions), ``configs/strings.toml`` trained on days [11-01, 11-04) and validated on
11-04 by filters, 2 ranks under torchrun; resumed on 1 rank, the filtered rows not yet trained
are re-split and read once; export and scoring hash the keys the way training did (the scored
AUC equals the live one)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import ROOT, torchrun


def test_partitioned_string_logs_train_resume_export_and_score(tmp_path):
    logs = tmp_path / "logs"
    gen = subprocess.run(
        [sys.executable, "-m", "mtl_dist.data.synth", "--out", str(logs), "--workload", "strings",
         "--days", "3", "--train-rows", "40000", "--val-rows", "8000", "--files", "6"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert sorted(p.name for p in logs.glob("dt=*")) == [
        "dt=2026-11-01", "dt=2026-11-02", "dt=2026-11-03", "dt=2026-11-04",
    ]  # fmt: skip
    out = tmp_path / "run"
    job = [
        "-m", "mtl_dist.train", "--config", "configs/strings.toml",
        "--data.train_path", str(logs), "--data.train_filter", "dt < '2026-11-04'",
        "--data.val_path", str(logs), "--data.val_filter", "dt == '2026-11-04'",
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "512", "--model.experts.hidden", "64,32",
    ]  # fmt: skip
    proc = torchrun([*job, "--train.max_steps", "15"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "40000 rows" in proc.stdout  # the training days only
    proc = torchrun(job, nproc=1)  # resumed on one rank: the rest of the filtered rows
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-splitting the rows not yet trained" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 15 + (40000 - 15 * 2 * 512) // 512  # every remaining row once
    assert m["metrics"]["click"]["count"] == 8000  # validated on 11-04 alone
    assert m["metrics"]["click"]["auc"] > 0.6, m["metrics"]
    model, preds = tmp_path / "model.pt", tmp_path / "preds.parquet"
    cli = [sys.executable, "-m"]
    subprocess.run([*cli, "mtl_dist.serve.export", str(out / "checkpoints" / "latest"), str(model)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    subprocess.run([*cli, "mtl_dist.serve.score", "--model", str(model),
                    "--data", str(logs / "dt=2026-11-04"), "--out", str(preds),
                    "--keep", "click,user_id"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    t = pq.read_table(preds)
    assert t.column("user_id").type == "string" and t.num_rows == 8000
    auc = roc_auc_score(t["click"].to_numpy(), t["pred_click"].to_numpy())
    assert auc == pytest.approx(m["metrics"]["click"]["auc"], abs=1e-5)
