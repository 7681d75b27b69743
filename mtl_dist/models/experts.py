"""Stacked MLPs: G independent MLPs (experts, or task towers) run as one batched op per layer.

Weights of layer l are stacked as ``[G, in_l, out_l]``; a layer is one ``baddbmm`` over the
group dimension, so G experts cost one kernel, not G. With a shared input ``[B, Din]`` the first
layer of all groups is a single ``addmm`` ``[B, Din] @ [Din, G*H]``, and
:func:`fused_first_layer` widens that one matmul to every module reading the same input (the
experts' first layers and all gates' logits side by side). Sparse (top-k) dispatch runs each
group on its own rows with :func:`torch.nn.functional.grouped_mm`, one call per layer.

Shapes: G groups, B batch, Din input, H output width. Output is ``[G, B, H]`` (group-major,
so the next layer's ``bmm`` needs no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ExpertStyle:
    """How an expert set computes (``model.experts.activation`` / ``norm``): see
    :class:`StackedMLP`'s ``activation`` and ``output_norm``."""

    activation: str = "relu"
    norm: str = "none"
    feature_gate_rank: int = 0

    def kwargs(self) -> dict[str, str | int]:
        return {
            "activation": self.activation,
            "output_norm": self.norm,
            "feature_gate_rank": self.feature_gate_rank,
        }


