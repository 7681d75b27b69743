"""What the training loop carries from step to step, and a checkpoint across restarts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtl_dist.loop.selection import BestTracker


@dataclass
class LoopState:
    """What the loop carries from step to step (and a checkpoint carries across restarts)."""

    step: int
    epoch: int
    run_id: str
    tracker: BestTracker
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    undefined: dict[str, dict[str, str]] = field(default_factory=dict)
    stop: bool = False
    # train.multi_epoch: the last epoch whose start re-initialised the tables (0: none yet)
    reinit_epoch: int = 0
