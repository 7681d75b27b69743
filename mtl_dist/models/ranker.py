"""The ranking model: embedding lookups + dense features → multi-task head → ``[B, T]``.

Single-process and parallelism-free; ``mtl_dist.distributed.sharding`` shards its
``EmbeddingBagCollection`` from outside. Built on the ``meta`` device, the tables take no memory
until the planner has placed their shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mtl_dist.data.batch import Batch
from mtl_dist.models.collision import feature_remappings, managed_rows
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes, RankerOutput
from mtl_dist.models.sequence import SequenceLookup


def model_body(
    interaction: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    own: torch.Tensor | None = None,
    probes: Probes = NO_PROBES,
) -> HeadOutput:
    """The model both :class:`~mtl_dist.models.ranker.Ranker` (training, evaluation) and the served program
    (:class:`mtl_dist.serve.served.ServedRanker`) run on the head's raw input ``x [B, Din]``
    (pooled embeddings ⊕ normalised dense): the interaction, then the head (STEM's with its
    task embeddings ``own [T, B, Dt]``) → :class:`HeadOutput` (``logits [B, T]``, ``aux [A]``)."""
    x = interaction(x)  # [B, Din'] (the identity without one)
    if own is None:
        return head(x, probes)
    return head(x, own, probes)


class Ranker(nn.Module):
    """Pooled embeddings ``[B, F·D]`` ⊕ dense ``[B, Dd]`` → interaction → head → outputs
    ``[B, T]`` + aux ``[A]``.

    Args:
        ebc: the EmbeddingBagCollection (plain, or sharded by DMP); None when every table is managed.
        num_dense: Dd.
        head: maps ``[B, Din]`` to a :class:`HeadOutput` (see ``models/heads.py``).
        dense_batch_norm: batch-normalise raw dense features.
        task_ebcs: STEM only: one EBC of task-specific tables per task (in task order); the
            head then also gets their pooled outputs ``[T, B, Dt]``.
        mc_ebc: the managed-collision tables (``collision = "managed"``: see
            ``models/collision.py``), plain or sharded; None without any.
        interaction: maps the head's raw input ``[B, Din]`` to what the head reads (see
            ``models/interaction.py``); None: the identity. ``head_input`` (attribution) is
            the raw input, so attribution still ranks the input features.
        embedding_dropout: applied to the pooled embeddings ``[B, Σ w_f]`` (a
            :class:`~mtl_dist.models.interaction.FeatureDropout`); None: the identity.
        embedding_l2: λ of the L2 penalty on the looked-up rows: a training forward returns
            ``penalty = λ/2 · mean_b ||pooled_b||²`` (:class:`RankerOutput`), which
            :class:`~mtl_dist.loop.losses.ModelWithLoss` adds to the loss. Taken after the
            gradient gate, so a skipped step (or fp16's loss scale) treats it as the task losses.
        sequences: the behaviour sequences' EC and attention (``models/sequence.py``); its
            blocks (the shared tables' candidates, then each sequence's pooled vector) follow
            the EBCs' in the head input. None without ``[[features.sequence]]``.

    ``ranker.probes`` (:class:`~mtl_dist.models.outputs.Probes`, set from outside: the loop,
    the telemetry, attribution) says which extras the forwards return in their
    :class:`RankerOutput`.

    Example::

        cfg = load_config(["--config", "configs/default.toml"])
        model = build_ranker(cfg, device=torch.device("cpu"))
        out = model(batch)   # RankerOutput: logits [B, T], aux [A], ...
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection | None,
        num_dense: int,
        head: nn.Module,
        dense_batch_norm: bool = True,
        task_ebcs: nn.ModuleDict | None = None,
        mc_ebc: ManagedCollisionEmbeddingBagCollection | None = None,
        interaction: nn.Module | None = None,
        embedding_dropout: nn.Module | None = None,
        embedding_l2: float = 0.0,
        sequences: SequenceLookup | None = None,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.sequences = sequences
        self.mc_ebc = mc_ebc
        self.task_ebcs = task_ebcs
        # the head sees features in the unsharded collections' order: a sharded EBC returns them
        # grouped by sharding type, an order that changes with the plan (and the world size)
        self.feature_order = feature_order(ebc, mc_ebc) + (sequences.names if sequences else [])
        # managed tables: the world size their remapping was trained at (its miss rows), which
        # the single-process path (scoring, export) reproduces; set from the checkpoint
        self.managed_buckets = 1
        self.task_feature_order = (
            [_embedding_names(e) for e in task_ebcs.values()] if task_ebcs is not None else []
        )
        self.dense_norm = (
            nn.BatchNorm1d(num_dense) if dense_batch_norm and num_dense else nn.Identity()
        )
        self.head = head
        self.interaction = interaction if interaction is not None else nn.Identity()
        self.embedding_dropout = (
            embedding_dropout if embedding_dropout is not None else nn.Identity()
        )
        self.embedding_l2 = embedding_l2
        # the head's input, where the trainer applies its update gate from outside
        # (:func:`mtl_dist.loop.guard.apply_update_gate`: drops the gradient into the tables of a
        # step whose update the non-finite guard closed); the identity in a plain model
        self.grad_gate: nn.Module = nn.Identity()
        self.dense_names = [f"dense_{i}" for i in range(num_dense)]
        self.probes = NO_PROBES  # the extras a forward returns (set from outside)
        # ESCM2-DR (``model.esmm.escm2_dr``): a tower [B, Din] → [B, 1] imputing each exposure's
        # conversion; its logits of a training forward ([B]) feed the loss
        self.imputation: nn.Module | None = None
        # feature admission's id counts (models/admission.py), set by build_ranker; no forward
        self.id_counts: nn.Module | None = None
        self.l2_frequency = False  # embedding_l2 weighted by inverse id frequency (id_counts)
        # the pooled embeddings' widths, in feature_order (the head input's column blocks)
        dims = {
            f: t.embedding_dim
            for e in (ebc, mc_ebc._embedding_module if mc_ebc is not None else None)
            if e is not None
            for t in e.embedding_bag_configs()
            for f in t.feature_names
        }
        dims.update(dict(zip(sequences.names, sequences.widths)) if sequences else {})
        self.feature_widths = [dims[f] for f in self.feature_order]

    @property
    def pooled_order(self) -> list[str]:
        """The EBCs' features in ``feature_order`` (the sequences' blocks follow them)."""
        return self.feature_order[: len(self.feature_order) - len(self.sequence_names)]

    @property
    def sequence_names(self) -> list[str]:
        return self.sequences.names if self.sequences is not None else []

    def input_blocks(self) -> tuple[list[str], list[int]]:
        """The column blocks of ``head_input`` ``[B, Din]``: feature names and widths (each
        sparse feature's pooled embedding, then each dense value)."""
        names = [*self.feature_order, *self.dense_names]
        return names, [*self.feature_widths, *[1] * len(self.dense_names)]

    def forward(self, batch: Batch) -> RankerOutput:
        kts = [self.ebc(batch.sparse)] if self.ebc is not None else []
        attention = None
        if self.mc_ebc is not None:
            kts.append(self.managed_lookup(batch.sparse))
        pooled = KeyedTensor.regroup(kts, [self.pooled_order])[0] if kts else None  # [B, Σ dims]
        if self.sequences is not None:  # the EC's candidates and pooled sequences, [B, S·D]
            seq, attention = self.sequences(batch.sparse, self.probes.attention, batch.floats)
            pooled = seq if pooled is None else torch.cat([pooled.float(), seq], dim=1)
        pooled = self.embedding_dropout(pooled.float())  # fp16 tables: fp32 from here
        x = self.grad_gate(torch.cat([pooled, self.dense_norm(batch.dense)], dim=1))  # [B, Din]
        penalty = imputation = None
        if self.embedding_l2 and self.training:  # L2 on the looked-up rows (ModelWithLoss adds it)
            penalty = 0.5 * self.embedding_l2 * self._l2_terms(x[:, : pooled.shape[1]], batch)
        if self.imputation is not None and self.training:  # no gradient into the input
            imputation = self.imputation(x.detach())[:, 0]
        own = None
        if self.task_ebcs is not None:  # STEM: each task's own tables, [T, B, Dt]
            own = self.grad_gate(
                torch.stack(
                    [
                        KeyedTensor.regroup([ebc(batch.sparse)], [order])[0].float()
                        for ebc, order in zip(self.task_ebcs.values(), self.task_feature_order)
                    ]
                )
            )
        out = model_body(self.interaction, self.head, x, own, self.probes)
        head_input = x if self.probes.head_input else None
        # indexed, not unpacked: TorchRec's pipeline FX-traces this forward
        return RankerOutput(
            out[0], out[1], penalty, imputation, out[2], out[3], out[4], head_input, attention
        )  # fmt: skip

    def _l2_terms(self, emb: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``mean_b Σ_f w_bf ||e_bf||²`` over the pooled embeddings ``[B, Σ w_f]``: ``w = 1``,
        or with ``l2_frequency`` the ids' inverse-frequency weights ``[B, F]``."""
        if not self.l2_frequency:
            return emb.square().sum(1).mean()
        # per-feature squared norms [B, F] (index_add, not a loop over split(): FX-traceable)
        blocks = emb.new_zeros(emb.shape[0], len(self.feature_widths))
        sq = blocks.index_add(1, self.feature_of_column, emb.square())
        w = self.id_counts.frequency_weights(batch.sparse, self.feature_order)  # [B, F]
        return (w * sq).sum(1).mean()

    def managed_lookup(self, sparse: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of the managed features. Training, or sharded: the MC-EBC (which
        admits ids while training). A single-process model in eval mode maps ids with
        :func:`managed_rows` instead, so an id unknown to the table reads the miss row it
        trained with (each rank had its own) and scores equal what training saw."""
        mc = self.mc_ebc
        if self.training or not isinstance(mc, ManagedCollisionEmbeddingBagCollection):
            return mc(sparse)[0]
        ebc = mc._embedding_module
        names = _embedding_names(ebc)
        jts = sparse.to_dict()
        remap = feature_remappings(mc)
        values, lengths = [], []
        for f in names:
            values.append(managed_rows(jts[f].values(), *remap[f], self.managed_buckets))
            lengths.append(jts[f].lengths())
        kjt = KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=torch.cat(lengths))
        return ebc(kjt)


def feature_order(
    ebc: EmbeddingBagCollection | None,
    mc_ebc: ManagedCollisionEmbeddingBagCollection | None,
) -> list[str]:
    """The order of the pooled embeddings in the head's input: the plain tables' features,
    then the managed ones, each as an unsharded collection outputs them."""
    return _embedding_names(ebc) + _embedding_names(
        mc_ebc._embedding_module if mc_ebc is not None else None
    )


def _embedding_names(ebc: EmbeddingBagCollection | None) -> list[str]:
    """Feature names in the order an unsharded EBC outputs them (table by table)."""
    if ebc is None:
        return []
    return [f for table in ebc.embedding_bag_configs() for f in table.feature_names]
