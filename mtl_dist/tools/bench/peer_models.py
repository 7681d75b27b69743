"""The peers' MMoE, each built through its own toolkit's API at the benchmark's shape (16-dim
embeddings for every sparse feature, the dense features as dense inputs, 4 experts (256, 128),
towers (64,), click and purchase, Adam) and trained by its own trainer one epoch at a time
(:class:`PeerModel`); :mod:`mtl_dist.tools.bench.peers` runs them."""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

PEERS = ("torch_rechub", "deepctr_torch")
TASKS = ("click", "purchase")
DISTRIBUTIONS = {"torch_rechub": "torch-rechub", "deepctr_torch": "deepctr-torch"}
EMBED_DIM = 16
NUM_EXPERTS = 4
EXPERT_DIMS = (256, 128)
TOWER_DIMS = (64,)
Split = tuple[dict[str, np.ndarray], np.ndarray]  # ({column: values}, labels [N, tasks])


def _head(x: dict[str, np.ndarray], y: np.ndarray, n: int) -> Split:
    return {k: v[:n] for k, v in x.items()}, y[:n]


class MissingPeer(RuntimeError):
    """A peer toolkit (or one of its imports) is not installed."""


def _missing(system: str, err: ImportError) -> MissingPeer:
    return MissingPeer(
        f"{system}: cannot import {err.name or DISTRIBUTIONS[system]!r} ({err}); the peer "
        f"baselines need the bench extra (torch-rechub, deepctr-torch, pandas, scikit-learn): "
        f"pip install -e .[bench]"
    )


# --------------------------------------------------------------------------- peers


@dataclass
class PeerModel:
    """A built peer: ``fit_epoch()`` trains one more epoch over the training rows (the
    toolkit's own trainer, continuing its optimizer), ``predict(x)`` gives ``[N, tasks]``
    probabilities."""

    fit_epoch: Callable[[], None]
    predict: Callable[[dict[str, np.ndarray]], np.ndarray]
    version: str


def _torch_rechub(
    meta: dict[str, Any], train: Split, val: Split, a: argparse.Namespace
) -> PeerModel:
    """torch-rechub: ``MMOE`` + ``MTLTrainer.fit`` on its ``DataGenerator`` loaders, one epoch
    per ``fit`` call (``n_epoch = 1``; the same trainer, so its optimizer carries on).

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
            n_epoch=1,
            earlystop_patience=10
            ** 9,  # its stopper lives across fit calls: never stop, never reload
            device="cpu",
            model_path=model_path,
        )

    def fit_epoch() -> None:
        with tempfile.TemporaryDirectory() as model_path:
            trainer.model_path = model_path
            trainer.fit(train_dl, val_dl)

    def predict(x: dict[str, np.ndarray]) -> np.ndarray:
        dl = DataLoader(PredictDataset(x), batch_size=a.batch, shuffle=False)
        return np.asarray(trainer.predict(trainer.model, dl), dtype=np.float64)

    return PeerModel(fit_epoch, predict, importlib.metadata.version("torch-rechub"))


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


def _deepctr_torch(
    meta: dict[str, Any], train: Split, val: Split, a: argparse.Namespace
) -> PeerModel:
    """DeepCTR-Torch: ``MMOE`` + ``compile`` + ``fit`` (no validation data, so none runs), one
    epoch per ``fit`` call (the same compiled model and optimizer).

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
    x_train, y_train = train
    return PeerModel(
        lambda: model.fit(x_train, y_train, batch_size=a.batch, epochs=1, verbose=2, shuffle=True),
        lambda x: np.asarray(model.predict(x, batch_size=a.batch), dtype=np.float64),
        importlib.metadata.version("deepctr-torch"),
    )


BUILDERS = {"torch_rechub": _torch_rechub, "deepctr_torch": _deepctr_torch}
