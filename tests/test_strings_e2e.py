"""A dataset with string keys, from the README's words: ``mtl-datagen --workload strings``,
``configs/strings.toml``, 2 ranks under torchrun; then export and scoring hash the keys the way
training did (the scored AUC equals the live one)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import ROOT, torchrun


def test_string_keys_train_export_and_score_alike(tmp_path):
    data = tmp_path / "data"
    gen = subprocess.run(
        [sys.executable, "-m", "data_tools.synth", "--out", str(data), "--workload", "strings",
         "--train-rows", "40000", "--val-rows", "8000", "--files", "2"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert pq.read_schema(data / "train" / "part-00000.parquet").field("user_id").type == "string"
    out = tmp_path / "run"
    proc = torchrun([
        "-m", "mtl_dist.train", "--config", "configs/strings.toml",
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "512", "--model.expert_hidden", "64,32",
    ], nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["click"]["auc"] > 0.6, m["metrics"]
    model, preds = tmp_path / "model.pt", tmp_path / "preds.parquet"
    cli = [sys.executable, "-m"]
    subprocess.run([*cli, "mtl_dist.export", str(out / "checkpoints" / "latest"), str(model)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    subprocess.run([*cli, "mtl_dist.score", "--model", str(model), "--data", str(data / "val"),
                    "--out", str(preds), "--keep", "click,user_id"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    t = pq.read_table(preds)
    assert t.column("user_id").type == "string"
    auc = roc_auc_score(t["click"].to_numpy(), t["pred_click"].to_numpy())
    assert auc == pytest.approx(m["metrics"]["click"]["auc"], abs=1e-5)
