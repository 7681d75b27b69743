"""Per-task losses with label masks, and the model-with-loss that trainers call.

Binary tasks: BCE on logits; regression tasks: MSE. A missing label (mask 0) contributes
nothing; a task with no label in the batch contributes 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.config import JobConfig, TaskSpec
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


def esmm_ctcvr_loss(
    ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, ctcvr_label: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ESMM (Ma et al., SIGIR 2018): BCE of pCTCVR = pCTR × pCVR against click∧conversion.

    Computed on every exposure (``mask`` is the CTR task's), so pCVR is learnt over the entire
    space without a direct loss on the clicked-only rows. Log-space for stability. ``[B]`` → scalar.
    """
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-7))
    per_row = -(ctcvr_label * log_p + (1 - ctcvr_label) * log_not_p) * mask
    return per_row.sum() / mask.sum().clamp_min(1.0)


def predictions(outputs: torch.Tensor, is_binary: torch.Tensor) -> torch.Tensor:
    """Probabilities for binary tasks, values for regression: ``[B, T]``."""
    return torch.where(is_binary, torch.sigmoid(outputs), outputs)


@dataclass
class StepOutput:
    """What a train / eval step returns besides the loss (all detached).

    losses ``[T]`` (task losses, unweighted; the CVR task's is the CTCVR loss under ESMM);
    aux ``[A]`` (the head's auxiliary losses, see ``head.aux_names``); preds, labels, mask,
    truth ``[B, T]`` (preds: pCTR / pCVR / values — pCVR stays available under ESMM).
    """

    losses: torch.Tensor
    aux: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor


class ModelWithLoss(nn.Module):
    """``forward(batch) -> (loss, StepOutput)``, the contract of TorchRec's train pipelines.

    loss = Σ_t weight_t · loss_t + Σ aux. ``esmm=(ctr_index, cvr_index)`` trains the CVR task
    through pCTCVR on all exposures (see :func:`esmm_ctcvr_loss`).
    """

    def __init__(
        self, model: nn.Module, tasks: list[TaskSpec], esmm: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.esmm = esmm
        self.register_buffer(
            "is_binary", torch.tensor([t.kind == "binary" for t in tasks]), persistent=False
        )
        self.register_buffer(
            "weights",
            torch.tensor([t.weight for t in tasks], dtype=torch.float32),
            persistent=False,
        )

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        outputs, aux = self.model(batch)
        losses = task_losses(outputs, batch.labels, batch.mask, self.is_binary)
        if self.esmm is not None:
            c, v = self.esmm
            ctcvr = esmm_ctcvr_loss(
                outputs[:, c],
                outputs[:, v],
                batch.labels[:, c] * batch.labels[:, v],
                batch.mask[:, c],
            )
            losses = torch.cat([losses[:v], ctcvr.unsqueeze(0), losses[v + 1 :]])
        loss = (losses * self.weights).sum() + aux.sum()
        out = StepOutput(
            losses=losses.detach(),
            aux=aux.detach(),
            preds=predictions(outputs.detach(), self.is_binary),
            labels=batch.labels,
            mask=batch.mask,
            truth=batch.truth,
        )
        return loss, out


def build_model_with_loss(model: nn.Module, cfg: JobConfig) -> ModelWithLoss:
    """Wrap ``model`` with the task losses of ``cfg`` (ESMM when ``model.esmm``)."""
    names = [t.name for t in cfg.tasks]
    esmm = (
        (names.index(cfg.model.esmm_ctr_task), names.index(cfg.model.esmm_cvr_task))
        if cfg.model.esmm
        else None
    )
    return ModelWithLoss(model, cfg.tasks, esmm)
