"""Checkpoints under torchrun: exact resume, crash mid-save, SIGKILL + torchrun restart,
reshard 2 → 1 and 1 → 2, another schema refused, export + scoring equal to the live model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.conftest import ROOT, descendants, torchrun

STEPS = 60  # of 312 per epoch at batch 256 on 2 ranks


def args(synth_data, out, *extra):
    return [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(synth_data / "train"), "--data.val_path", str(synth_data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "64,32",
        "--checkpoint.every", "20", "--checkpoint.keep", "2", "--monitor.attribution", "false",
        "--train.max_steps", str(STEPS), "--train.precision", "fp32", *extra,
    ]  # fmt: skip


def run(synth_data, out, *extra, nproc=2, env=None, ok=True):
    proc = torchrun(args(synth_data, out, *extra), nproc=nproc, env=env)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model, gathered into one process (the export path)."""
    from mtl_dist.serve.export import export_checkpoint, load_exported

    export_checkpoint(checkpoint, checkpoint.parent / "export.pt")
    _, model = load_exported(checkpoint.parent / "export.pt")
    return model.state_dict()


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(synth_data, out)
    return out


def test_atomic_layout_and_keep_last_k(reference):
    root = reference / "checkpoints"
    assert (root / "latest").read_text() == "step_00000060"
    assert sorted(p.name for p in root.iterdir()) == [
        "finished.json", "latest", "step_00000040", "step_00000060",
    ]  # fmt: skip
    assert json.loads((root / "finished.json").read_text())["step"] == 60  # the run ended there
    extra = torch.load(root / "step_00000060" / "extra.pt", weights_only=True)
    assert extra["step"] == 60 and len(extra["ranks"]) == 2


def test_interrupted_run_resumes_exactly(synth_data, reference, tmp_path):
    """Stopped at step 40, resumed (automatically: the run dir has a checkpoint) to 60: the
    same metrics and bit-identical parameters as the uninterrupted run."""
    run(synth_data, tmp_path, "--train.max_steps", "40")
    proc = run(synth_data, tmp_path)
    assert "[resume]" in proc.stdout and "continuing each reader exactly" in proc.stdout
    assert metrics(tmp_path)["metrics"] == metrics(reference)["metrics"]
    a = weights(reference / "checkpoints" / "step_00000060")
    b = weights(tmp_path / "checkpoints" / "step_00000060")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_save_keeps_the_previous_checkpoint(synth_data, reference, tmp_path):
    run(synth_data, tmp_path, env={"MTL_CRASH_AT": "before_commit:40"}, ok=False)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000020"
    assert (root / "step_00000040.partial").is_dir()  # written, never committed
    proc = run(synth_data, tmp_path, "--resume")
    assert "step_00000020 at step 20" in proc.stdout
    # the unfinished save is removed at the next start, by name
    assert "removed 1 unfinished save(s) a crash left in" in proc.stdout
    assert ": step_00000040.partial" in proc.stdout
    assert not list(root.glob("*.partial"))
    assert metrics(tmp_path)["metrics"] == metrics(reference)["metrics"]


def _local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")]
    return found[0] if found else None


