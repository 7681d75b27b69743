"""Peer baselines: torch-rechub's and DeepCTR-Torch's MMoE trained through their own APIs.

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
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_dist.files import read_json

PEERS = ("torch_rechub", "deepctr_torch")
DISTRIBUTIONS = {"torch_rechub": "torch-rechub", "deepctr_torch": "deepctr-torch"}
TASKS = ("click", "purchase")
EMBED_DIM = 16
NUM_EXPERTS = 4
EXPERT_DIMS = (256, 128)
TOWER_DIMS = (64,)
Split = tuple[dict[str, np.ndarray], np.ndarray]  # ({column: values}, labels [N, tasks])


def peers_installed() -> dict[str, bool]:
    """Which peer toolkits can be imported here."""
    return {p: importlib.util.find_spec(p) is not None for p in PEERS}


class MissingPeer(RuntimeError):
    """A peer toolkit (or one of its imports) is not installed."""


def _missing(system: str, err: ImportError) -> MissingPeer:
    return MissingPeer(
        f"{system}: cannot import {err.name or DISTRIBUTIONS[system]!r} ({err}); the peer "
        f"baselines need the bench extra (torch-rechub, deepctr-torch, pandas, scikit-learn): "
        f"pip install -e .[bench]"
    )


# --------------------------------------------------------------------------- data


def load_split(data_dir: Path, meta: dict[str, Any], split: str) -> Split:
    """One split as ``({column: 1-d array}, labels [N, len(TASKS)] float32)``.

    Sparse ids stay int64 and dense features float32, as both peers' examples feed them.
    """
    sparse = [f["name"] for f in meta["columns"]["sparse"]]
    dense = list(meta["columns"]["dense"])
    files = [data_dir / f for f in meta["splits"][split]["files"]]
    table = pa.concat_tables(pq.read_table(f, columns=[*sparse, *dense, *TASKS]) for f in files)
    x = {c: table.column(c).to_numpy() for c in (*sparse, *dense)}
    y = np.stack([table.column(t).to_numpy().astype(np.float32) for t in TASKS], axis=1)
    return x, y


def _head(x: dict[str, np.ndarray], y: np.ndarray, n: int) -> Split:
    return {k: v[:n] for k, v in x.items()}, y[:n]


# --------------------------------------------------------------------------- peers


def _train_torch_rechub(
    meta: dict[str, Any], train: Split, val: Split, a: argparse.Namespace
) -> tuple[float, np.ndarray, str]:
    """torch-rechub: ``MMOE`` + ``MTLTrainer.fit`` on its ``DataGenerator`` loaders.

    ``MTLTrainer.fit`` always evaluates each epoch and saves the weights; it gets one val batch
    (not the val split) and a temporary model_path, so the timed ``fit`` is the training epochs
    plus a one-batch evaluation, an early-stopper state_dict copy and one ``torch.save`` per run
    (well under 1% of it). Its MLPs always carry BatchNorm; the gates are linear + softmax.
    """
    try:
        import torch
        from torch.utils.data import DataLoader
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer
        from torch_rechub.utils.data import DataGenerator, PredictDataset
    except ImportError as e:
        raise _missing("torch_rechub", e) from e

    features = [
        SparseFeature(f["name"], vocab_size=f["vocab"], embed_dim=EMBED_DIM)
        for f in meta["columns"]["sparse"]
    ] + [DenseFeature(n) for n in meta["columns"]["dense"]]
    task_types = ["classification"] * len(TASKS)
    model = MMOE(
        features,
        task_types,
        n_expert=NUM_EXPERTS,
        expert_params={"dims": list(EXPERT_DIMS)},
        tower_params_list=[{"dims": list(TOWER_DIMS)} for _ in TASKS],
    )
    (x_train, y_train), (x_val, y_val) = train, val
    x_head, y_head = _head(x_val, y_val, a.batch)
    train_dl, val_dl, _ = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_head, y_val=y_head, x_test=x_head, y_test=y_head, batch_size=a.batch
    )
    with tempfile.TemporaryDirectory() as model_path:
        trainer = MTLTrainer(
            model,
            task_types,
            optimizer_fn=torch.optim.Adam,
            # its default optimizer_params are {"lr": 1e-3, "weight_decay": 1e-5}; keep the decay
            optimizer_params={"lr": a.lr, "weight_decay": 1e-5},
            n_epoch=a.epochs,
            earlystop_patience=a.epochs + 1,  # never stops early nor reloads "best" weights
            device="cpu",
            model_path=model_path,
        )
        t0 = time.perf_counter()
        trainer.fit(train_dl, val_dl)
        train_s = time.perf_counter() - t0
    pred_dl = DataLoader(PredictDataset(x_val), batch_size=a.batch, shuffle=False)
    preds = np.asarray(trainer.predict(trainer.model, pred_dl), dtype=np.float64)
    return train_s, preds, importlib.metadata.version("torch-rechub")


def _import_deepctr_torch() -> Any:
    """Import deepctr_torch without its import-time PyPI version check.

    Its ``__init__`` starts a non-daemon thread calling ``requests.get`` on PyPI with no
    timeout: it prints to stdout when offline and can hold the process open while the request
    hangs. Here that one URL answers "not OK" at once, so the check returns silently.
    """
    import requests

    real_get = requests.get

    def get(url: str, *args: Any, **kwargs: Any) -> Any:
        if "pypi.python.org/pypi/deepctr-torch" in str(url):
            return SimpleNamespace(status_code=0, text="")
        return real_get(url, *args, **kwargs)

    requests.get = get
    import deepctr_torch

    return deepctr_torch


def _train_deepctr_torch(
    meta: dict[str, Any], train: Split, val: Split, a: argparse.Namespace
) -> tuple[float, np.ndarray, str]:
    """DeepCTR-Torch: ``MMOE`` + ``compile`` + ``fit`` (no validation data, so none runs).

    The timed ``fit`` includes its own input preparation: it concatenates all columns into one
    float64 matrix and wraps it in a TensorDataset (well under 1% of it). Its defaults stay:
    L2 1e-5 on the embedding tables (a full-table term every step), no BatchNorm; the gates are
    set linear (``gate_dnn_hidden_units=()``) like torch-rechub's and the MMoE paper's.
    """
    try:
        import torch

        _import_deepctr_torch()
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import MMOE
    except ImportError as e:
        raise _missing("deepctr_torch", e) from e

    columns = [
        SparseFeat(f["name"], vocabulary_size=f["vocab"], embedding_dim=EMBED_DIM)
        for f in meta["columns"]["sparse"]
    ] + [DenseFeat(n, 1) for n in meta["columns"]["dense"]]
    model = MMOE(
        columns,
        num_experts=NUM_EXPERTS,
        expert_dnn_hidden_units=EXPERT_DIMS,
        gate_dnn_hidden_units=(),
        tower_dnn_hidden_units=TOWER_DIMS,
        task_types=tuple("binary" for _ in TASKS),
        task_names=TASKS,
        seed=a.seed,
        device="cpu",
    )
    # the same as compile("adam", ...) (torch Adam at its default 1e-3), but honours --lr
    model.compile(
        torch.optim.Adam(model.parameters(), lr=a.lr),
        loss=["binary_crossentropy"] * len(TASKS),
    )
    (x_train, y_train), (x_val, _) = train, val
    t0 = time.perf_counter()
    model.fit(x_train, y_train, batch_size=a.batch, epochs=a.epochs, verbose=2, shuffle=True)
    train_s = time.perf_counter() - t0
    preds = model.predict(x_val, batch_size=a.batch)
    return train_s, preds, importlib.metadata.version("deepctr-torch")


TRAINERS = {"torch_rechub": _train_torch_rechub, "deepctr_torch": _train_deepctr_torch}


# --------------------------------------------------------------------------- entry points


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's ROC AUC; NaN when the scores are not all finite (a diverged model)."""
    from sklearn.metrics import roc_auc_score

    if not np.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(labels, scores))


