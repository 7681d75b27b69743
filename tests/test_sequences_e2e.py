"""Behaviour sequences under torchrun, 2 ranks, real Parquet (``mtl-datagen --workload
sequences``): the EC sharing the item table is sharded by the planner, a run stopped mid-epoch
(with the float side column hist_age_s) resumes to the uninterrupted run's metrics, DIN learns
the task that hangs on one past item better than mean pooling (same seed), and a bad list value
stops the run naming file, column and row."""

import csv
import importlib.util
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, torchrun

STEPS = 117  # 60k rows / 2 ranks / batch 256


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    from mtl_dist.data.synth_sequences import generate_sequences

    out = tmp_path_factory.mktemp("sequences")
    generate_sequences(out, 60_000, 10_000, files=2, row_group_size=4096, seed=0)
    return out


def run(data, out, *extra, ok=True, config="configs/sequences.toml"):
    args = [
        "-m", "mtl_dist.train", "--config", config,
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--checkpoint.every", "40", "--monitor.gate_every", "10", *extra,
    ]  # fmt: skip
    proc = torchrun(args, nproc=2)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def din_run(seq_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("din")
    proc = run(seq_data, out)
    return out, proc


def test_sequence_table_is_sharded_and_din_trains(din_run):
    out, proc = din_run
    assert re.search(r"\w+ on ranks \[[0-9, ]+\]: .*item_id", proc.stdout), proc.stdout[-2000:]
    m = metrics(out)
    assert m["steps"] == STEPS
    assert m["metrics"]["click"]["auc"] > 0.62 and m["metrics"]["like"]["auc"] > 0.7, m
    # attention health, logged like gate health (every monitor.gate_every steps, each rank)
    for rank in (0, 1):
        acc = EventAccumulator(str(out / "tb" / f"rank_{rank}"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {f"attention/hist/{k}" for k in ("entropy", "entropy_ratio", "recent_share")} <= tags
        entropy = [e.value for e in acc.Scalars("attention/hist/entropy")]
        assert len(entropy) >= STEPS // 10 - 1 and all(0 < e < math.log(20) for e in entropy)
    # attribution ranks the sequence like any other input: click hangs on it, like does not
    with open(out / "attribution.csv") as fh:
        rows = {r["feature"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"user_id", "item_id", "hist", "dense_0", "dense_1"}
    assert int(rows["hist"]["rank_click"]) <= 2, rows
    assert int(rows["hist"]["rank_like"]) > int(rows["hist"]["rank_click"]), rows


def test_resumed_mid_epoch_equals_the_uninterrupted_run(seq_data, tmp_path):
    """With the float side column hist_age_s (configs/sequences_recency.toml): the ids and their
    aligned ages resume exactly, so the metrics equal the uninterrupted run's."""
    recency = {"config": "configs/sequences_recency.toml"}
    run(seq_data, tmp_path / "whole", **recency)
    run(seq_data, tmp_path / "cut", "--train.max_steps", "50", **recency)
    proc = run(seq_data, tmp_path / "cut", **recency)
    assert "[resume]" in proc.stdout and "continuing each reader exactly" in proc.stdout
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert set(whole["metrics"]) == {"click", "recent"} and whole["steps"] == STEPS
    assert cut["metrics"] == whole["metrics"]


def test_attention_beats_mean_pooling_on_the_one_past_item_task(seq_data, din_run, tmp_path):
    """Same seed and data: click (decided by one past item matching the candidate) is learned
    clearly better by DIN; like (no history in it) ties."""
    toml = tmp_path / "mean.toml"
    text = (ROOT / "configs" / "sequences.toml").read_text()
    text = text.replace('pooling = "din"', 'pooling = "mean"')
    toml.write_text(text)
    out = tmp_path / "mean"
    args = [
        "-m", "mtl_dist.train", "--config", str(toml),
        "--data.train_path", str(seq_data / "train"), "--data.val_path", str(seq_data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--monitor.attribution", "false",
    ]  # fmt: skip
    assert torchrun(args, nproc=2).returncode == 0
    din, mean = metrics(din_run[0])["metrics"], metrics(out)["metrics"]
    assert din["click"]["auc"] > mean["click"]["auc"] + 0.05, (din, mean)
    assert abs(din["like"]["auc"] - mean["like"]["auc"]) < 0.02, (din, mean)


def test_bad_sequence_value_stops_the_run_naming_file_column_and_row(seq_data, tmp_path):
    t = pq.read_table(seq_data / "train" / "part-1.parquet")
    hist = t.column("hist_item_ids").to_pylist()
    hist[777] = [3, 9999]
    t = t.set_column(t.schema.get_field_index("hist_item_ids"), "hist_item_ids",
                     pa.array(hist, pa.list_(pa.int64())))  # fmt: skip
    (tmp_path / "train").mkdir()
    pq.write_table(t, tmp_path / "train" / "part-1.parquet", row_group_size=500)
    args = [
        "-m", "mtl_dist.train", "--config", "configs/sequences.toml",
        "--data.train_path", str(tmp_path / "train"), "--data.val_path", str(seq_data / "val"),
        "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false",
    ]  # fmt: skip
    proc = torchrun(args, nproc=2)
    assert proc.returncode != 0
    assert "part-1.parquet: column 'hist_item_ids', row 777: id 9999 outside [0, 500)" in (
        proc.stdout + proc.stderr
    )


def test_trained_checkpoint_exports_scores_and_serves_as_training_validated(
    din_run, seq_data, tmp_path
):
    """The sharded run's checkpoint gathered into one process: score's click AUC equals the
    run's validation AUC, and the .pt2 program equals score on the validation rows."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mtl_dist.serve.export import export_checkpoint, export_package
    from mtl_dist.serve.score import score

    step = (din_run[0] / "checkpoints" / "latest").read_text()
    checkpoint = din_run[0] / "checkpoints" / step
    export_checkpoint(checkpoint, tmp_path / "model.pt")
    val = seq_data / "val"
    score(tmp_path / "model.pt", str(val), tmp_path / "preds.parquet", ["click"], 4096)
    t = pq.read_table(tmp_path / "preds.parquet")
    auc = roc_auc_score(t["click"].to_numpy(), t["pred_click"].to_numpy())
    assert auc == pytest.approx(metrics(din_run[0])["metrics"]["click"]["auc"], abs=1e-5)
    export_package(checkpoint, tmp_path / "m.pt2")
    spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    client.main(str(tmp_path / "m.pt2"), str(val), str(tmp_path / "served.parquet"))
    served = pq.read_table(tmp_path / "served.parquet")
    np.testing.assert_allclose(
        served["pred_click"].to_numpy(), t["pred_click"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert torch.isfinite(torch.tensor(served["pred_like"].to_numpy())).all()


@pytest.mark.parametrize(
    "extra",
    [
        ["--sharding.force", "table_wise", "--data.num_workers", "2"],
        ["--sharding.force", "column_wise", "--sharding.pipeline", "false"],
    ],
    ids=["table_wise_workers", "column_wise_unpipelined"],
)
def test_other_plans_and_loaders_train_the_sequence(seq_data, din_run, tmp_path, extra):
    """The EC under other sharding types, loader workers and the unpipelined step: it trains
    to the pipelined row-wise run's quality."""
    proc = run(seq_data, tmp_path, "--monitor.attribution", "false", *extra)
    assert f"{extra[1]} on ranks" in proc.stdout
    got, ref = metrics(tmp_path)["metrics"], metrics(din_run[0])["metrics"]
    assert got["click"]["auc"] == pytest.approx(ref["click"]["auc"], abs=0.03), (got, ref)
