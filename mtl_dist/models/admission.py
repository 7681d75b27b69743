"""The model's copy of feature admission's id counts (see :mod:`mtl_dist.data.admission`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtl_dist.config import SparseFeature


class IdCounts(nn.Module):
    """Per admitted feature, its training-split id counts as an int64 buffer ``[id_rows]``
    (``counts_<i>``, in config order): part of the model's state, so checkpoints and exported
    models carry them. No forward; :meth:`masks` gives the admission masks.

    Example::

        counts = IdCounts([SparseFeature("item", vocab_size=3, admit_min_count=2)])
        counts.set({"item": np.array([5, 1, 2])})
        counts.masks()   # {'item': array([ True, False,  True])}
    """

    def __init__(self, features: list[SparseFeature]) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.min_counts = [f.admit_min_count for f in features]
        for i, f in enumerate(features):
            self.register_buffer(f"counts_{i}", torch.zeros(f.id_rows, dtype=torch.int64))

    def set(self, counts: dict[str, np.ndarray]) -> None:
        """Copy each feature's counts ``[id_rows]`` in (a missing one raises ``KeyError``)."""
        for i, name in enumerate(self.names):
            getattr(self, f"counts_{i}").copy_(torch.from_numpy(np.asarray(counts[name])))

    def masks(self) -> dict[str, np.ndarray]:
        """Per feature, which ids keep their own row: ``count >= admit_min_count`` ``[id_rows]``."""
        return {
            name: (getattr(self, f"counts_{i}") >= n).cpu().numpy()
            for i, (name, n) in enumerate(zip(self.names, self.min_counts))
        }
