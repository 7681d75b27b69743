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

import math
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

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric}"

    def update(self, step: int, metrics: dict[str, dict[str, float]]) -> bool:
        """Record a validation at ``step``; whether it is a new best. An undefined value (absent,
        None or NaN: one class in validation, ...) is no improvement (see :func:`defined`)."""
        value = metrics.get(self.task, {}).get(self.metric)
        higher = self.metric in HIGHER_IS_BETTER
        if defined(value) and (
            not defined(self.value) or (value > self.value if higher else value < self.value)
        ):
            self.value, self.step, self.since = float(value), step, 0
            return True
        self.since += 1
        return False

    def undefined_note(
        self, step: int, metrics: dict[str, dict[str, float]], undefined: dict[str, dict[str, str]]
    ) -> str:
        """The log line for a validation whose metric is undefined ('' when it is defined)."""
        if defined(metrics.get(self.task, {}).get(self.metric)):
            return ""
        why = undefined.get(self.task, {}).get(self.metric, "not computed at this validation")
        return f"[best] {self.name} undefined at step {step} ({why}): counted as no improvement"

    def describe_best(self) -> str:
        """``0.7312 at step 400``, or ``none: undefined at every validation``."""
        if not defined(self.value):
            return "none: undefined at every validation so far"
        return f"{self.value:.4f} at step {self.step}"

    @property
    def stop(self) -> bool:
        """``early_stop_patience`` validations in a row without improvement."""
        return bool(self.patience) and self.since >= self.patience

    def state(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "checkpoint": self.checkpoint,
                "since": self.since}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        value = state.get("value")
        self.value = float(value) if defined(value) else None
        self.step = int(state.get("step", 0))
        self.checkpoint, self.since = state.get("checkpoint", ""), int(state.get("since", 0))

    def summary(self) -> dict[str, Any]:
        """What metrics.json records."""
        return {"metric": self.name, **self.state()}


def defined(value: Any) -> bool:
    """Whether a metric value is a number to compare and print (not None, not NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def fmt_metric(value: Any, spec: str = ".4f") -> str:
    """A metric value for a log line: ``undefined`` for None / NaN, never a crash."""
    return format(value, spec) if defined(value) else "undefined"
