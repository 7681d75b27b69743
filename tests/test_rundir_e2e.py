"""Run directories and checkpoints that cannot lie — real jobs under torchrun, 2 ranks each.

One owner per run directory (two real jobs; a killed holder's stale lock is taken over), never
"start from scratch" over existing checkpoints (empty / dangling ``latest``, a missing file,
64 KiB of zeros in a shard: the newest verified checkpoint is used, loudly; none verified: the
run stops naming them), a fresh start moves old checkpoints aside and prunes only its own, a
failing validation costs only the validation, SIGTERM saves at an agreed step and the job
resumes exactly, and a full disk is named as such.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, descendants, torchrun

STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("rundir-data")
    generate(out, train_rows=40_000, val_rows=4_000, files=2, row_group_size=4096, verbose=False)
    return out


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "32,16", "--train.log_every", "5",
        "--checkpoint.every", "10", "--checkpoint.keep", "3", "--monitor.attribution", "false",
        "--train.max_steps", str(STEPS), "--train.precision", "fp32", *extra,
    ]  # fmt: skip


def run(data: Path, out: Path, *extra: str, ok: bool = True, env=None):
    proc = torchrun(args(data, out, *extra), nproc=2, timeout=300, env=env)
    assert (proc.returncode == 0) == ok, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def start(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A torchrun job in the background, output merged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args(data, out, *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at 10, 20, 30, 40."""
    out = tmp_path_factory.mktemp("reference")
    run(data, out)
    return out


def test_second_job_is_refused_and_a_killed_holders_lock_is_taken_over(data, tmp_path):
    """Two jobs on one train.output_dir, different seeds: the second stops at once naming the
    first (host, pid, job); the first, killed with SIGKILL, leaves a stale lock that the next
    job reports and takes over, resuming the first job's checkpoints."""
    first = start(data, tmp_path, "--train.epochs", "50", "--train.max_steps", "0")
    try:
        owner = tmp_path / ".owner"
        wait_for(lambda: owner.exists() and owner.read_text().strip(), "the first job's lock")
        holder = json.loads(owner.read_text())
        wait_for(lambda: (tmp_path / "checkpoints" / "latest").exists(), "a first checkpoint")
        t0 = time.time()
        second = run(data, tmp_path, "--train.seed", "1", ok=False)
        assert time.time() - t0 < 60
        out = second.stdout + second.stderr
        assert (
            f"is in use by job {holder['job']} (host {holder['host']}, pid {holder['pid']}" in out
        )
        assert first.poll() is None  # the first job trains on, undisturbed
    finally:
        for pid in [first.pid, *descendants(first.pid)]:  # no cleanup at all, as a node loss
            os.kill(pid, signal.SIGKILL)
        first.wait()
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    third = run(
        data, tmp_path, "--train.epochs", "50", "--train.max_steps", str(int(latest[5:]) + 5)
    )
    assert (
        f"stale lock of job {holder['job']} (host {holder['host']}, pid {holder['pid']}"
        in third.stdout
    )
    assert f"[resume] {tmp_path / 'checkpoints' / latest} at step" in third.stdout
    assert metrics(tmp_path)["config"]["train"]["seed"] == 0
    assert (tmp_path / ".owner").read_text() == ""  # a finished job clears its record


def _corrupt(shard: Path) -> None:
    with shard.open("r+b") as fh:  # 64 KiB of zeros inside the shard: same size, other bytes
        fh.seek(4096)
        fh.write(b"\0" * 65536)


def test_latest_empty_missing_file_or_corrupt_shard_falls_back_to_the_newest_verified(
    data, reference, tmp_path
):
    """Checkpoints at 10 and 20; latest emptied, step 20's extra.pt deleted — resume from 10.
    Then step 30 corrupted (zeros in a shard) — resume from 20. Every resume ends with the
    uninterrupted run's metrics; export refuses the corrupt checkpoint."""
    run(data, tmp_path, "--train.max_steps", "20")
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("")
    (root / "step_00000020" / "extra.pt").unlink()
    proc = run(data, tmp_path, "--train.max_steps", "30")
    assert (
        "[resume] WARNING: skipping latest points at nothing (empty): no such checkpoint"
        in proc.stdout
    )
    assert "[resume] WARNING: skipping step_00000020: extra.pt is missing" in proc.stdout
    assert f"[resume] {root / 'step_00000010'} at step 10" in proc.stdout
    shard = sorted((root / "step_00000030").glob("*.distcp"))[-1]
    _corrupt(shard)
    proc = run(data, tmp_path)
    assert f"skipping step_00000030: {shard.name} does not match its digest" in proc.stdout
    assert f"[resume] {root / 'step_00000020'} at step 20" in proc.stdout
    assert metrics(tmp_path)["metrics"] == metrics(reference)["metrics"]
    from mtl_dist.serve.export import export_checkpoint

    _corrupt(sorted((root / "step_00000040").glob("*.distcp"))[0])
    with pytest.raises(ValueError, match="cannot be exported: __0_0.distcp does not match"):
        export_checkpoint(root / "step_00000040", tmp_path / "model.pt")
    # nothing verifies any more: the run stops naming them, it does not start over
    for step in (20, 30):
        (root / f"step_000000{step}" / "manifest.json").unlink()
    proc = run(data, tmp_path, "--train.max_steps", "50", ok=False)
    assert "holds checkpoints but none is complete and verified" in proc.stderr
    assert "step_00000040: __0_0.distcp does not match its digest" in proc.stderr
    assert (root / "step_00000040").is_dir() and not (root / "step_00000050").exists()


