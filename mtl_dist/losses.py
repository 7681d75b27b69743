"""Per-task losses with label masks, and the model-with-loss that trainers call.

Binary tasks: BCE on logits; regression tasks: MSE. A missing label (mask 0) contributes
nothing; a task with no label in the batch contributes 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.config import TaskSpec
from mtl_dist.data.batch import Batch


def task_losses(
    outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, is_binary: torch.Tensor
) -> torch.Tensor:
    """Masked mean loss per task.

    Args:
        outputs: ``[B, T]`` logits (binary tasks) or values (regression tasks).
        labels, mask: ``[B, T]``.
        is_binary: ``[T]`` bool.

    Returns:
        ``[T]`` losses.
    """
    bce = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
    mse = (outputs - labels).square()
    per_row = torch.where(is_binary, bce, mse) * mask
    return per_row.sum(0) / mask.sum(0).clamp_min(1.0)


def predictions(outputs: torch.Tensor, is_binary: torch.Tensor) -> torch.Tensor:
    """Probabilities for binary tasks, values for regression: ``[B, T]``."""
    return torch.where(is_binary, torch.sigmoid(outputs), outputs)


@dataclass
class StepOutput:
    """What a train / eval step returns besides the loss (all detached).

    losses ``[T]``; preds, labels, mask, truth ``[B, T]``; gates ``[B, T, E]``.
    """

    losses: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor
    gates: torch.Tensor


class ModelWithLoss(nn.Module):
    """``forward(batch) -> (weighted loss, StepOutput)``, the contract of TorchRec's train pipelines."""

    def __init__(self, model: nn.Module, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "is_binary", torch.tensor([t.kind == "binary" for t in tasks]), persistent=False
        )
        self.register_buffer(
            "weights",
            torch.tensor([t.weight for t in tasks], dtype=torch.float32),
            persistent=False,
        )

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        outputs, gates = self.model(batch)
        losses = task_losses(outputs, batch.labels, batch.mask, self.is_binary)
        loss = (losses * self.weights).sum()
        out = StepOutput(
            losses=losses.detach(),
            preds=predictions(outputs.detach(), self.is_binary),
            labels=batch.labels,
            mask=batch.mask,
            truth=batch.truth,
            gates=gates.detach(),
        )
        return loss, out
