"""ESMM's and ESCM2's losses now live in :mod:`mtl_dist.loop.losses` again, beside the task
losses they share :func:`weighted_mean` with; this path stays importable for one release."""

from mtl_dist.loop.losses import (  # noqa: F401  (the old path, re-exported)
    MIN_PROPENSITY,
    ctcvr_weights,
    escm2_dr_risk,
    escm2_ips_risk,
    esmm_ctcvr_loss,
    observed_conversions,
    weighted_mean,
)