def test_fresh_start_moves_old_checkpoints_aside_and_prunes_only_its_own(data, tmp_path):
    run(data, tmp_path, "--train.max_steps", "30", "--train.seed", "1")  # another run: 10-30
    proc = run(data, tmp_path, "--checkpoint.resume", "never", "--checkpoint.keep", "2")
    root = tmp_path / "checkpoints"
    (aside,) = root.glob("previous-*")
    assert f"were moved to {aside} (nothing deleted)" in proc.stdout
    assert sorted(p.name for p in aside.iterdir()) == [
        "latest", "step_00000010", "step_00000020", "step_00000030",
    ]  # fmt: skip
    # this run kept its own two newest, and latest points at its last one
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000030", "step_00000040"]
    assert (root / "latest").read_text() == "step_00000040"
    from mtl_dist.checkpoint.store import read_manifest, verify_checkpoint

    runs = {read_manifest(p)["run_id"] for p in root.glob("step_*")}
    old = {read_manifest(p)["run_id"] for p in aside.glob("step_*")}
    assert len(runs) == 1 and len(old) == 1 and runs != old
    assert all(verify_checkpoint(p) == "" for p in [*root.glob("step_*"), *aside.glob("step_*")])
    # its step 30 is not the old run's step 30 (a fresh start, seed 0)
    assert metrics(tmp_path)["config"]["train"]["seed"] == 0


def test_a_failing_validation_costs_only_the_validation(data, tmp_path):
    """checkpoint.every 0: the end-of-run checkpoint is written before validating, so a
    validation file that fails (a NaN value read only at validation) loses nothing; fixed, the
    run resumes at its end and only validates."""
    val = tmp_path / "val"
    val.mkdir()
    table = pq.read_table(next((data / "val").glob("*.parquet")))
    dense = table.column("dense_3").to_numpy().copy()
    dense[-1] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("dense_3"), "dense_3",
                                    pa.array(dense)), val / "part-0.parquet")  # fmt: skip
    out = tmp_path / "run"
    bad = run(data, out, "--data.val_path", str(val), "--checkpoint.every", "0", ok=False)
    assert "column 'dense_3'" in bad.stderr
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert not (out / "metrics.json").exists()
    good = run(data, out, "--checkpoint.every", "0")
    assert f"at step {STEPS}" in good.stdout
    assert metrics(out)["steps"] == STEPS and "auc" in metrics(out)["metrics"]["click"]


def test_sigterm_saves_at_an_agreed_step_and_the_resumed_run_ends_alike(data, tmp_path):
    """SIGTERM to torchrun mid-run: every rank stops after the same step, a checkpoint of that
    step is written (none was due), the workers exit 75; the rerun resumes exactly there and
    ends with the uninterrupted run's metrics."""
    # long enough that the signal lands mid-run on a fast machine (120 steps took 2 s)
    steps = ["--train.epochs", "6", "--train.max_steps", "400", "--checkpoint.every", "0"]
    ref = tmp_path / "ref"
    run(data, ref, *steps)
    out = tmp_path / "run"
    job = start(data, out, *steps)
    wait_for(lambda: any((out / "tb" / "rank_0").glob("events.*")), "training to start")
    time.sleep(0.5)
    job.send_signal(signal.SIGTERM)  # to torchrun, as Slurm or a preemption would
    log, _ = job.communicate(timeout=120)
    assert "[preempt] stopped at step" in log, log[-3000:]
    step = int(log.split("[preempt] stopped at step ")[1].split(" ")[0])
    assert 0 < step < 400, step
    assert "exiting with 75 (requeue me)" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    proc = run(data, out, *steps)
    # the signal may land in any epoch (78 steps each): the checkpoint names the one it was in
    per_epoch = int(proc.stdout.split("rank 0/2 reads 20000 rows in ")[1].split(" ")[0])
    epoch = step // per_epoch
    assert (
        f"at step {step}, epoch {epoch}: saved by 2 ranks, continuing each reader exactly"
        in proc.stdout
    )
    assert metrics(out)["metrics"] == metrics(ref)["metrics"]


def test_disk_full_names_the_place_the_need_and_what_is_kept(data, reference, tmp_path):
    """checkpoint.dir on a small tmpfs: one checkpoint fits, the second does not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and these tests run as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    # the same job's checkpoints are all this size
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "step_00000040").iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)],
                   check=True)  # fmt: skip
    try:
        proc = run(
            data,
            tmp_path / "run",
            "--checkpoint.dir",
            str(disk),
            "--train.max_steps",
            "20",
            ok=False,
        )
        out = proc.stdout + proc.stderr
        assert f"disk full while saving checkpoint step_00000020 to {disk}" in out
        assert "a checkpoint needs about" in out and "(the size of step_00000010)" in out
        assert f"kept: {disk / 'step_00000010'}" in out
        assert sorted(p.name for p in disk.iterdir()) == [".owner", "latest", "step_00000010"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
