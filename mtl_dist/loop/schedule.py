"""Learning-rate schedules for the dense and the embedding optimizer, each its own.

A schedule is a pure function of the step (:func:`lr_factor`): a linear warm-up over
``<part>_warmup_steps`` steps, then ``constant``, ``cosine`` (to ``schedule_min_ratio`` of the
base rate at the run's last step), ``step`` (× ``schedule_gamma`` every ``schedule_step_size``
steps) or ``exponential`` (× ``schedule_gamma`` per ``schedule_step_size`` steps, continuously).
Being a function of the step, it needs no state: a resumed run sets the rate of its next step
from the step it resumed at, exactly as the uninterrupted run had it.

:class:`LRSchedule` sets each part's rate before every step. The fused embedding optimizers
read it when the train pipeline calls ``zero_grad`` at the start of the step (TorchRec copies
``param_groups[0]["lr"]`` into the TBE kernel there), before the backward that applies it;
the dense optimizer at its ``step``. ``train/lr/{dense,embedding}`` in TensorBoard shows both.
"""

from __future__ import annotations

import math

from torchrec.optim.keyed import CombinedOptimizer

from mtl_dist.config import SCHEDULES, OptimConfig


def lr_factor(
    schedule: str,
    step: int,
    warmup: int = 0,
    total: int = 0,
    gamma: float = 0.5,
    step_size: int = 1000,
    min_ratio: float = 0.0,
) -> float:
    """The multiplier of the base rate for training step ``step`` (1-based: the step about to
    run) of a run of ``total`` steps. Raises ``ValueError`` for an unknown ``schedule``."""
    if warmup and step <= warmup:
        return step / warmup
    s = step - warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
    if schedule == "step":
        return gamma ** (s // step_size)
    if schedule == "exponential":
        return gamma ** (s / step_size)
    raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")


class LRSchedule:
    """Sets the dense and the embedding rates of ``optimizer`` (a :class:`CombinedOptimizer`
    of ``embedding`` and ``dense``) for each step of a run of ``total`` steps."""

    def __init__(self, cfg: OptimConfig, optimizer: CombinedOptimizer, total: int) -> None:
        self.cfg, self.total = cfg, total
        self.parts = dict(optimizer.optimizers)
        self.base = {"dense": cfg.dense_lr, "embedding": cfg.embedding_lr}
        self.kind = {"dense": cfg.dense_schedule, "embedding": cfg.embedding_schedule}
        self.warmup = {"dense": cfg.dense_warmup_steps, "embedding": cfg.embedding_warmup_steps}

    def rate(self, part: str, step: int) -> float:
        c = self.cfg
        return self.base[part] * lr_factor(
            self.kind[part], step, self.warmup[part], self.total, c.schedule_gamma,
            c.schedule_step_size, c.schedule_min_ratio,
        )  # fmt: skip

    def apply(self, step: int) -> None:
        """Set both rates for training step ``step`` (call before it runs)."""
        for part in ("dense", "embedding"):
            lr = self.rate(part, step)
            for group in self.parts[part].param_groups:
                group["lr"] = lr
