"""The non-finite guard: a step whose loss is not finite on some rank updates nothing, anywhere.

Each training forward, :class:`StepCheck` all-gathers one small row per rank — the labelled
rows of every task and whether each task loss and the auxiliary losses are finite — so every
rank holds the same ``labelled [R, T]`` and ``nonfinite [R, T + 1]``. The balancers read
``labelled`` (a task without labels over all ranks must not move their state);
:class:`UpdateGate` turns ``nonfinite`` (and the balancer's weights, identical on every rank)
into this step's decision, an :class:`UpdateSwitch` that every update path reads on the device,
with no host synchronisation:

* the dense optimizer gets it as ``found_inf``: its fused kernel skips the update, the moments
  and the step count, as under a GradScaler (:class:`mtl_dist.optim.GuardedDense`);
* :class:`GradGate`, on the head's input, zeroes the gradient that flows into the embedding
  tables, so their fused optimizers (SGD, Adagrad, row-wise Adagrad: an update proportional to
  the gradient) leave rows and optimizer state as they were;
* the balancers leave their state as it was.

``train.on_nonfinite``: ``stop`` keeps the switch closed from the first non-finite step on, and
the train loop ends the run (non-zero exit, no checkpoint after it) when it next reads the flags;
``skip`` closes it for that step only and the loop stops after ``train.max_nonfinite``
consecutive ones; ``off`` (for measuring the guard's cost only) gates nothing. The loop reads
the flags every step where that costs no synchronisation (CPU, or CUDA with step timing on),
else every ``train.log_every`` steps and before every checkpoint or validation.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_dist.metrics import gather_rows

ON_NONFINITE = ("stop", "skip", "off")


class UpdateSwitch:
    """Whether this step's update may apply: ``open`` is a 0-dim bool tensor on the training
    device, set by :class:`UpdateGate` in the forward (``None`` while the guard is off or
    before the first training step: everything applies)."""

    def __init__(self) -> None:
        self.open: torch.Tensor | None = None


class _GateGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: UpdateSwitch) -> torch.Tensor:
        ctx.switch = switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        is_open = ctx.switch.open
        return (grad if is_open is None else torch.where(is_open, grad, 0.0)), None


class GradGate(nn.Module):
    """Identity in the forward; in training, its backward passes the gradient only while the
    step's :class:`UpdateSwitch` is open (``torch.where``, so a NaN gradient becomes 0, not
    NaN × 0). ``x``: any shape, returned as a view."""

    def __init__(self) -> None:
        super().__init__()
        self.switch = UpdateSwitch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return x
        return _GateGrad.apply(x, self.switch)


class StepCheck(nn.Module):
    """This step's label counts and loss finiteness over all ranks (one all-gather of
    ``2T + 1`` floats per rank, in training; this rank's alone in evaluation).

    ``forward(losses [T], aux [A], loss_mask [B, T])`` → ``(labelled [R, T]`` rows with a
    loss weight > 0 per rank and task, ``nonfinite [R, T + 1]`` bool: each task loss, then
    any auxiliary loss, not finite)``.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self, losses: torch.Tensor, aux: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = losses.numel()
        bad_aux = (~torch.isfinite(aux)).any().unsqueeze(0)
        row = torch.cat(
            [(loss_mask > 0).sum(0).to(losses.dtype), (~torch.isfinite(losses)).to(losses.dtype),
             bad_aux.to(losses.dtype)]
        ).unsqueeze(0)  # fmt: skip
        if self.training and self.gather:
            row = gather_rows(row)
        return row[:, :T], row[:, T:] > 0


class UpdateGate(nn.Module):
    """Opens or closes the :class:`UpdateSwitch` for this step (see the module docstring).

    ``forward(nonfinite [R, T + 1], weights [T])`` → ``skipped`` (0-dim bool: this step's
    update is dropped on every rank). State on the device, no host read: ``tripped`` (a
    non-finite step was seen: ``stop`` keeps the switch closed) and ``consecutive`` (non-finite
    steps in a row).
    """

    def __init__(self, switch: UpdateSwitch, mode: str = "stop") -> None:
        super().__init__()
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {mode!r}")
        self.switch, self.mode = switch, mode
        self.tripped: torch.Tensor | None = None
        self.consecutive: torch.Tensor | None = None

    def forward(self, nonfinite: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        finite = ~nonfinite.any() & torch.isfinite(weights).all()
        if not (self.training and torch.is_grad_enabled()) or self.mode == "off":
            return torch.zeros_like(finite)
        if self.tripped is None:
            self.tripped = torch.zeros_like(finite)
            self.consecutive = torch.zeros((), dtype=torch.int64, device=finite.device)
        ok = finite & ~self.tripped if self.mode == "stop" else finite
        self.tripped = self.tripped | ~finite
        self.consecutive = torch.where(finite, 0, self.consecutive + 1)
        self.switch.open = ok
        return ~ok
