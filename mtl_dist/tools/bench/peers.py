"""Peer baselines: torch-rechub's and DeepCTR-Torch's MMoE trained through their own APIs
(built in :mod:`mtl_dist.tools.bench.peer_models`).

``python -m mtl_dist.tools.bench.peers --system {torch_rechub,deepctr_torch} --data DIR`` reads a
``--workload peers`` dataset (``mtl_dist.data.synth``) with pyarrow, builds the peer's MMoE with the
shared benchmark shape (16-dim embeddings for every sparse feature, the dense features as dense
inputs, 4 experts (256, 128), towers (64,), click and purchase, Adam), trains it with the
toolkit's own trainer, predicts the val split and prints one JSON line (also ``--json OUT``):
speed of the training call alone, peak RSS, and test AUC per task next to the oracle's.

Each system runs in its own process (:func:`run_peer`) so peak RSS and thread settings are its
own. Needs the ``bench`` extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_dist.files import read_json
from mtl_dist.tools.bench.peer_models import (
    BUILDERS,
    PEERS,
    TASKS,
    MissingPeer,
    PeerModel,
    Split,
)


def peers_installed() -> dict[str, bool]:
    """Which peer toolkits can be imported here."""
    return {p: importlib.util.find_spec(p) is not None for p in PEERS}


# --------------------------------------------------------------------------- data


def load_split(
    data_dir: Path, meta: dict[str, Any], split: str, files: Sequence[str] = ()
) -> Split:
    """One split (or ``files`` of it, relative to ``data_dir``) as ``({column: 1-d array},
    labels [N, len(TASKS)] float32)``.

    Sparse ids stay int64 and dense features float32, as both peers' examples feed them.
    """
    sparse = [f["name"] for f in meta["columns"]["sparse"]]
    dense = list(meta["columns"]["dense"])
    files = [data_dir / f for f in (files or meta["splits"][split]["files"])]
    table = pa.concat_tables(pq.read_table(f, columns=[*sparse, *dense, *TASKS]) for f in files)
    x = {c: table.column(c).to_numpy() for c in (*sparse, *dense)}
    y = np.stack([table.column(t).to_numpy().astype(np.float32) for t in TASKS], axis=1)
    return x, y


# --------------------------------------------------------------------------- entry points


def finite_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's ROC AUC; NaN when the scores are not all finite (a diverged model)."""
    from sklearn.metrics import roc_auc_score

    if not np.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(labels, scores))


def train_to_best(
    model: PeerModel, val: Split, test: Split, max_epochs: int, patience: int
) -> tuple[float, list[dict[str, Any]], int]:
    """Epochs until the first task's validation AUC has not improved for ``patience`` epochs
    (or ``max_epochs``): ``(training seconds, per epoch {epoch, val_auc, test_auc}, the best
    epoch)``. Each epoch's predictions are outside the timed training."""
    train_s, history, best, best_epoch, since = 0.0, [], -math.inf, 0, 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        model.fit_epoch()
        train_s += time.perf_counter() - t0
        aucs = {}
        for name, (x, y) in (("val_auc", val), ("test_auc", test)):
            preds = model.predict(x)
            aucs[name] = {t: finite_auc(y[:, i], preds[:, i]) for i, t in enumerate(TASKS)}
        history.append({"epoch": epoch, **aucs})
        if aucs["val_auc"][TASKS[0]] > best:  # a NaN (diverged) never improves
            best, best_epoch, since = aucs["val_auc"][TASKS[0]], epoch, 0
        else:
            since += 1
        if since >= patience:
            break
    return train_s, history, best_epoch


