"""The interaction stage: explicit feature crosses between the embeddings and the head.

The head's input ``x [B, Din]`` is the pooled embedding of each sparse feature (``F`` blocks of
widths ``w_f``, in the ranker's ``feature_order``) then the ``Dd`` normalised dense values. An
interaction maps it to ``[B, Dx]``; with ``model.interaction.output = concat`` the head reads
``[x, interaction(x)]`` (``Din + Dx``), with ``replace`` the interaction's output alone (``Dx``).

Options (``model.interaction.kind``), built from TorchRec's modules where they exist:

* ``dot`` — DLRM (Naumov et al. 2019): the pairwise dot products of the feature vectors
  (:class:`torchrec.models.dlrm.InteractionArch`). ``Dx = D + C(F+1, 2)``.
* ``fm`` — the factorisation machine's second-order term (Rendle 2010) per embedding dimension,
  ``½((Σ_i v_i)² − Σ_i v_i²)``, ``Dx = D``; summed over D it is Rendle's ``Σ_{i<j} <v_i, v_j>``.
* ``dcn_v2`` — DCN-V2's full-rank cross network (Wang et al., WWW 2021),
  ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` (:class:`torchrec.modules.crossnet.CrossNet`).
  ``Dx = Din``.
* ``dcn_v2_lowrank`` — the same with ``W_l = U_l V_l`` of rank r (``LowRankCrossNet``).
* ``dcn_mix`` — DCN-V2's mixture of K low-rank cross experts under an input gate
  (``LowRankMixtureCrossNet``; TorchRec loops over the K experts in Python, K is small).

``dot`` and ``fm`` need one vector per field of a common width ``D = max_f w_f``: a feature of
width ``D`` is used as it is, a narrower one is mapped to ``D`` by its own learned linear map
(:class:`FieldEmbeddings`; one batched matmul per distinct width). The dense values become
fields as each method defines them: DLRM maps the dense vector to one ``D``-vector (a linear
map standing in for its bottom MLP), the FM gives dense value ``j`` the field ``x_j u_j``.
Every option maps an empty batch ``[0, Din]`` to ``[0, ·]``.

TorchRec's ``torchrec.modules.deepfm.FactorizationMachine`` is not used: it flattens its input
and sums the products of every pair of *scalars* (within one embedding too) into ``[B, 1]``,
which is not Rendle's term over feature vectors.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

from mtl_dist.config import INTERACTION_OUTPUTS, INTERACTIONS, InteractionConfig


class FieldEmbeddings(nn.Module):
    """Pooled embeddings of widths ``w_f`` ``[B, Σ w_f]`` → one ``D``-vector per feature
    ``[B, F, D]``, ``D = max_f w_f``.

    Features of width ``D`` pass unchanged; the features of each narrower width ``w`` are
    projected together by stacked weights ``[F_w, w, D]`` (one bmm per width).

    Args:
        widths: ``w_f`` per feature, in input order.

    Raises:
        ValueError: ``widths`` is empty or holds a width < 1.

    Example::

        fields = FieldEmbeddings([4, 2, 4])
        fields(torch.randn(8, 10)).shape   # [8, 3, 4]
    """

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"FieldEmbeddings needs one or more widths >= 1, got {widths}")
        self.widths = list(widths)
        self.dim = max(widths)
        self.groups = sorted(set(widths))  # one projection per width below D
        self.proj = nn.ParameterDict()
        for w in self.groups:
            if w < self.dim:
                n = widths.count(w)
                weight = torch.empty(n, w, self.dim)
                for i in range(n):
                    nn.init.xavier_uniform_(weight[i])
                self.proj[str(w)] = nn.Parameter(weight)
        # features regrouped width by width, then put back in input order
        grouped = [f for w in self.groups for f, wf in enumerate(widths) if wf == w]
        self.register_buffer(
            "order", torch.tensor(grouped).argsort(), persistent=False
        )  # [F]: field f sits at row order[f] of the width-grouped stack
        self.uniform = len(self.groups) == 1

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        B = pooled.shape[0]
        if self.uniform:
            return pooled.reshape(B, len(self.widths), self.dim)
        blocks = pooled.split(self.widths, 1)
        parts = []
        for w in self.groups:
            stack = torch.stack([b for b, wf in zip(blocks, self.widths) if wf == w], 1)
            if w < self.dim:  # [F_w, B, w] x [F_w, w, D] → [B, F_w, D]; bmm, not einsum:
                # einsum's broadcast tests would fix the batch size in an exported program
                stack = torch.bmm(stack.transpose(0, 1), self.proj[str(w)]).transpose(0, 1)
            parts.append(stack)
        return torch.cat(parts, 1)[:, self.order]


class DotInteraction(nn.Module):
    """DLRM's dot interaction (Naumov et al. 2019) over the input's feature vectors.

    ``x [B, Σ w_f + Dd]`` → ``[d, <v_i, v_j> for i < j]``: ``d = W x_dense [B, D]`` (the dense
    vector mapped to ``D``), and the dot products of every pair among ``d`` and the ``F`` field
    vectors (:class:`FieldEmbeddings`) — ``[B, D + C(F+1, 2)]``, TorchRec's
    :class:`~torchrec.models.dlrm.InteractionArch`. Without dense values the first field stands
    in for ``d``: ``[B, D + C(F, 2)]``.

    Args:
        widths: ``w_f`` per sparse feature, in input order.
        num_dense: Dd.

    Raises:
        ValueError: no sparse feature, or fewer than 2 fields (F + [Dd > 0]).

    Example::

        dot = DotInteraction([4, 4, 4], num_dense=2)
        dot(torch.randn(8, 14)).shape   # [8, 4 + 6]
    """

    def __init__(self, widths: list[int], num_dense: int) -> None:
        super().__init__()
        fields = len(widths) + (1 if num_dense else 0)
        if not widths or fields < 2:
            raise ValueError(
                f"dot interaction needs a sparse feature and 2 or more fields, got {len(widths)} "
                f"sparse feature(s) and {num_dense} dense value(s)"
            )
        self.fields = FieldEmbeddings(widths)
        self.sparse_width = sum(widths)
        self.dense = nn.Linear(num_dense, self.fields.dim) if num_dense else None
        self.arch = InteractionArch(len(widths) - (0 if num_dense else 1))
        self.out_dim = self.fields.dim + fields * (fields - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fields(x[:, : self.sparse_width])  # [B, F, D]
        if self.dense is None:
            return self.arch(v[:, 0], v[:, 1:])
        return self.arch(self.dense(x[:, self.sparse_width :]), v)


class FMInteraction(nn.Module):
    """The factorisation machine's second-order term (Rendle 2010), per embedding dimension.

    ``x [B, Σ w_f + Dd]`` → ``½((Σ_i v_i)² − Σ_i v_i²)`` ``[B, D]`` over the fields ``v_i``:
    each sparse feature's vector (:class:`FieldEmbeddings`) and ``x_j u_j`` for dense value
    ``j`` (a learned ``u_j ∈ R^D``, Rendle's factor of a real-valued feature). Its sum over D
    is ``Σ_{i<j} <v_i, v_j>`` (Rendle's Eq. 5); kept per dimension (NFM's bi-interaction
    pooling, He & Chua 2017) so the head can weigh the dimensions.

    Args:
        widths: ``w_f`` per sparse feature, in input order.
        num_dense: Dd.

    Raises:
        ValueError: no sparse feature, or fewer than 2 fields (F + Dd).

    Example::

        fm = FMInteraction([4, 4], num_dense=1)
        fm(torch.randn(8, 9)).shape   # [8, 4]
    """

    def __init__(self, widths: list[int], num_dense: int) -> None:
        super().__init__()
        if not widths or len(widths) + num_dense < 2:
            raise ValueError(
                f"fm interaction needs a sparse feature and 2 or more fields, got {len(widths)} "
                f"sparse feature(s) and {num_dense} dense value(s)"
            )
        self.fields = FieldEmbeddings(widths)
        self.sparse_width = sum(widths)
        self.dense = nn.Parameter(torch.randn(num_dense, self.fields.dim) * 0.01)  # [Dd, D]
        self.out_dim = self.fields.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fields(x[:, : self.sparse_width])  # [B, F, D]
        dense = x[:, self.sparse_width :]
        v = torch.cat([v, dense.unsqueeze(2) * self.dense], 1)  # [B, F + Dd, D]
        return 0.5 * (v.sum(1).square() - v.square().sum(1))


def init_mixture_per_expert(net: LowRankMixtureCrossNet) -> LowRankMixtureCrossNet:
    """Xavier-normal init of each expert's ``U`` ``[N, r]``, ``V`` ``[r, N]`` and ``C`` ``[r, r]``
    on its own, as DCN-V2's mixture (Wang et al. 2021) initialises every expert's matrices.
    TorchRec initialises the stacked ``[K, N, r]`` tensor at once, which counts r (or N) as a
    receptive field: a standard deviation ~√r times too small per matrix, so the three-factor
    cross term starts near 0 (~1e-3 of x) and barely trains in an epoch."""
    with torch.no_grad():
        for kernels in (net.U_kernels, net.V_kernels, net.C_kernels):
            for stacked in kernels:
                for expert in stacked:
                    nn.init.xavier_normal_(expert)
    return net


class Interaction(nn.Module):
    """The interaction stage: ``x [B, Din]`` → ``[x, op(x)]`` (concat, ``[B, Din + Dx]``) or
    ``op(x)`` (replace, ``[B, Dx]``).

    ``compute_dtype`` (set like the head's, :func:`mtl_dist.loop.precision.set_head_precision`) runs
    ``op`` under autocast; the result comes back float32.

    Args:
        op: maps ``[B, Din]`` to ``[B, Dx]``.
        in_dim: Din.
        op_dim: Dx.
        output: concat | replace.

    Raises:
        ValueError: ``output`` is neither concat nor replace.

    Example::

        stage = Interaction(CrossNet(10, num_layers=2), in_dim=10, op_dim=10)
        stage(torch.randn(8, 10)).shape   # [8, 20]: [x, cross(x)]
    """

    compute_dtype: torch.dtype | None = None

    def __init__(self, op: nn.Module, in_dim: int, op_dim: int, output: str = "concat") -> None:
        super().__init__()
        if output not in INTERACTION_OUTPUTS:
            raise ValueError(f"interaction output must be concat or replace, got {output!r}")
        self.op = op
        self.concat = output == "concat"
        self.out_dim = in_dim + op_dim if self.concat else op_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            y = self.op(x)
        else:
            with torch.autocast(x.device.type, dtype=self.compute_dtype):
                y = self.op(x).float()
        return torch.cat([x, y], 1) if self.concat else y


def build_interaction(
    m: InteractionConfig, widths: list[int], num_dense: int
) -> tuple[nn.Module, int]:
    """The configured interaction stage and the head's input width it yields.

    Args:
        m: ``[model.interaction]`` (``kind``, ``output``, ``cross_layers``,
            ``cross_low_rank``, ``cross_experts``).
        widths: ``w_f`` per sparse feature in the ranker's ``feature_order``.
        num_dense: Dd.

    Returns:
        ``(nn.Identity(), Din)`` for ``none``, else ``(Interaction, its out_dim)``.

    Raises:
        ValueError: an unknown option, or ``dot`` / ``fm`` without enough fields.

    Example::

        m = InteractionConfig(kind="dcn_v2_lowrank", cross_low_rank=4)
        stage, width = build_interaction(m, widths=[8, 8, 4], num_dense=3)   # width 2 · 23
        stage(torch.randn(5, 23)).shape   # [5, 46]
    """
    in_dim = sum(widths) + num_dense
    kind = m.kind
    if kind == "none":
        return nn.Identity(), in_dim
    if kind == "dot":
        op: nn.Module = DotInteraction(widths, num_dense)
        op_dim = op.out_dim
    elif kind == "fm":
        op = FMInteraction(widths, num_dense)
        op_dim = op.out_dim
    elif kind == "dcn_v2":
        op, op_dim = CrossNet(in_dim, m.cross_layers), in_dim
    elif kind == "dcn_v2_lowrank":
        op, op_dim = LowRankCrossNet(in_dim, m.cross_layers, m.cross_low_rank), in_dim
    elif kind == "dcn_mix":
        op = init_mixture_per_expert(
            LowRankMixtureCrossNet(in_dim, m.cross_layers, m.cross_experts, m.cross_low_rank)
        )
        op_dim = in_dim
    else:
        raise ValueError(f"unknown interaction {kind!r}: one of {', '.join(INTERACTIONS)}")
    stage = Interaction(op, in_dim, op_dim, m.output)
    return stage, stage.out_dim


class FeatureDropout(nn.Module):
    """Per-feature embedding dropout: in training, each sample's pooled embedding of each
    feature is zeroed whole with probability ``p`` and the kept ones scaled by ``1 / (1 − p)``
    (inverted dropout: the expected input is unchanged); the identity in eval mode or at p = 0.

    ``[B, Σ w_f]`` → ``[B, Σ w_f]``. A regulariser against the one-epoch phenomenon (Zhang et
    al. 2022: ranking models overfit on the second epoch through their embeddings): no task
    can lean on one feature's rows alone.

    Args:
        widths: ``w_f`` per feature, in input order.
        p: the drop probability, in [0, 1).

    Raises:
        ValueError: ``p`` outside [0, 1).

    Example::

        drop = FeatureDropout([4, 2], p=0.1).train()
        drop(torch.randn(8, 6))   # whole 4- or 2-column blocks zeroed, the rest x 1/0.9
    """

    def __init__(self, widths: list[int], p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"embedding dropout must lie in [0, 1), got {p}")
        self.p = p
        self.register_buffer(
            "column_feature",
            torch.repeat_interleave(
                torch.arange(len(widths)), torch.tensor(widths, dtype=torch.long)
            ),
            persistent=False,
        )  # [Σ w_f]: the feature each column belongs to
        self.num_features = len(widths)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return pooled
        keep = torch.rand(pooled.shape[0], self.num_features, device=pooled.device) >= self.p
        scale = keep.to(pooled.dtype) / (1 - self.p)  # [B, F]
        return pooled * scale[:, self.column_feature]
