"""Training submitted with ``mtl-submit`` to a real (single-node) Slurm: a 2-process CPU job, a
2-element job array, and a requeue on SIGTERM."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT

SMALL = [
    "--train.batch_size", "256", "--train.log_every", "10", "--train.val_max_batches", "5",
    "--model.experts.hidden", "64,32", "--sharding.force", "row_wise", "--train.precision", "fp32",
]  # fmt: skip


def submit(
    slurm, synth_data, out: Path, *flags: str, steps: int = 30, train: tuple[str, ...] = ()
) -> str:
    """``python -m mtl_dist.tools.submit ...`` (sbatch from the test's Slurm); returns the job id."""
    cmd = [
        sys.executable, "-m", "mtl_dist.tools.submit", "--config", "configs/default.toml",
        "--output-dir", str(out), "--workdir", str(ROOT), "--nproc-per-node", "2", *flags, "--",
        "--data.train_path", str(synth_data / "train"), "--data.val_path", str(synth_data / "val"),
        "--train.max_steps", str(steps), *SMALL, *train,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def check_run(run_dir: Path, steps: int) -> dict:
    """metrics.json with finite metrics, and readable TensorBoard scalars."""
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["steps"] == steps and result["world_size"] == 2
    for task, metrics in result["metrics"].items():
        for name, value in metrics.items():
            assert math.isfinite(value), (task, name, value)
    acc = EventAccumulator(str(run_dir / "tb" / "rank_0"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")][-1] == steps
    return result


def test_two_process_job_completes_with_hostile_name_and_path(slurm, synth_data, tmp_path):
    """The job name and output path carry spaces and ``;$()``: quoted, they are data, not code."""
    marker = Path(f"/tmp/mtl_pwned_{uuid.uuid4().hex}")
    name = f"mtl $(touch {marker}); `touch {marker}`"
    out = tmp_path / "out dir;$(touch x)"
    job = submit(slurm, synth_data, out, "--job-name", name, "--cpus-per-node", "2")
    (info,) = slurm.wait(job, timeout=240)
    roots = list(out.iterdir())
    assert len(roots) == 1, roots
    log = next((roots[0] / "logs").glob("*.out")).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    raw = slurm.run(["scontrol", "show", "job", "-o", job]).stdout
    assert f"JobName={name} UserId=" in raw, raw  # the name reached Slurm intact, as one value
    assert not marker.exists(), "a job name was executed as shell code"
    assert "rendezvous" in log and "training exited with 0" in log
    check_run(roots[0], 30)


def test_job_array_two_seeds(slurm, synth_data, tmp_path):
    job = submit(
        slurm, synth_data, tmp_path, "--job-name", "sweep", "--cpus-per-node", "1",
        "--sweep", "train.seed=0,1",
    )  # fmt: skip
    elements = slurm.wait(job, timeout=300, count=2)
    assert len(elements) == 2
    for el in elements:
        assert el["JobState"] == "COMPLETED" and el["ExitCode"] == "0:0", el
    sweep = tmp_path / "sweep"
    results = [check_run(sweep / f"seed-{s}", 30) for s in (0, 1)]
    assert [r["config"]["train"]["seed"] for r in results] == [0, 1]
    assert results[0]["metrics"] != results[1]["metrics"]
    assert len(list((sweep / "logs").glob("sweep-*_*.out"))) == 2


def test_sigterm_requeues_into_the_same_run_dir(slurm, synth_data, tmp_path):
    """SIGTERM to the batch shell (as ``--signal=B:TERM@secs`` sends before the time limit) runs
    the trap: it passes SIGTERM on to training, which saves a checkpoint at a step all ranks
    agree on and exits 75, then ``scontrol requeue``; the job reruns with the same id and run
    dir, resumes from exactly that step, and completes."""
    job = submit(
        slurm, synth_data, tmp_path, "--job-name", "pre", "--cpus-per-node", "2",
        steps=60, train=("--checkpoint.every", "10"),
    )  # fmt: skip
    latest = tmp_path / "pre" / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.exists():  # preempted after its first checkpoint
        assert time.time() < deadline, slurm.jobs(job)
        time.sleep(0.5)
    slurm.run(["scancel", "--batch", "--signal=TERM", job])
    # Slurm holds a requeued job back (Reason=BeginTime, ~2 min): release it once it is pending
    # — but not within the second of the requeue: slurmd refuses a credential issued no later
    # than the second it revoked the old one ("Job credential revoked": the job fails)
    deadline, pending_since = time.time() + 90, None
    while True:
        info = slurm.jobs(job)[0]
        if info.get("Restarts") == "1" and info["JobState"] in ("RUNNING", "COMPLETED", "FAILED"):
            break  # running again (or done)
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 2.0:
                slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        assert time.time() < deadline, info
        time.sleep(0.5)
    (info,) = slurm.wait(job, timeout=240)
    log = (tmp_path / "pre" / "logs" / f"pre-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    # the trap passed SIGTERM on: training saved at a step every rank agreed on, exited 75,
    # then the job was requeued and resumed exactly at that step
    assert "SIGTERM: asking training to save and stop" in log
    step = int(log.split("[preempt] stopped at step ")[1].split(" ")[0])
    assert f"[checkpoint] step {step}:" in log and "exiting with 75 (requeue me)" in log
    assert f"requeueing job {job}" in log
    assert f"job {job} restart 0" in log and f"job {job} restart 1" in log
    assert f"step_{step:08d} at step {step}, epoch 0" in log
    assert "continuing each reader exactly" in log
    check_run(tmp_path / "pre", 60)
