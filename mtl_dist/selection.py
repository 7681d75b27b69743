"""Best-model selection and early stopping (``train.best_metric``, ``early_stop_patience``).

CTR models overfit fast after their first epoch (the "one-epoch phenomenon"), so the model to
serve is the one of the best validation, not the last. :class:`BestTracker` follows one
validation metric (``<task>/<metric>``; AUC / GAUC higher is better, log-loss / MSE / MAE lower)
over the validations; the train loop keeps a checkpoint of each new best and points
``checkpoints/best`` at it (pruning never removes it), and stops after ``early_stop_patience``
validations without improvement. An undefined metric (one class only) is no improvement. The
tracker's state travels in every checkpoint, so a resumed run compares against the same best.
"""

from __future__ import annotations

from typing import Any

from mtl_dist.config import HIGHER_IS_BETTER, TrainConfig


class BestTracker:
    """The best value of ``train.best_metric`` so far, its step and checkpoint, and the
    validations since. Every rank holds the same state (metrics are computed over all ranks)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.task, _, self.metric = cfg.best_metric.partition("/")
        self.patience = cfg.early_stop_patience
        self.value: float | None = None
        self.step = 0
        self.checkpoint = ""
        self.since = 0  # validations since the best

    @property
    def enabled(self) -> bool:
        return bool(self.task)

    def update(self, step: int, metrics: dict[str, dict[str, float]]) -> bool:
        """Record a validation at ``step``; whether it is a new best."""
        value = metrics.get(self.task, {}).get(self.metric)
        higher = self.metric in HIGHER_IS_BETTER
        if value is not None and (
            self.value is None or (value > self.value if higher else value < self.value)
        ):
            self.value, self.step, self.since = value, step, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        """``early_stop_patience`` validations in a row without improvement."""
        return bool(self.patience) and self.since >= self.patience

    def state(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "checkpoint": self.checkpoint,
                "since": self.since}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        self.value, self.step = state.get("value"), int(state.get("step", 0))
        self.checkpoint, self.since = state.get("checkpoint", ""), int(state.get("since", 0))

    def summary(self) -> dict[str, Any]:
        """What metrics.json records."""
        return {"metric": f"{self.task}/{self.metric}", **self.state()}