def test_sigkill_restart_resumes_from_latest(synth_data, reference, tmp_path):
    """torchrun --max-restarts 1: rank 0 is SIGKILLed after the step-20 checkpoint; the job
    restarts, resumes by itself and ends with the uninterrupted run's metrics."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=1", *args(synth_data, tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), "no checkpoint appeared"
    victims = [p for p in descendants(proc.pid) if _local_rank(p) == "0"]  # the lock holder
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "[resume]" in out
    # the restarted rank 0 takes over the run directory as the same job, not as an intruder
    assert "restart of job torchrun:" in out and "(previous pid" in out
    assert metrics(tmp_path)["metrics"] == metrics(reference)["metrics"]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_reshard_on_load(small_synth_data, tmp_path, before, after):
    """Saved by N processes, resumed by M: the tables load under the new plan and the rows not
    yet trained are re-split, so the resumed pass runs exactly the remaining batches."""
    run(small_synth_data, tmp_path, "--train.max_steps", "20", nproc=before)
    proc = run(small_synth_data, tmp_path, "--train.max_steps", "0", nproc=after)
    assert "re-splitting the rows not yet trained" in proc.stdout
    trained = 20 * before * 256
    rows = 40_000 - trained
    assert f"(this pass: {rows})" in proc.stdout
    # the resumed epoch: the remaining rows cut over `after` ranks, full batches only
    steps = metrics(tmp_path)["steps"]
    assert steps - 20 == (rows // after) // 256
    m = metrics(tmp_path)["metrics"]
    assert m["click"]["auc"] > 0.6 and m["click"]["count"] == 10_000


def test_checkpoint_of_another_schema_is_refused(synth_data, reference, tmp_path):
    proc = run(
        synth_data, tmp_path, "--checkpoint.resume", str(reference / "checkpoints" / "step_00000060"),
        "--model.experts.num", "8", ok=False,
    )  # fmt: skip
    assert "was written for another schema: model.experts.num: saved 4, configured 8" in proc.stderr


def test_schema_difference_names_the_table_field_and_both_values(tmp_path):
    """One table's embedding_dim changed: the refusal names the feature, its table, the field,
    and the saved value beside the configured one (not just 'differing: features.{sparse}')."""
    from mtl_dist.checkpoint.store import check_schema
    from mtl_dist.config import load_config, to_dict

    cfg = load_config(["--config", "configs/default.toml"])
    saved = to_dict(cfg)
    item = next(f for f in cfg.features.sparse if f.name == "item_id")
    item.embedding_dim = 32
    cfg.tasks[2].transform = "none"
    with pytest.raises(ValueError) as err:
        check_schema(saved, cfg, tmp_path)
    msg = str(err.value)
    assert (
        "features.sparse['item_id'] (table item_id).embedding_dim: saved 16, configured 32" in msg
    )
    assert "tasks['watch_time'].transform: saved 'log1p', configured 'none'" in msg


def test_checkpoint_from_before_new_keys_resumes_unless_they_are_on(tmp_path):
    """A checkpoint written before a model / feature / task key existed lacks it: at its
    default it is the old model and passes; switched on, the refusal names it."""
    from mtl_dist.checkpoint.store import check_schema
    from mtl_dist.config import load_config, to_dict

    cfg = load_config(["--config", "configs/default.toml"])
    saved = to_dict(cfg)
    for section, key in (("esmm", "escm2_dr"), ("experts", "self_gate"),
                         ("experts", "feature_gate_rank"), ("pepnet", "gate_hidden")):  # fmt: skip
        del saved["model"][section][key]
    del saved["model"]["stem"]  # a whole section newer than the checkpoint
    del saved["features"]["sparse"][0]["collision"]
    del saved["tasks"][0]["negative_rate"]
    check_schema(saved, cfg, tmp_path)  # nothing differs
    cfg.model.experts.feature_gate_rank = 8
    with pytest.raises(ValueError, match="model.experts.feature_gate_rank: saved 0, configured 8"):
        check_schema(saved, cfg, tmp_path)


def test_unwritable_run_directory_fails_clearly(synth_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run(synth_data, blocker / "run", ok=False)
    assert "train.output_dir" in proc.stderr and "is not writable" in proc.stderr


def test_export_and_score_reproduce_the_live_model(synth_data, reference, tmp_path):
    model = tmp_path / "model.pt"
    cli = [sys.executable, "-m"]
    subprocess.run(
        [*cli, "mtl_dist.serve.export", str(reference / "checkpoints" / "step_00000060"), str(model)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    assert torch.load(model, weights_only=True)["format"] == "mtl-dist-model/1"
    preds = tmp_path / "preds.parquet"
    subprocess.run(
        [*cli, "mtl_dist.serve.score", "--model", str(model), "--data", str(synth_data / "val"),
         "--out", str(preds), "--keep", "click,watch_time", "--batch-size", "3000"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    t = pq.read_table(preds)
    assert t.num_rows == 40_000
    assert set(t.column_names) == {
        "click",
        "watch_time",
        "pred_click",
        "pred_conversion",
        "pred_watch_time",
    }
    live = metrics(reference)["metrics"]
    auc = roc_auc_score(t["click"].to_numpy(), t["pred_click"].to_numpy())
    assert auc == pytest.approx(live["click"]["auc"], abs=1e-5)
    # watch time comes back in seconds (the model predicts log1p seconds)
    pred = torch.from_numpy(t["pred_watch_time"].to_numpy()).double().log1p()
    label = torch.from_numpy(t["watch_time"].to_numpy()).double().log1p()
    assert float((pred - label).square().mean()) == pytest.approx(
        live["watch_time"]["mse"], abs=1e-4
    )


def test_finished_run_continues_with_another_epoch(tmp_path):
    """A run that ended at an epoch's end (its checkpoint holds no reader position), started
    again with one more epoch, resumes and trains exactly that epoch."""
    from mtl_dist.data.synth import generate

    data = tmp_path / "data"
    generate(data, train_rows=4096, val_rows=1024, files=2, verbose=False)
    one = [
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.max_steps", "0", "--checkpoint.every", "0",
    ]  # fmt: skip
    run(data, tmp_path / "run", *one, nproc=1)
    assert metrics(tmp_path / "run")["steps"] == 16  # 4096 rows / 256
    proc = run(data, tmp_path / "run", *one, "--train.epochs", "2", nproc=1)
    assert "at step 16, epoch 1" in proc.stdout
    assert metrics(tmp_path / "run")["steps"] == 32


def test_score_refuses_a_prediction_that_overflows_its_label_unit(reference, synth_data, tmp_path):
    """A log1p task's prediction of 1000 maps to expm1(1000) = inf seconds: scoring stops naming
    the task and leaves no output file (the sibling of the label cast, on the way out)."""
    from mtl_dist.serve.export import export_checkpoint

    model = tmp_path / "model.pt"
    export_checkpoint(reference / "checkpoints" / "step_00000060", model)
    blob = torch.load(model, weights_only=True)
    bias = blob["state_dict"]["model.head.towers.mlp.biases.1"]  # [T, 1, 1]: output units
    bias[2] = 1000.0  # watch_time (log1p seconds)
    torch.save(blob, model)
    preds = tmp_path / "preds.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_dist.serve.score", "--model", str(model),
         "--data", str(synth_data / "val"), "--out", str(preds)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "prediction(s) of task watch_time not finite in float32" in proc.stderr
    assert "before expm1" in proc.stderr
    assert not preds.exists() and not preds.with_name(preds.name + ".partial").exists()
