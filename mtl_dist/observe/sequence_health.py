"""Attention health of the behaviour sequences, logged beside gate health (every
``monitor.gate_every`` steps, per rank): how spread each sequence's attention is and how much
of it the most recent items take.

Per sequence ``s`` (its weights ``w [B, L]`` over the left-aligned history, ``lengths [B]``):

* ``attention/<s>/entropy``: the mean over rows with a history of ``−Σ_i p_i log p_i``, where
  ``p = |w| / Σ|w|`` (DIN's weights are not normalised and may be negative; MHA's and the mean's
  are already a distribution). 0: all weight on one item; ``log L``: spread evenly.
* ``attention/<s>/entropy_ratio``: that entropy over the mean ``log(length)`` (1: as spread as
  the mean pooling; rows of length 1 count 0 in both).
* ``attention/<s>/recent_share``: the mean share ``Σ p_i`` over each row's last ``recent_k``
  true positions (the most recent items: lists are oldest first). Under mean pooling it is
  ``min(k, length) / length``.

Rows without a history, and rows whose weights are all 0, are left out (none left: no value).
One set of figures per sequence, or with ``per_task`` one per task (``attention/<s>/<task>/…``).
"""

from __future__ import annotations

import torch


def attention_health(
    attention: dict[str, tuple[torch.Tensor, torch.Tensor]], recent: dict[str, int]
) -> dict[str, float]:
    """``{sequence: (w [B, L], lengths [B])}`` → the scalars of the module docstring, tagged
    ``attention/<sequence>/<stat>``; ``recent``: each sequence's ``recent_k``."""
    out: dict[str, float] = {}
    for name, (w, lengths) in attention.items():
        w = w.detach().float().abs()
        lengths = lengths.long().clamp(max=w.shape[1])
        total = w.sum(1)
        rows = (lengths > 0) & (total > 0)
        if not rows.any():
            continue
        p = w[rows] / total[rows, None]
        n = lengths[rows]
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(1)
        pos = torch.arange(w.shape[1], device=w.device)
        k = recent.get(name, recent.get(name.split("/")[0], 5))  # <sequence>/<task>: per task
        last = (pos[None] >= (n - k)[:, None]) & (pos[None] < n[:, None])
        out[f"attention/{name}/entropy"] = entropy.mean().item()
        out[f"attention/{name}/entropy_ratio"] = (
            entropy.sum() / torch.log(n.float()).sum().clamp_min(1e-12)
        ).item()
        out[f"attention/{name}/recent_share"] = (p * last).sum(1).mean().item()
    return out