def bench(a: argparse.Namespace) -> dict[str, Any]:
    """Load, train and evaluate one peer in this process; return the result record."""
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    data = Path(a.data)
    meta = read_json(data / "meta.json", "dataset description", "mtl-datagen --workload peers")
    if meta["columns"].get("multi_hot") or "purchase" not in meta["columns"]["labels"]:
        raise ValueError(f"{data} is not a peers dataset (make it with --workload peers)")
    t0 = time.perf_counter()
    train, val = load_split(data, meta, "train"), load_split(data, meta, "val")
    load_s = time.perf_counter() - t0
    rows = len(train[1])
    # the peers print progress to stdout; keep it for the JSON line alone
    with contextlib.redirect_stdout(sys.stderr):
        train_s, preds, version = TRAINERS[a.system](meta, train, val, a)
    y_val = val[1]
    oracle = meta["splits"]["val"]["oracle"]
    return {
        "system": a.system,
        "version": version,
        "rows": rows,
        "samples_per_s": rows * a.epochs / train_s,
        "train_s": train_s,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": a.threads,
        "batch": a.batch,
        "epochs": a.epochs,
        "val_rows": len(y_val),
        "auc": {t: _auc(y_val[:, i], preds[:, i]) for i, t in enumerate(TASKS)},
        "oracle_auc": {t: oracle[f"{t}_auc"] for t in TASKS},
        "torch": torch.__version__,
    }


def run_peer(
    system: str,
    data_dir: str,
    batch: int,
    epochs: int,
    threads: int,
    seed: int,
    timeout: float | None = None,
) -> dict:
    """Run this module for ``system`` in a fresh process and return its JSON record.

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
    ap.add_argument("--json", default=None, help="also write the record here")
    a = ap.parse_args(argv)
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
