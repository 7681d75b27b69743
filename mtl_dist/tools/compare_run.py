"""Running a comparison's runs: each a ``torchrun`` subprocess of :mod:`mtl_dist.train` with its
output in ``train.log``, a finished run with the same config reused."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from mtl_dist.files import read_json
from mtl_dist.tools.compare_plan import CompareError, Run
from mtl_dist.tools.compare_summary import is_number


def _error_line(log: str) -> str:
    """The last ``SomeError: message`` line of a run's output (torchrun's own excluded)."""
    found = re.findall(r"\b(\w*(?:Error|Exception): .+)", log)
    found = [f for f in found if not f.startswith("ChildFailedError")]
    return found[-1].strip() if found else "(no exception message in the log)"


def execute(run: Run, nproc: int, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Train ``run`` under ``torchrun --nproc_per_node nproc``, its output in
    ``<run dir>/train.log``; returns its ``metrics.json`` and whether a finished run with the
    same config was reused instead (unless ``force``)."""
    metrics_path = run.dir / "metrics.json"
    if not force and metrics_path.exists():
        try:
            old = json.loads(metrics_path.read_text())
        except ValueError:
            old = {}
        if old.get("config") == run.config:
            return old, True
    metrics_path.unlink(missing_ok=True)
    shutil.rmtree(run.dir / "tb", ignore_errors=True)  # no stale events beside the new ones
    run.dir.mkdir(parents=True, exist_ok=True)
    log = run.dir / "train.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "mtl_dist.train", *run.argv,
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not metrics_path.exists():
        raise CompareError(
            f"run {run.name} failed (exit code {proc.returncode}): "
            f"{_error_line(log.read_text(errors='replace'))}\n  full log: {log}"
        )
    return read_json(metrics_path, "run's metrics", "mtl_dist.train"), False


def execute_all(runs: list[Run], nproc: int, force: bool = False) -> dict[str, list[dict]]:
    """Run (or reuse) every run in order; ``{head: [metrics.json per seed]}``."""
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for i, run in enumerate(runs, 1):
        t = time.perf_counter()
        result, reused = execute(run, nproc, force)
        how = "reused" if reused else f"trained in {time.perf_counter() - t:.0f}s"
        kinds = {t["name"]: t["kind"] for t in result["config"]["tasks"]}
        main = "  ".join(
            f"{task} {k} " + (f"{m[k]:.4f}" if is_number(m.get(k)) else "n/a")
            for task, m in result["metrics"].items()
            for k in ["auc" if kinds.get(task) == "binary" else "mse"]
        )
        print(f"[{i}/{len(runs)}] {run.name}: {how}, {result['steps']} steps; {main}", flush=True)
        results.setdefault(run.head, []).append(result)
    print(f"[compare] {len(runs)} runs in {time.perf_counter() - t_all:.0f}s", flush=True)
    return results
