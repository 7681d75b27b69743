"""The model's copy of the training split's id counts (see :mod:`mtl_dist.data.admission`):
feature admission's masks and ``model.embedding.l2_frequency``'s weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl_dist.config import SparseFeature


class IdCounts(nn.Module):
    """Per counted feature, its training-split id counts, an int64 buffer ``counts_<i>``
    ``[id_rows]``, and its mean count over the ids seen, ``scale_<i>`` (float, ``[]``): part of
    the model's state, so checkpoints and exported models carry them. No forward.

    :meth:`masks`: admission's masks; :meth:`frequency_weights`: the inverse-frequency weights
    of ``model.embedding.l2_frequency``.

    Example::

        counts = IdCounts([SparseFeature("item", vocab_size=3, admit_min_count=2)])
        counts.set({"item": np.array([5, 1, 2])})
        counts.masks()   # {'item': array([ True, False,  True])}
    """

    def __init__(self, features: list[SparseFeature]) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.index = {f.name: i for i, f in enumerate(features)}
        self.min_counts = [f.admit_min_count for f in features]
        for i, f in enumerate(features):
            self.register_buffer(f"counts_{i}", torch.zeros(f.id_rows, dtype=torch.int64))
            self.register_buffer(f"scale_{i}", torch.ones(()))

    def set(self, counts: dict[str, np.ndarray]) -> None:
        """Copy each feature's counts ``[id_rows]`` in (a missing one raises ``KeyError``)."""
        for i, name in enumerate(self.names):
            c = torch.from_numpy(np.asarray(counts[name]))
            getattr(self, f"counts_{i}").copy_(c)
            seen = int((c > 0).sum())
            getattr(self, f"scale_{i}").fill_(float(c.sum()) / max(seen, 1))

    def masks(self) -> dict[str, np.ndarray]:
        """Per feature with admission, which ids keep their own row: ``count >=
        admit_min_count`` ``[id_rows]`` (bool)."""
        return {
            name: (getattr(self, f"counts_{i}") >= n).cpu().numpy()
            for i, (name, n) in enumerate(zip(self.names, self.min_counts))
            if n > 0
        }

    def frequency_weights(self, sparse: KeyedJaggedTensor, order: list[str]) -> torch.Tensor:
        """``[B, F]`` weights, features in ``order``: an id's ``scale / count`` (its feature's
        mean count over its own; count taken ≥ 1), a bag's the mean over its ids; 1 for the
        shared OOV row and for features not counted, 0 for an empty bag."""
        b = sparse.stride()
        cols = []
        for name in order:
            jt = sparse[name]
            v, lengths = jt.values(), jt.lengths()
            if name not in self.index:
                cols.append((lengths > 0).float())
                continue
            i = self.index[name]
            counts = getattr(self, f"counts_{i}")
            n = counts.shape[0]
            c = counts[v.clamp(0, n - 1)].float().clamp_min(1.0)
            w = torch.where(v < n, getattr(self, f"scale_{i}") / c, torch.ones_like(c))
            bag = torch.repeat_interleave(torch.arange(b, device=v.device), lengths)
            total = torch.zeros(b, device=v.device).index_add(0, bag, w)
            cols.append(total / lengths.clamp_min(1).float())
        return torch.stack(cols, 1)
