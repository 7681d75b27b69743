"""Checkpoints and the run directory: one run's checkpoints as one object — when a save is
due, saving, loading (:class:`~mtl_dist.checkpoint.checkpointer.Checkpointer`); DCP checkpoints
with per-file digests, verified before they load (:mod:`~mtl_dist.checkpoint.store`); and the
run directory a job owns — its lock, what to resume from, a finished run staying finished
(:mod:`~mtl_dist.checkpoint.rundir`).

May import: config, files, distributed, data, models, balancing, loop (never observe, serve,
train or tools).
"""

from mtl_dist.checkpoint.checkpointer import Checkpointer, RunStart, States
from mtl_dist.checkpoint.store import (  # (the module's API at its old path, for one release)
    latest_target,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "Checkpointer", "RunStart", "States", "latest_target", "list_checkpoints", "load_checkpoint", "resolve_checkpoint",
    "save_checkpoint", "verify_checkpoint",
]  # fmt: skip