def bench(a: argparse.Namespace) -> dict[str, Any]:
    """Load, train and evaluate one peer in this process; return the result record.

    ``a.patience == 0``: ``a.epochs`` epochs, AUC on the val split. Else the early-stopping
    rule of :func:`train_to_best` on ``a.val_files`` with ``a.test_files`` held out: ``auc`` is
    the best epoch's test AUC, ``first_epoch_auc`` the first's, ``history`` every epoch's."""
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    data = Path(a.data)
    meta = read_json(data / "meta.json", "dataset description", "mtl-datagen --workload peers")
    if meta["columns"].get("multi_hot") or "purchase" not in meta["columns"]["labels"]:
        raise ValueError(f"{data} is not a peers dataset (make it with --workload peers)")
    t0 = time.perf_counter()
    files = [f for f in a.val_files.split(",") if f]
    train, val = load_split(data, meta, "train"), load_split(data, meta, "val", files)
    test = load_split(data, meta, "val", [f for f in a.test_files.split(",") if f])
    load_s = time.perf_counter() - t0
    rows = len(train[1])
    record: dict[str, Any] = {"system": a.system, "rows": rows, "threads": a.threads,
                              "batch": a.batch, "val_rows": len(val[1]), "torch": torch.__version__}  # fmt: skip
    # the peers print progress to stdout; keep it for the JSON line alone
    with contextlib.redirect_stdout(sys.stderr):
        model = BUILDERS[a.system](meta, train, val, a)
        if a.patience:
            train_s, history, best = train_to_best(model, val, test, a.epochs, a.patience)
            epochs = len(history)
            record |= {"history": history, "best_epoch": best, "test_rows": len(test[1]),
                       "auc": history[best - 1]["test_auc"] if best else None,
                       "first_epoch_auc": history[0]["test_auc"]}  # fmt: skip
        else:
            t0 = time.perf_counter()
            for _ in range(a.epochs):
                model.fit_epoch()
            train_s, epochs = time.perf_counter() - t0, a.epochs
            preds = model.predict(val[0])
            record["auc"] = {t: finite_auc(val[1][:, i], preds[:, i]) for i, t in enumerate(TASKS)}
            record["oracle_auc"] = {t: meta["splits"]["val"]["oracle"][f"{t}_auc"] for t in TASKS}
    return record | {
        "version": model.version,
        "samples_per_s": rows * epochs / train_s,
        "train_s": train_s,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "epochs": epochs,
    }


def run_peer(
    system: str,
    data_dir: str,
    batch: int,
    epochs: int,
    threads: int,
    seed: int,
    timeout: float | None = None,
    early_stop: tuple[int, Sequence[str], Sequence[str]] | None = None,
) -> dict:
    """Run this module for ``system`` in a fresh process and return its JSON record.

    ``early_stop = (patience, val files, test files)``: up to ``epochs`` epochs under
    :func:`train_to_best`'s rule (see :func:`bench`).

    The child gets ``OMP_NUM_THREADS=threads`` and this checkout's package on PYTHONPATH;
    RuntimeError with the tail of its stderr when it fails or runs past ``timeout`` seconds.
    """
    if system not in PEERS:
        raise ValueError(f"system must be one of {PEERS}, got {system!r}")
    root = str(Path(__file__).resolve().parents[3])  # the repository root
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": root if not path else root + os.pathsep + path,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "mtl_dist.tools.bench.peers",
            *("--system", system, "--data", str(data_dir), "--batch", str(batch)),
            *("--epochs", str(epochs), "--threads", str(threads), "--seed", str(seed)),
            *("--json", str(out)),
        ]
        if early_stop:
            patience, val_files, test_files = early_stop
            cmd += ["--patience", str(patience), "--val-files", ",".join(val_files),
                    "--test-files", ",".join(test_files)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            tail = f":\n{err[-3000:]}" if err else " (no stderr yet)"
            raise RuntimeError(f"{system} peer benchmark timed out after {timeout}s{tail}") from e
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{system} peer benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return read_json(out, f"{system} peer result", "mtl_dist.bench.peers")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: one peer, one JSON line on stdout (and in ``--json``)."""
    ap = argparse.ArgumentParser(
        prog="python -m mtl_dist.tools.bench.peers", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--system", required=True, choices=PEERS)
    ap.add_argument("--data", required=True, help="a --workload peers dataset directory")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument(
        "--patience", type=int, default=0,
        help="early stopping: up to --epochs epochs, stop after this many without a better "
        "first-task validation AUC (0: train --epochs epochs, report the val split's AUC)",
    )  # fmt: skip
    ap.add_argument("--val-files", default="", help="validation files (default: the val split)")
    ap.add_argument("--test-files", default="", help="with --patience: the held-out test files")
    ap.add_argument("--json", default=None, help="also write the record here")
    a = ap.parse_args(argv)
    if a.patience and not a.test_files:
        ap.error("--patience needs --test-files (the split the reported AUC is measured on)")
    try:
        result = bench(a)
    except MissingPeer as e:  # say which package is missing and how to install it
        sys.exit(f"error: {e}")
    line = json.dumps(result)
    if a.json:
        Path(a.json).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
