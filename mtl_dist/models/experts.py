"""Stacked MLPs: G independent MLPs (experts, or task towers) run as one batched op per layer.

Weights of layer l are stacked as ``[G, in_l, out_l]``; a layer is one ``baddbmm`` over the
group dimension, so G experts cost one kernel, not G. With a shared input ``[B, Din]`` the first
layer of all groups is a single ``[B, Din] @ [Din, G*H]`` matmul.

Shapes: G groups, B batch, Din input, H output width. Output is ``[G, B, H]`` (group-major,
so the next layer's ``bmm`` needs no copy).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StackedMLP(nn.Module):
    """G MLPs of the same widths, evaluated together.

    Args:
        groups: G, the number of MLPs (experts or towers).
        in_dim: Din.
        widths: output width of each layer; the last is H.
        activate_last: apply the activation after the last layer (experts: yes; towers whose
            last layer is the output unit: no).
        dropout: dropout after each hidden activation.
        batch_norm: batch-normalise each hidden layer (per group) before its activation.

    Example::

        experts = StackedMLP(groups=4, in_dim=32, widths=[64, 16])
        experts(torch.randn(8, 32)).shape      # [4, 8, 16]  (shared input)
        experts(torch.randn(4, 8, 32)).shape   # [4, 8, 16]  (one input per group)
    """

    def __init__(
        self,
        groups: int,
        in_dim: int,
        widths: list[int],
        activate_last: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.widths = list(widths)
        self.activate_last = activate_last
        dims = [in_dim, *widths]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(groups, d_in, d_out)) for d_in, d_out in zip(dims, dims[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(groups, 1, d_out)) for d_out in dims[1:]
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # per-group batch norm before each hidden activation (one BatchNorm1d over G·H features)
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(groups * d_out) for d_out in widths[:-1])
            if batch_norm
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each group initialised as ``nn.Linear`` would be: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, Din]`` (shared by all groups) or ``[G, B, Din]``. Returns ``[G, B, H]``."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if x.dim() == 2:
                # shared input: all groups' first layer in one matmul [B, Din] @ [Din, G*H]
                g, d_in, d_out = w.shape
                y = x @ w.permute(1, 0, 2).reshape(d_in, g * d_out)
                x = y.view(-1, g, d_out).transpose(0, 1) + b
            else:
                x = torch.baddbmm(b, x, w)
            if self.norms is not None and i < last:
                g, n, h = x.shape
                x = self.norms[i](x.transpose(0, 1).reshape(n, g * h)).view(n, g, h).transpose(0, 1)
            if i < last or self.activate_last:
                x = self.dropout(torch.relu(x))
        return x

    def forward_group(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """Group ``g`` alone on rows ``x`` ``[n, Din]`` → ``[n, H]`` (sparse top-k dispatch)."""
        if self.norms is not None:
            raise ValueError("forward_group does not support batch_norm")
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b[g], x, w[g])
            if i < last or self.activate_last:
                x = self.dropout(torch.relu(x))
        return x
