"""Shared fixtures: generated Parquet data and a torchrun launcher (the way users run the code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# the tests' models are tiny: on a 2-core machine two intra-op threads per process were measured
# 6-20x slower than one (a 4-expert MMoE at batch 256: 1.9 s vs 45 s for 600 steps), so every
# process a test starts (torchrun's workers, export, score) and this one use one thread
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def build_serve_aoti(out: Path) -> Path:
    """Compile ``examples/serve_aoti.cpp`` against the installed libtorch alone; the binary."""
    lib = Path(torch.__file__).parent
    exe = out / "serve_aoti"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", str(ROOT / "examples" / "serve_aoti.cpp"),
         f"-I{lib / 'include'}", f"-I{lib / 'include/torch/csrc/api/include'}", f"-L{lib / 'lib'}",
         "-ltorch", "-ltorch_cpu", "-lc10", "-lz", f"-Wl,-rpath,{lib / 'lib'}", "-o", str(exe)],
        check=True, capture_output=True,
    )  # fmt: skip
    return exe


def torchrun(
    args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N <args>`` from the repo root; output captured.

    A training job without ``--train.precision`` runs in fp32: ``auto`` picks bf16 on a CPU
    with AMX / AVX512-BF16, and the tests' numbers (training's validation equal to
    ``mtl_dist.serve.score``'s fp32 AUC to 1e-6, seeds, tolerances) are those of fp32 on every CPU.
    Reduced precision is tested where it is asked for by name (tests/test_precision.py).
    """
    if "mtl_dist.train" in args and "--train.precision" not in args:
        args = [*args, "--train.precision", "fp32"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
        print(proc.stderr[-5000:], file=sys.stderr)
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.fixture(scope="session")
def small_synth_data(tmp_path_factory) -> Path:
    """A quarter-size dataset (40k training rows) for tests that train a whole epoch twice."""
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("synth_small")
    generate(out, train_rows=40_000, val_rows=10_000, files=4, row_group_size=4096, seed=0,
             task_correlation=0.6)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic funnel dataset (several files and row groups), generated once."""
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(
        out,
        train_rows=160_000,
        val_rows=40_000,
        files=4,
        row_group_size=8192,
        seed=0,
        task_correlation=0.6,
    )
    return out
