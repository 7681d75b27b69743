"""Optimizers: the fused embedding optimizer (already inside DMP) + one for the dense part."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mtl_dist.config import OptimConfig

_DENSE = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> CombinedOptimizer:
    """``model`` is the DMP-wrapped model; its ``fused_optimizer`` updates the tables in backward.

    ``step()`` on the result steps the dense optimizer (the fused one has already run).
    """
    cls = _DENSE[cfg.dense_optimizer]
    # Adam/AdamW: the fused kernel (CPU and CUDA) updates all tensors in one pass
    extra = {"fused": True} if cfg.dense_optimizer in ("adam", "adamw") else {}
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: cls(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, **extra),
    )
    return CombinedOptimizer([("embedding", model.fused_optimizer), ("dense", dense)])


def learning_rates(optimizer: CombinedOptimizer) -> dict[str, float]:
    """``{"embedding": lr, "dense": lr}``: each part's (first group's) current learning rate."""
    return {
        key: float(opt.param_groups[0]["lr"])
        for key, opt in optimizer.optimizers
        if opt.param_groups and "lr" in opt.param_groups[0]
    }