PLAIN_EXPERTS = ExpertStyle()  # ReLU, no output normalisation


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
        activation: ``relu`` | ``swish`` (``x · sigmoid(x)``: no unit is ever dead; HoME,
            Wang et al. 2024, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
            Kuaishou").
        output_norm: ``none`` | ``batch`` | ``layer``: normalise each group's last layer
            before its activation (HoME's expert normalisation: every expert's output on one
            scale, so no expert's magnitude takes the gate over); per group, with its own
            affine parameters.
        feature_gate_rank: r > 0: HoME's feature gate — each group reads its own scaling of
            the input, ``x_g = x ⊙ 2σ(x A_g B_g)`` with ``A_g`` ``[Din, r]``, ``B_g`` ``[r, Din]``
            (a LoRA-style low-rank gate; B starts at 0, so every gate starts at 1): experts
            see the features differently, not one shared input. Not with grouped dispatch.

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
        activation: str = "relu",
        output_norm: str = "none",
        feature_gate_rank: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS or output_norm not in OUTPUT_NORMS:
            raise ValueError(
                f"activation must be {' | '.join(ACTIVATIONS)} and output_norm "
                f"{' | '.join(OUTPUT_NORMS)}, got {activation!r}, {output_norm!r}"
            )
        self.groups = groups
        self.widths = list(widths)
        self.activate_last = activate_last
        self.act = ACTIVATIONS[activation]
        self.output_norm = output_norm
        h = widths[-1]
        if output_norm == "batch":
            self.out_norm = nn.BatchNorm1d(groups * h)
        elif output_norm == "layer":  # per group: its own scale and shift over H
            self.out_norm_weight = nn.Parameter(torch.ones(groups, 1, h))
            self.out_norm_bias = nn.Parameter(torch.zeros(groups, 1, h))
        self.feature_gated = feature_gate_rank > 0
        if self.feature_gated:  # HoME's feature gate, LoRA-style: A random, B zero
            self.gate_down = nn.Parameter(
                torch.randn(groups, in_dim, feature_gate_rank) / math.sqrt(in_dim)
            )
            self.gate_up = nn.Parameter(torch.zeros(groups, feature_gate_rank, in_dim))
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

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0 of all groups as one matrix ``[Din, G*H1]`` and bias ``[G*H1]``."""
        w, b = self.weights[0], self.biases[0]
        g, d_in, d_out = w.shape
        return w.permute(1, 0, 2).reshape(d_in, g * d_out), b.reshape(g * d_out)

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, Din]`` (shared by all groups) or ``[G, B, Din]``. Returns ``[G, B, H]``.

        ``first``: layer 0's pre-activation ``[B, G*H1]`` when a fused matmul already computed it
        (:func:`fused_first_layer`).
        """
        if self.feature_gated:  # each group its own gated input: [G, B, Din]
            x, first = self.feature_gate(x), None
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i == 0 and (first is not None or x.dim() == 2):
                if first is None:  # shared input: all groups' first layer in one addmm
                    w_all, b_all = self.first_layer()
                    first = torch.addmm(b_all, x, w_all)
                x = first.view(first.shape[0], self.groups, -1).transpose(0, 1)
                if _needs_standard_batch_strides(x):
                    x = x.contiguous()
            else:
                x = torch.baddbmm(b, x, w)
            if self.norms is not None and i < last:
                x = _group_batch_norm(self.norms[i], x)
            if i == last:
                x = self._normalise_output(x)
            if i < last or self.activate_last:
                x = self.dropout(self.act(x))
        return x

    def feature_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``x ⊙ 2σ(x A_g B_g)`` per group: ``[B, Din]`` or ``[G, B, Din]`` → ``[G, B, Din]``."""
        if x.dim() == 2:
            low = torch.einsum("bd,gdr->gbr", x, self.gate_down)
            return x.unsqueeze(0) * 2 * torch.sigmoid(torch.bmm(low, self.gate_up))
        return x * 2 * torch.sigmoid(torch.bmm(torch.bmm(x, self.gate_down), self.gate_up))

    def _normalise_output(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """``output_norm`` of the last layer: ``x`` ``[G, B, H]``, or ``[N, H]`` rows of the
        groups ``group`` ``[N]`` (grouped dispatch; layer norm only)."""
        if self.output_norm == "batch":
            if group is not None:
                raise ValueError("grouped dispatch does not support output_norm = 'batch'")
            return _group_batch_norm(self.out_norm, x)
        if self.output_norm == "layer":
            x = F.layer_norm(x, x.shape[-1:])
            if group is None:
                return x * self.out_norm_weight + self.out_norm_bias
            w, b = self.out_norm_weight.squeeze(1), self.out_norm_bias.squeeze(1)
            return x * w.index_select(0, group) + b.index_select(0, group)
        return x

    def grouped_kernel(self, x: torch.Tensor) -> str:
        """What :meth:`forward_grouped` runs on rows like ``x`` ``[N, Din]``: ``grouped_mm`` (one
        grouped GEMM per layer) where torch has it for this device and dtype, else ``loop``."""
        return "grouped_mm" if grouped_mm_supported(x, [x.shape[1], *self.widths]) else "loop"

    def forward_grouped(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Each row through its own group's MLP (sparse top-k dispatch): ``[N, Din]`` → ``[N, H]``.

        ``group`` ``[N]`` is each row's group, sorted ascending. One ``grouped_mm`` per layer
        where torch has it for this device and dtype, else a loop over the contiguous row blocks.
        """
        if self.norms is not None or self.feature_gated:
            raise ValueError("grouped dispatch does not support batch_norm or feature gates")
        counts = torch.bincount(group, minlength=self.groups)
        if self.grouped_kernel(x) == "loop":
            bounds = [0, *counts.cumsum(0).tolist()]
            blocks = [
                self.forward_group(g, x[s:e]) for g, (s, e) in enumerate(zip(bounds, bounds[1:]))
            ]
            return torch.cat(blocks)
        offs = counts.cumsum(0).to(torch.int32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.grouped_mm(x, w, offs=offs) + b.squeeze(1).index_select(0, group)
            if i == last:
                x = self._normalise_output(x, group)
            if i < last or self.activate_last:
                x = self.dropout(self.act(x))
        return x

    def forward_group(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """Group ``g`` alone on rows ``x`` ``[n, Din]`` → ``[n, H]``."""
        if self.norms is not None:
            raise ValueError("forward_group does not support batch_norm")
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b[g], x, w[g])
            if i == last:
                x = self._normalise_output(x, torch.full((x.shape[0],), g, device=x.device))
            if i < last or self.activate_last:
                x = self.dropout(self.act(x))
        return x


ACTIVATIONS = {"relu": torch.relu, "swish": F.silu}


def _needs_standard_batch_strides(x: torch.Tensor) -> bool:
    """Whether the batched matmuls after the shared first layer want ``x`` ``[G, B, H]`` made
    contiguous. ``x`` is a transposed view of the ``[B, G·H]`` matmul output (batch stride H):
    CPU fp32 (MKL) multiplies it and its transpose in place, but the bf16 / fp16 CPU kernels
    and cuBLAS' strided-batched GEMM take only standard batch strides, and copy ``x``ᵀ in the
    backward through a slow strided path (a third of a bf16 MMoE step on a Sapphire Rapids
    CPU, issue 28) — one contiguous copy in the forward is far cheaper."""
    return x.dtype != torch.float32 or x.device.type != "cpu"


OUTPUT_NORMS = ("none", "batch", "layer")


def _group_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``norm`` over G·H features applied to ``x`` ``[G, B, H]`` (each group its own statistics)."""
    g, n, h = x.shape
    return norm(x.transpose(0, 1).reshape(n, g * h)).view(n, g, h).transpose(0, 1)


def grouped_mm_supported(x: torch.Tensor, widths: list[int]) -> bool:
    """Whether ``F.grouped_mm`` runs for ``x``'s device and dtype and these layer widths: on CPU
    (torch 2.13 has a kernel with autograd), on CUDA for bf16 on SM ≥ 8.0 (torch documents no
    fp32 kernel); every width must span a multiple of 16 bytes (the kernels' stride rule)."""
    if not hasattr(F, "grouped_mm") or any(w * x.element_size() % 16 for w in widths):
        return False
    if x.device.type == "cpu":
        return True
    return (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def fused_first_layer(x: torch.Tensor, mlps: list[StackedMLP]) -> list[torch.Tensor | None]:
    """Layer 0 of several StackedMLPs that read the same ``x`` ``[B, Din]`` as ONE ``addmm``.

    Returns each module's pre-activation ``[B, G_i*H_i]`` (column slices of one output), to pass
    as ``first=`` to its forward; None for a module with feature gates (its groups read their
    own gated inputs, not ``x``).
    """
    shared = [m for m in mlps if not m.feature_gated]
    ws, bs = zip(*(m.first_layer() for m in shared))
    y = torch.addmm(torch.cat(bs), x, torch.cat(ws, 1))
    out = iter(y.split([w.shape[1] for w in ws], 1))
    return [None if m.feature_gated else next(out) for m in mlps]


def dead_units(h: torch.Tensor, groups: torch.Tensor | None = None, num: int = 0) -> torch.Tensor:
    """Per expert, the share of its output units (after ReLU) that are 0 on every row: ``[G]``.

    ``h``: the experts' outputs ``[G, B, H]``, or ``[N, H]`` rows with their expert ``groups``
    ``[N]`` (sparse dispatch; ``num`` experts, NaN for one that got no row).
    """
    h = h.detach()  # after ReLU, >= 0: a unit is alive where its max over the rows is > 0
    if groups is None:
        return 1.0 - (h.amax(1) > 0).float().mean(-1)  # amax: 10x faster than (h > 0).any
    alive = h.new_zeros(num, h.shape[1]).index_reduce_(0, groups, h, "amax") > 0
    rows = torch.bincount(groups, minlength=num)
    return torch.where(rows > 0, 1.0 - alive.float().mean(-1), torch.nan)
