"""The loop's reaction to gate polarisation (``monitor.on_polarization``), from the alarms
gate health raises (:mod:`mtl_dist.observe.gate_health`): ``warn`` (they are logged where
they are raised), ``stop`` the run, or ``strengthen`` the cure — expert dropout up by 0.1
(at most 0.5) on every gate of the head, from the next step on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from mtl_dist.models.gates import Gates


def react(
    action: str,
    alarms: Sequence[Any],
    dropout_acts: Callable[[Any], bool],
    head: nn.Module,
    log: Callable[[str], None],
) -> None:
    """Act on ``alarms`` (identical on every rank, each with ``message()``) per ``action``;
    ``dropout_acts(alarm)`` says whether expert dropout can act on what it is about (not on a
    gate routing each sample to one expert). ``RuntimeError`` for ``stop``."""
    if not alarms or action == "warn":
        return
    if action == "stop":
        raise RuntimeError(f"stopping (monitor.on_polarization = stop): {alarms[0].message()}")
    if not any(dropout_acts(a) for a in alarms):
        log(
            "[gates] not strengthening: expert dropout cannot act on a gate that routes each "
            "sample to one expert (top-1 / Gumbel); model.gate.load_balance_coef spreads its load"
        )
        return
    cfgs = {id(g.cfg): g.cfg for g in head.modules() if isinstance(g, Gates)}
    for gc in cfgs.values():
        gc.expert_dropout = min(0.5, gc.expert_dropout + 0.1)
    drops = sorted({gc.expert_dropout for gc in cfgs.values()})
    log(f"[gates] strengthening the cure: expert dropout now {drops}")
