"""Two torchrun "nodes" on this machine (1 process each) joined by a c10d rendezvous over
loopback, started with ``launch/multinode.sh``, train to the same numbers as one
``torchrun --standalone --nproc_per_node 2`` run of the same config and seed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import ROOT, torchrun

ARGS = [
    "--config", "configs/default.toml", "--train.max_steps", "30", "--train.batch_size", "256",
    "--train.val_max_batches", "5", "--train.progress_bar", "false", "--train.threads", "1",
    "--model.experts.hidden", "64,32", "--sharding.force", "row_wise",
    "--train.precision", "fp32",  # auto is bf16 on AMX; the numbers compared are fp32's
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_agree_with_one(synth_data, tmp_path):
    data = [
        "--data.train_path",
        str(synth_data / "train"),
        "--data.val_path",
        str(synth_data / "val"),
    ]
    endpoint = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    nodes = [
        subprocess.Popen(
            [
                "bash",
                "launch/multinode.sh",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--endpoint",
                endpoint,
                "--id",
                "mn-test",
                "--nproc",
                "1",
                *ARGS,
                *data,
                "--train.output_dir",
                str(tmp_path / "two"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    one = torchrun(
        ["-m", "mtl_dist.train", *ARGS, *data, "--train.output_dir", str(tmp_path / "one")]
    )
    assert one.returncode == 0
    a = json.loads((tmp_path / "two" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"] == 30
    assert a["plan"] == b["plan"]
    for task, metrics in b["metrics"].items():
        for name, value in metrics.items():
            assert abs(a["metrics"][task][name] - value) <= 1e-6 * max(1.0, abs(value)), (
                task, name, a["metrics"][task][name], value,
            )  # fmt: skip
