"""The sbatch script ``mtl-submit --dry-run`` renders: multi-node GPU text, sweeps, quoting."""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mtl_dist.tools.submit import SubmitSpec, expand_sweep, render
from tests.conftest import ROOT


def dry_run(*args: str) -> str:
    cmd = [sys.executable, "-m", "mtl_dist.tools.submit", "--dry-run", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def srun_line(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    return shlex.split(line.removesuffix(" &"))


def test_multinode_gpu_script():
    script = dry_run(
        "--config", "configs/default.toml", "--nodes", "4", "--gpus-per-node", "8",
        "--cpus-per-node", "64", "--time", "04:00:00", "--partition", "gpu", "--account", "rec",
        "--qos", "high", "--job-name", "mmoe-big", "--output-dir", "/scratch/runs",
        "--setup", "source /opt/venv/bin/activate", "--python", "python", "--ifname", "ib0",
        "--", "--train.batch_size", "4096",
    )  # fmt: skip
    head = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for expected in [
        "#SBATCH --job-name=mmoe-big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=64", "#SBATCH --time=04:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=rec", "#SBATCH --qos=high",
        "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120", "#SBATCH --open-mode=append",
        "#SBATCH --output=/scratch/runs/mmoe-big/logs/mmoe-big-%j.out",
    ]:  # fmt: skip
        assert expected in head, (expected, head)
    assert not any("--array" in ln for ln in head)
    assert "source /opt/venv/bin/activate" in script
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0" in script
    assert "trap on_term TERM" in script and 'scancel --signal=TERM "${SLURM_JOB_ID}.0"' in script
    assert 'if [ "$PREEMPTED" = 1 ] || [ "$RC" = 75 ]; then' in script
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in script
    args = srun_line(script)
    assert args[:7] == [
        "srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64",
        "--kill-on-bad-exit=1", "python",
    ]  # fmt: skip
    for expected in [
        "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=${MASTER_ADDR}:${MASTER_PORT}", "--rdzv_id=${SLURM_JOB_ID}",
        "mtl_dist.train", "${RUN_ARGS[@]}", "$RUN_DIR", "--train.batch_size", "4096",
    ]:  # fmt: skip
        assert expected in args, (expected, args)
    assert "RUN_DIR=/scratch/runs/mmoe-big" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sweep_is_one_job_array_with_a_run_dir_per_element():
    elements = expand_sweep("configs/default.toml", ["model.head=mmoe,ple", "train.seed=0,1"])
    assert [e.name for e in elements] == [
        "head-mmoe_seed-0", "head-mmoe_seed-1", "head-ple_seed-0", "head-ple_seed-1",
    ]  # fmt: skip
    assert elements[2].overrides == ["--model.head", "ple", "--train.seed", "0"]
    configs = expand_sweep("a.toml", ["config=configs/x.toml,configs/y.toml"])
    assert [(e.name, e.config) for e in configs] == [
        ("config-x", "configs/x.toml"), ("config-y", "configs/y.toml"),
    ]  # fmt: skip
    script = render(
        SubmitSpec(config="c.toml", job_name="sw", output_dir="/r", sweep=["model.head=mmoe,ple"])
    )
    assert "#SBATCH --array=0-1" in script
    assert "#SBATCH --output=/r/sw/logs/sw-%A_%a.out" in script
    assert "1) RUN_NAME=head-ple; RUN_ARGS=(--config c.toml --model.head ple) ;;" in script
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        expand_sweep("c.toml", ["model.head"])


def test_hostile_values_are_data_not_code(tmp_path):
    """A job name / path / override with spaces, ``;``, ``$()`` and backticks stays one argument:
    the script parses (bash -n), and running its argument-building part creates no file."""
    name = f"pwned_{uuid.uuid4().hex[:8]}"  # created in the script's cwd (tmp_path) if run
    marker = tmp_path / name
    evil = f"a b; touch {name}; $(touch {name}) `touch {name}`"
    spec = SubmitSpec(
        config=f"conf {evil}.toml", job_name=evil, output_dir=str(tmp_path / evil),
        workdir=str(tmp_path), python="python", train_args=["--data.train_path", evil],
        sweep=[f"train.tag=x;touch {name}"],
    )  # fmt: skip
    script = render(spec)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert f'#SBATCH --job-name="{evil}"' in script
    # the script up to srun (cd, case, RUN_DIR, mkdir), then print the srun argv instead of
    # running it: no marker file, and every hostile value arrives as exactly one argument
    body = script.split("# rendezvous")[0].replace("set -euo pipefail", "set -eu")
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    probe = body + 'printf "%s\\n" ' + srun.removesuffix(" &") + "\n"
    env = {"PATH": "/usr/bin:/bin", "MASTER_ADDR": "h", "MASTER_PORT": "1", "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert not marker.exists()
    assert f"conf {evil}.toml" in out and evil in out and f"x;touch {name}" in out
    run_dir = out[out.index("--train.output_dir") + 1]
    assert Path(run_dir).is_dir() and run_dir.startswith(str(tmp_path / evil))
    for bad in ("x\nrm -rf /", 'say "hi"'):
        with pytest.raises(ValueError, match="line breaks and double quotes"):
            render(SubmitSpec(config="c.toml", job_name=bad))
