"""Runs that ended stay ended, and an undefined best metric is no improvement — real jobs under
torchrun, 2 ranks each, on a tiny dataset (issues 25 and 26).

One run validates ``conversion/auc`` on a validation set where every labelled conversion is 0:
the metric is undefined at every validation, counted as no improvement (logged, never printed
as a number), so ``early_stop_patience = 1`` stops it at its first validation. Relaunched with
the same command (a scheduler's retry) it does nothing: exit 0, ``latest`` and
``metrics.json`` untouched; ``checkpoint.continue_finished = true`` trains on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mtl_dist.checkpoint.rundir import FINISHED, record_finished, run_ended
from mtl_dist.config import load_config
from tests.conftest import torchrun

VAL_EVERY = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8k training rows (15 steps per epoch at 2 x 256); validation with one conversion class."""
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("stopped-data")
    generate(out, train_rows=8_000, val_rows=1_000, files=1, row_group_size=2048, verbose=False)
    one_class = out / "val_one_class"
    one_class.mkdir()
    table = pq.read_table(next((out / "val").glob("*.parquet")))
    col = table.column("conversion")
    zeros = pc.if_else(pc.is_null(col), col, pa.scalar(0, col.type))
    i = table.schema.get_field_index("conversion")
    pq.write_table(table.set_column(i, "conversion", zeros), one_class / "part-0.parquet")
    return out


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val_one_class"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "16", "--model.experts.num", "2",
        "--model.tower.hidden", "8", "--monitor.attribution", "false",
        "--monitor.gate_every", "0", "--monitor.heatmap_every", "0",
        "--train.val_every", str(VAL_EVERY), "--train.max_steps", "30",
        "--train.best_metric", "conversion/auc", "--train.early_stop_patience", "1",
        *extra,
    ]  # fmt: skip


def run(data: Path, out: Path, *extra: str):
    proc = torchrun(args(data, out, *extra), nproc=2, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    files = [out / "metrics.json", out / "checkpoints" / "latest", out / "checkpoints" / FINISHED]
    files += sorted((out / "checkpoints").glob("step_*/manifest.json"))
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_undefined_best_metric_early_stops_and_the_relaunch_does_nothing(data, tmp_path):
    first = run(data, tmp_path)
    log = first.stdout
    assert "[best] conversion/auc undefined at step 5 (one class only" in log, log[-3000:]
    assert "counted as no improvement" in log
    assert "[early stop] conversion/auc has not improved in 1 validations (best none" in log
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["early_stopped"] and m["steps"] == VAL_EVERY and m["ended_by"] == "early stop"
    assert m["best"]["value"] is None and "auc" in m["undefined_metrics"]["conversion"]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == f"step_{VAL_EVERY:08d}"
    record = json.loads((root / FINISHED).read_text())
    assert record["reason"] == "early stop" and record["step"] == VAL_EVERY
    before = snapshot(tmp_path)

    # the same command again (a scheduler's retry): nothing trained, nothing written
    again = run(data, tmp_path)
    assert f"[resume] run ended at step {VAL_EVERY} (early stop): nothing to do" in again.stdout
    assert "[checkpoint]" not in again.stdout and "[done]" not in again.stdout
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{VAL_EVERY:08d}"]

    # asked to, it trains on: patience starts over, the next validation stops it again
    more = run(data, tmp_path, "--checkpoint.continue_finished", "true")
    assert "training on" in more.stdout
    assert (root / "latest").read_text() == f"step_{2 * VAL_EVERY:08d}"
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2 * VAL_EVERY


def _cfg(*extra: str):
    return load_config(["--config", "configs/default.toml", *extra])


def test_which_relaunch_stays_ended(tmp_path):
    """max_steps / all epochs: the same budget stays ended, a larger one trains on; early stop
    stays ended unless continue_finished; a fresh start or a named checkpoint is never held."""
    assert run_ended(_cfg(), tmp_path) == ({}, False)  # nothing recorded: not ended
    record_finished(tmp_path, {"reason": "max_steps", "step": 40, "epochs": 1, "max_steps": 40})
    assert run_ended(_cfg("--train.max_steps", "40"), tmp_path)[1]
    assert not run_ended(_cfg("--train.max_steps", "50"), tmp_path)[1]
    assert not run_ended(_cfg("--train.max_steps", "0"), tmp_path)[1]
    assert not run_ended(_cfg("--train.max_steps", "40", "--checkpoint.resume", "never"),
                         tmp_path)[1]  # fmt: skip
    record_finished(tmp_path, {"reason": "all epochs", "step": 60, "epochs": 2, "max_steps": 0})
    assert run_ended(_cfg("--train.epochs", "2"), tmp_path)[1]
    assert not run_ended(_cfg("--train.epochs", "3"), tmp_path)[1]
    record_finished(tmp_path, {"reason": "early stop", "step": 20, "epochs": 5, "max_steps": 0})
    assert run_ended(_cfg("--train.epochs", "9", "--train.max_steps", "999"), tmp_path)[1]
    record, ended = run_ended(_cfg("--checkpoint.continue_finished", "true"), tmp_path)
    assert record["reason"] == "early stop" and not ended


def test_an_empty_validation_filter_stops_at_start_and_an_overlap_is_warned(data, tmp_path):
    """Issue 25/26: a ``data.val_filter`` that keeps no row stops every rank before training,
    naming the path, the filter and the partitions found; training and validation filters that
    share rows train, with a start-up warning counting the shared rows."""
    hive = tmp_path / "logs"
    for day, split in (("2026-11-29", "train"), ("2026-11-30", "val")):
        (hive / f"dt={day}").mkdir(parents=True)
        src = next((data / split).glob("*.parquet"))
        pq.write_table(pq.read_table(src), hive / f"dt={day}" / "part-0.parquet")
    base = [a.replace(str(data / "train"), str(hive)).replace(str(data / "val_one_class"), str(hive))
            for a in args(data, tmp_path / "run")]  # fmt: skip
    proc = torchrun([*base, "--data.val_filter", "dt == '2026-12-01'"], nproc=2, timeout=300)
    assert proc.returncode != 0
    assert (
        f"data.val_filter \"dt == '2026-12-01'\" selects no row of {hive} (2 files, 9000 rows): "
        "partitions found: dt=2026-11-30, dt=2026-11-29"
    ) in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    proc = torchrun(
        [*base, "--data.train_filter", "dt <= '2026-11-30'", "--data.val_filter",
         "dt == '2026-11-30'", "--train.max_steps", "2", "--train.early_stop_patience", "0",
         "--train.best_metric", ""],
        nproc=2, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "[data] warning: data.train_filter \"dt <= '2026-11-30'\" and data.val_filter "
        "\"dt == '2026-11-30'\" overlap: 1000 rows in 1 file(s)"
    ) in proc.stdout, proc.stdout[-3000:]
