"""Optimizers: the fused embedding optimizer (already inside DMP) + one for the dense part."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mtl_dist.config import OptimConfig
from mtl_dist.loop.step import UpdateSwitch

_DENSE = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


def fused_available(name: str, device: torch.device) -> bool:
    """Whether torch has a fused kernel of dense optimizer ``name`` on ``device`` (one pass
    over all tensors; it also skips a step on the device through ``found_inf``)."""
    op = {"adam": "_fused_adam_", "adamw": "_fused_adamw_", "sgd": "_fused_sgd_"}.get(
        name, "_fused_adagrad_"
    )
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


class GuardedDense(KeyedOptimizerWrapper):
    """The dense optimizer, skipping its whole step (update, moments, step count) when the
    step's :class:`~mtl_dist.loop.step.UpdateSwitch` is closed.

    With a fused kernel the skip happens on the device (``found_inf``, as a GradScaler sets
    it): no host synchronisation. Without one, the switch is read on the host. Under fp16 the
    switch carries a :class:`~mtl_dist.loop.precision.LossScaler`: gradients are unscaled first, an
    overflow (here or in the tables' gradient) skips the step, and the scale is updated. With
    ``clip_grad_norm`` the dense gradients are clipped to that global norm first (the pre-clip
    norm kept in ``grad_norm``; a non-finite one skips the step).
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        factory,
        switch: UpdateSwitch,
        clip_grad_norm: float = 0.0,
    ) -> None:
        super().__init__(params, factory)
        self.switch = switch
        self.clip = clip_grad_norm
        self.grad_norm: torch.Tensor | None = None  # the last step's pre-clip norm (clipping on)
        # run first in each step (a balancer writing the shared parameters' gradient)
        self.before_step: list[Callable[[], None]] = []
        opt = self._optimizer
        self.on_device = all(g.get("fused") for g in opt.param_groups) and getattr(
            opt, "_step_supports_amp_scaling", False
        )

    def step(self, closure=None) -> None:
        for hook in self.before_step:
            hook()
        switch = self.switch
        switch.resolve()
        is_open = switch.open  # None: the guard is off
        overflow = None
        if switch.scaler is not None:  # fp16: unscale; an overflow (dense or tables) skips
            grads = [p.grad for g in self._optimizer.param_groups for p in g["params"]
                     if p.grad is not None]  # fmt: skip
            overflow = switch.scaler.unscale_(grads) > 0
            if switch.grad_overflow is not None:
                overflow = overflow | switch.grad_overflow
            is_open = ~overflow if is_open is None else is_open & ~overflow
        if self.clip > 0:  # DDP averaged the gradients: every rank clips alike
            grads = [p for g in self._optimizer.param_groups for p in g["params"]
                     if p.grad is not None]  # fmt: skip
            self.grad_norm = torch.nn.utils.clip_grad_norm_(grads, self.clip, foreach=True)
            finite = torch.isfinite(self.grad_norm)  # a non-finite gradient: no step
            is_open = finite if is_open is None else is_open & finite
        run = True
        if is_open is not None:
            if self.on_device:
                self._optimizer.found_inf = (~is_open).float()
            else:
                run = bool(is_open)  # a host read: only where no fused kernel exists
        if run:
            self._optimizer.step(closure=closure)
        if overflow is not None:
            switch.scaler.update(overflow.float())


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, switch: UpdateSwitch | None = None
) -> CombinedOptimizer:
    """``model`` is the DMP-wrapped model; its ``fused_optimizer`` updates the tables in backward.

    ``step()`` on the result steps the dense optimizer (the fused one has already run); a
    closed ``switch`` (the non-finite guard) skips it.
    """
    cls = _DENSE[cfg.dense_optimizer]
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    device = next(iter(dense_params.values())).device
    # the fused kernel updates all tensors in one pass (and can skip a step on the device)
    extra = {"fused": True} if fused_available(cfg.dense_optimizer, device) else {}
    dense = GuardedDense(
        dense_params,
        lambda params: cls(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, **extra),
        switch or UpdateSwitch(),
        cfg.clip_grad_norm,
    )
    return CombinedOptimizer([("embedding", model.fused_optimizer), ("dense", dense)])


def dense_optimizer(optimizer: CombinedOptimizer) -> torch.optim.Optimizer:
    """The torch optimizer of the dense part inside ``optimizer``."""
    return dict(optimizer.optimizers)["dense"]._optimizer


def learning_rates(optimizer: CombinedOptimizer) -> dict[str, float]:
    """``{"embedding": lr, "dense": lr}``: each part's (first group's) current learning rate."""
    return {
        key: float(opt.param_groups[0]["lr"])
        for key, opt in optimizer.optimizers
        if opt.param_groups and "lr" in opt.param_groups[0]
    }
