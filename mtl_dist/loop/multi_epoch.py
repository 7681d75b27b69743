"""What the loop does between epochs: ``train.multi_epoch``.

* ``none``: nothing; every epoch trains on (the default: a run's numbers as before).
* ``meda``: Multi-Epoch learning with Data Augmentation (Fan et al., "Multi-Epoch Learning with
  Data Augmentation for Deep Click-Through Rate Prediction", 2024). Zhang et al. ("Towards
  Understanding the Overfitting Phenomenon of Deep Click-Through Rate Prediction Models", CIKM
  2022) trace the one-epoch phenomenon to the MLP fitting the embeddings it has seen; MEDA
  re-initialises the embedding layer at the start of every epoch after the first, so each
  epoch shows the dense part the same rows through embeddings it has never fitted (an
  augmentation), and keeps the dense part. Here: every table (shared, STEM's per-task,
  managed-collision), every shard of it on every rank, drawn from its build-time
  distribution with a stream of ``(train.seed, epoch)``
  (:func:`~mtl_dist.distributed.table_init.reinit_tables`), and the tables' optimizer state
  zeroed (:func:`~mtl_dist.distributed.table_init.reset_optimizer_state`); the dense layers and
  the dense optimizer (Adam's moments, its step count) are kept.

Resume: the epoch whose re-initialisation has run is part of the loop's state
(``LoopState.reinit_epoch``, saved in every checkpoint): a run resumed in the middle of epoch
``e`` does not draw again (its tables are the checkpoint's), one resumed at an epoch's end
draws for the next epoch exactly as the uninterrupted run did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtl_dist.config import JobConfig
from mtl_dist.distributed.table_init import reinit_tables, reset_optimizer_state
from mtl_dist.loop.optim import dense_optimizer
from mtl_dist.loop.state import LoopState


def begin_epoch(
    cfg: JobConfig, model: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
    epoch: int, log: Callable[..., None] = lambda *a, **k: None,
) -> bool:  # fmt: skip
    """Before epoch ``epoch`` (0-based) trains: apply ``train.multi_epoch``. ``model``: the
    DMP-wrapped model; ``optimizer``: :func:`~mtl_dist.loop.optim.build_optimizer`'s combined
    optimizer. Every rank calls it at the same epoch (no collective). Returns whether the
    tables were re-initialised."""
    if cfg.train.multi_epoch == "none" or epoch < 1 or state.reinit_epoch >= epoch:
        return False
    tables = reinit_tables(model, cfg.train.seed, epoch)
    fused = dict(optimizer.optimizers)["embedding"]
    reset_optimizer_state(model, fused, dense_optimizer(optimizer))
    state.reinit_epoch = epoch
    log(f"[multi_epoch] meda: epoch {epoch + 1}: {len(tables)} tables re-initialised, "
        "their optimizer state zeroed; the dense part kept")  # fmt: skip
    return True
