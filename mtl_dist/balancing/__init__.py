"""Loss balancing: how T task losses ``[T]`` become one training loss, and the weights used.

Every balancer maps ``losses [T]`` to ``(Σ_t w_t · loss_t [+ its own terms], weights [T])``.
The weights that drive training are identical on every rank: learnable ones are dense
parameters (averaged by DDP); rule-based ones are computed from all-reduced statistics.

In training each balancer also gets ``labelled [R, T]`` — the rows with a label per rank and
task in this step, identical on every rank (see :class:`mtl_dist.loop.guard.StepCheck`) — and
``finite`` (every rank's losses are finite). A task without a labelled row on any rank, and
every task in a non-finite step, leaves the balancer's state exactly as it was: no log-variance
drift, no GradNorm step, no DWA period statistic. Weights stay finite and > 0.

One template (:class:`~mtl_dist.balancing.base.Balancer`, as LibMTL's ``AbsWeighting``):
``forward(losses [T], labelled [R, T] | None, finite [] | None) → (loss, weights [T])`` is
written once. In a training step (training mode, autograd on) it calls ``update(losses,
labelled, finite)`` — the only place state moves and collectives run, the same ones in the same
order on every rank — and then ``total(losses, weights, labelled)`` (``Σ_t w_t · L_t`` unless
the method adds terms or combines otherwise); outside one (eval, or no grad) it returns
``current(losses)``, the weights as they stand, and moves nothing. A balancer overrides only
the steps it changes.

By cost (``python -m mtl_dist.tools.bench.balancing`` measures each against ``fixed``):

* loss-only, rules (``loss_only.py``): :class:`FixedWeights` (``tasks[].weight``),
  :class:`DynamicWeightAverage` (Liu, Johns & Davison, CVPR 2019), :class:`RandomLossWeighting`
  (Lin et al., TMLR 2022), :class:`GeometricLoss` (Chennupati et al., CVPR-W 2019),
  :class:`SmoothTchebycheff` (Lin et al., ICML 2024);
* loss-only, learned (``learned.py``): :class:`UncertaintyWeighting` (Kendall, Gal & Cipolla,
  CVPR 2018), :class:`FAMO` (Liu et al., NeurIPS 2023);
* representation gradients (``representation.py``): :class:`GradNorm` (Chen et al., ICML 2018),
  on the head's last shared layer; :class:`MGDA` (MGDA-UB, Sener & Koltun, NeurIPS 2018),
  :class:`IMTLG` (Liu et al., ICLR 2021) and :class:`AlignedMTL` (Senushkin et al., CVPR 2023),
  from the Gram matrix of the task gradients on the shared representation, summed over ranks;
* parameter gradients (``parameter.py``): :class:`PCGrad` (Yu et al., NeurIPS 2020) and
  :class:`CAGrad` (Liu et al., NeurIPS 2021) on the head's shared dense parameters.

:data:`REGISTRY` maps ``loss.balancer`` names to their builders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtl_dist.balancing.base import Balancer, all_mean, all_sum
from mtl_dist.balancing.learned import FAMO, UncertaintyWeighting
from mtl_dist.balancing.loss_only import (
    DynamicWeightAverage,
    FixedWeights,
    GeometricLoss,
    RandomLossWeighting,
    SmoothTchebycheff,
)
from mtl_dist.balancing.parameter import CAGrad, ParameterBalancer, PCGrad
from mtl_dist.balancing.representation import (
    IMTLG,
    MGDA,
    AlignedMTL,
    GradNorm,
    RepresentationBalancer,
)
from mtl_dist.config import BALANCERS, LossConfig, TaskSpec

Head = Callable[[], nn.Module]  # the head (at call time: after any wrapping)
# the step's shared representation (ModelWithLoss: the model's output's ``shared``)
Representation = Callable[[], torch.Tensor | None]
REGISTRY: dict[str, Callable[..., Balancer]] = {
    "fixed": lambda cfg, tasks, shared: FixedWeights([t.weight for t in tasks]),
    "uncertainty": lambda cfg, tasks, shared: UncertaintyWeighting(
        [t.kind == "binary" for t in tasks]
    ),
    "gradnorm": lambda cfg, tasks, head: GradNorm(
        [t.weight for t in tasks],
        cfg.gradnorm_alpha,
        cfg.gradnorm_lr,
        lambda: head().shared_layer(),
    ),
    "dwa": lambda cfg, tasks, shared: DynamicWeightAverage(
        len(tasks), cfg.dwa_temperature, cfg.dwa_period
    ),
    "rlw": lambda cfg, tasks, shared: RandomLossWeighting(len(tasks)),
    "gls": lambda cfg, tasks, shared: GeometricLoss(len(tasks)),
    "stch": lambda cfg, tasks, shared: SmoothTchebycheff(len(tasks), cfg.stch_mu),
    "famo": lambda cfg, tasks, shared: FAMO(len(tasks), cfg.famo_lr, cfg.famo_weight_decay),
    "mgda": lambda cfg, tasks, head, rep=None: MGDA(len(tasks), rep),
    "imtl_g": lambda cfg, tasks, head, rep=None: IMTLG(len(tasks), rep),
    "aligned_mtl": lambda cfg, tasks, head, rep=None: AlignedMTL(len(tasks), rep),
    "pcgrad": lambda cfg, tasks, head: PCGrad(len(tasks), lambda: head().shared_parameters()),
    "cagrad": lambda cfg, tasks, head: CAGrad(
        len(tasks), lambda: head().shared_parameters(), cfg.cagrad_c
    ),
}
assert list(REGISTRY) == BALANCERS, "config.BALANCERS lists the registry's names, in order"


def build_balancer(
    cfg: LossConfig,
    tasks: list[TaskSpec],
    head: Head,
    representation: Representation | None = None,
) -> Balancer:
    """The configured balancer; ``head()`` returns the multi-task head (GradNorm reads its last
    shared layer, the parameter balancers its shared parameters), ``representation()`` the
    step's shared representation (the model's output's ``shared``: the representation
    balancers differentiate on it). Every entry of ``REGISTRY`` is called ``(cfg, tasks, head)``
    and the representation balancers' with ``representation`` too."""
    make = REGISTRY[cfg.balancer]
    if cfg.balancer in ("mgda", "imtl_g", "aligned_mtl"):
        return make(cfg, tasks, head, representation)
    return make(cfg, tasks, head)


__all__ = [
    "BALANCERS", "FAMO", "IMTLG", "MGDA", "REGISTRY", "AlignedMTL", "Balancer",
    "RepresentationBalancer", "CAGrad", "PCGrad", "ParameterBalancer", "DynamicWeightAverage", "FixedWeights",
    "GeometricLoss", "GradNorm", "RandomLossWeighting", "SmoothTchebycheff",
    "UncertaintyWeighting", "all_mean", "all_sum", "build_balancer",
]  # fmt: skip
