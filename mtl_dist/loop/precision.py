"""Loss scaling for fp16 (the training side of reduced precision; the dtype choice and the
head's autocast are in :mod:`mtl_dist.models.precision`)."""

from __future__ import annotations

import torch

from mtl_dist.config import JobConfig
from mtl_dist.distributed.collectives import all_max
from mtl_dist.loop.step import UpdateSwitch
from mtl_dist.models.head_parts import in_precision  # (re-exported: the precision API in one place)
from mtl_dist.models.precision import (
    PRECISIONS,
    Precision,
    cpu_flags,
    resolve_precision,
    set_head_precision,
)

__all__ = [
    "PRECISIONS", "LossScaler", "Precision", "cpu_flags", "in_precision", "resolve_precision",
    "set_head_precision", "set_up_precision",
]  # fmt: skip


def set_up_precision(
    cfg: JobConfig, ranker: torch.nn.Module, switch: UpdateSwitch, device: torch.device
) -> Precision:
    """Resolve ``train.precision`` for ``device`` (see :mod:`mtl_dist.models.precision`) and
    apply it: the head's (and interaction's) autocast dtype, a :class:`LossScaler` on the
    step's ``switch`` for fp16, TF32 for fp32 matmuls on CUDA (per ``train.allow_tf32``)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    precision = resolve_precision(cfg.train.precision, device.type, cap)
    if device.type == "cuda":
        tf32 = cfg.train.allow_tf32 and precision.name == "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    set_head_precision(ranker.head, precision)
    set_head_precision(ranker.interaction, precision)  # an Identity: ignored
    if precision.loss_scaling:  # fp16: dynamic loss scaling over dense and fused table updates
        switch.scaler = LossScaler(device)
    return precision


class LossScaler:
    """Dynamic loss scaling for fp16 (as ``torch.amp.GradScaler``, over TorchRec's fused
    embedding optimizers too): the loss is multiplied by ``scale`` before backward; the
    gradient reaching the tables and the dense gradients are divided by it before any update;
    a step whose scaled gradients overflow is skipped on every rank and halves the scale, and
    ``growth_interval`` good steps in a row double it. State: ``scale`` (0-dim float tensor on
    the device), ``good_steps`` and ``skipped``. Wired through the step's
    :class:`~mtl_dist.loop.step.UpdateSwitch`: :class:`~mtl_dist.loop.losses.ModelWithLoss` scales the
    loss, :class:`~mtl_dist.loop.step.GradGate` unscales the tables' gradient
    (:meth:`unscale_input`), :class:`~mtl_dist.loop.optim.GuardedDense` the dense ones.
    """

    def __init__(
        self,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = torch.tensor(init_scale, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.skipped = torch.zeros((), device=device)  # steps skipped on an overflow
        self.growth, self.backoff, self.interval = growth_factor, backoff_factor, growth_interval

    def unscale_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide ``grads`` by the scale in place; returns ``found_inf`` (0-dim float)."""
        found_inf = torch.zeros((), device=self.scale.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, 1.0 / self.scale)
        return found_inf

    def unscale_input(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient at the head's input (on its way to the tables' fused optimizers)
        divided by the scale, and whether it overflowed on any rank (0-dim bool; one all-reduce,
        so every rank skips the tables' update alike)."""
        grad = grad.float() / self.scale
        overflow = all_max((~torch.isfinite(grad)).any().float())
        return grad, overflow > 0

    def update(self, found_inf: torch.Tensor) -> None:
        """After the step: back off on an overflow, grow after ``growth_interval`` good steps."""
        self.skipped += found_inf
        torch._amp_update_scale_(
            self.scale, self.good_steps, found_inf, self.growth, self.backoff, self.interval
        )
