"""Runs that go wrong must not look right — through the real entry point, 2 ranks, real Parquet.

* A regression label that is finite in float32 but whose squared error is not (1e20 seconds)
  makes a non-finite loss on rank 1 only: ``stop`` ends the job non-zero naming step, task and
  rank and writes no checkpoint after it; ``skip`` drops that step's update on both ranks
  (parameters after the step equal those before it), counts it in TensorBoard and goes on, and
  stops after ``max_nonfinite`` in a row.
* Uncertainty weighting with a conversion column null everywhere (dense lr 0.5, 200 steps; it
  used to reach ``inf × 0 = NaN``) ends with finite weights, the conversion weight untouched,
  and a validation set with one class reports the AUC as undefined, not 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import torchrun

CONFIG = """
[model]
head = "mmoe"
[model.experts]
num = 2
hidden = [16]
[model.tower]
hidden = [8]
[train]
batch_size = 32
log_every = 1
progress_bar = false
[monitor]
attribution = false
[features]
dense = ["x"]
[[features.sparse]]
name = "item"
vocab_size = 100
embedding_dim = 8
[[tasks]]
name = "click"
label = "click"
sample_weight = "w"
[[tasks]]
name = "conversion"
label = "conversion"
condition = "click"
[[tasks]]
name = "watch"
kind = "regression"
label = "watch_time"
"""


def write(path: Path, n: int, seed: int, bad_rows=(), conversion=None, weights=True) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-x))).astype(np.int8)
    watch = np.abs(rng.normal(size=n)) * 10
    watch[list(bad_rows)] = 1e20  # finite in float32; its squared error is not
    cols = {
        "item": pa.array(rng.integers(0, 100, n), pa.int64()),
        "x": pa.array(x, pa.float32()),
        "click": pa.array(click),
        "conversion": conversion if conversion is not None else pa.array(click * (rng.random(n) < 0.4).astype(np.int8)),
        "watch_time": pa.array(watch, pa.float32()),
    }  # fmt: skip
    if weights:
        cols["w"] = pa.array(np.ones(n), pa.float32())
    pq.write_table(pa.table(cols), path, row_group_size=64)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """2 x 256 training rows, batch 32: rank 0 reads part-0, rank 1 part-1, whose 4th and 5th
    batches (steps 4 and 5) each hold one bad watch time."""
    root = tmp_path_factory.mktemp("nonfinite")
    (root / "train").mkdir()
    (root / "val").mkdir()
    write(root / "train" / "part-0.parquet", 256, 0)
    write(root / "train" / "part-1.parquet", 256, 1, bad_rows=(3 * 32 + 5, 4 * 32 + 9))
    write(root / "val" / "part-0.parquet", 128, 2, weights=False)  # validation: no weights
    (root / "job.toml").write_text(CONFIG)
    return root


def train(data: Path, out: Path, *extra: str):
    args = [
        "-m", "mtl_dist.train", "--config", str(data / "job.toml"),
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), *extra,
    ]  # fmt: skip
    return torchrun(args, nproc=2, timeout=300)


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters (tables and dense), gathered into this process."""
    from mtl_dist.serve.export import build_unsharded, export_checkpoint, load_exported

    export_checkpoint(checkpoint, checkpoint.parent / f"{checkpoint.name}.pt")
    cfg, model = load_exported(checkpoint.parent / f"{checkpoint.name}.pt")
    names = {n for n, _ in build_unsharded(cfg).named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def test_stop_names_step_task_and_rank_and_keeps_the_last_good_checkpoint(bad_data, tmp_path):
    proc = train(bad_data, tmp_path, "--train.on_nonfinite", "stop", "--checkpoint.every", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss at step 4: task(s) watch on rank(s) 1; stopping" in out
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004").exists()
    assert not (tmp_path / "metrics.json").exists()


def test_skip_drops_the_update_on_every_rank_and_counts_it(bad_data, tmp_path):
    proc = train(
        bad_data, tmp_path, "--train.on_nonfinite", "skip", "--train.max_nonfinite", "3",
        "--train.max_steps", "7", "--checkpoint.every", "1", "--checkpoint.keep", "10",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[nonfinite] non-finite loss at step 4: task(s) watch on rank(s) 1" in proc.stdout
    assert "(2 skipped so far, 2 in a row)" in proc.stdout  # step 5
    ckpts = tmp_path / "checkpoints"
    p3, p5, p6 = (parameters(ckpts / f"step_0000000{s}") for s in (3, 5, 6))
    for name in p3:  # steps 4 and 5 changed nothing: tables, experts, towers, gates
        assert torch.equal(p3[name], p5[name]), name
    assert any(not torch.equal(p5[n], p6[n]) for n in p5)  # step 6 trained again
    assert all(torch.isfinite(v).all() for v in p6.values())
    for rank in (0, 1):  # every rank counts the skipped steps; no NaN loss is plotted
        acc = EventAccumulator(str(tmp_path / "tb" / f"rank_{rank}"))
        acc.Reload()
        counted = [(e.step, e.value) for e in acc.Scalars("train/nonfinite_steps")]
        assert counted == [(4, 1.0), (5, 2.0)], counted
        losses = [e.value for e in acc.Scalars("train/loss/watch")]
        assert len(losses) == 5 and np.isfinite(losses).all()  # steps 4 and 5 not plotted
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["steps"] == 7


def test_skip_stops_after_max_nonfinite_in_a_row(bad_data, tmp_path):
    proc = train(bad_data, tmp_path, "--train.on_nonfinite", "skip", "--train.max_nonfinite", "2")
    assert proc.returncode != 0
    assert "stopping after 2 consecutive non-finite steps (train.max_nonfinite = 2)" in (
        proc.stdout + proc.stderr
    )
    assert not (tmp_path / "metrics.json").exists()


def test_uncertainty_with_a_task_never_labelled_stays_finite(tmp_path):
    """Conversion null on every training row, dense lr 0.5, 200 steps on 2 ranks: its
    log-variance never moves (weight exactly 1), every weight is finite; the validation set
    has conversions labelled but all 0, so its AUC is undefined, not 0."""
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for r in range(2):
        write(
            tmp_path / "train" / f"part-{r}.parquet", 6400, r, conversion=pa.nulls(6400, pa.int8())
        )
    rows = 256
    write(tmp_path / "val" / "part-0.parquet", rows, 9, conversion=pa.array(np.zeros(rows, np.int8)),
          weights=False)  # fmt: skip
    (tmp_path / "job.toml").write_text(CONFIG)
    proc = train(
        tmp_path, tmp_path / "run", "--loss.balancer", "uncertainty", "--optim.dense_lr", "0.5",
        "--train.log_every", "50",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=float)
    assert result["steps"] == 200
    for weights in result["task_weights_by_rank"]:
        assert np.isfinite(weights).all() and min(weights) > 0
        assert weights[1] == 1.0  # e^{-0}: the conversion log-variance never moved
    conversion = result["metrics"]["conversion"]
    assert "auc" not in conversion and "calibration" not in conversion
    assert result["undefined_metrics"]["conversion"]["auc"].startswith("one class only: 0 pos")
    assert result["metric_units"] == {"watch": "watch_time"}
    assert "auc and oracle_auc undefined" not in proc.stdout  # no truth column: no oracle
    assert "auc undefined: one class only" in proc.stdout
