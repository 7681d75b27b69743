"""Cross-field rules of the ``[model]`` section, one function per family: the head and its
head-specific keys, ESMM/ESCM2, experts, gates, feature interaction, embedding regularisers.

Each raises :class:`ConfigError` naming the key at fault; :func:`mtl_dist.config.validate` calls
them in :data:`MODEL_CHECKS` order.
"""

from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

from mtl_dist.config.base import ConfigError, check_choices, one_of, suggest
from mtl_dist.config.job import JobConfig
from mtl_dist.config.model import (
    DBMTL_BASES,
    ESMM_CVR_LABELS,
    EXPERT_ACTIVATIONS,
    EXPERT_NORMS,
    HEADS,
    INTERACTION_OUTPUTS,
    INTERACTIONS,
)
from mtl_dist.config.training import WEIGHT_DECAY_MODES


def task_parents(spec: list[str], task_names: list[str]) -> dict[str, list[str]]:
    """``model.dbmtl_parents`` (``["conversion:click", "watch_time:click+conversion"]``) as
    ``{task: [parents]}``; empty: each task's parent is the task before it.

    Raises:
        ConfigError: a malformed entry, an unknown task (with the close match), a task listed
            twice, or a cycle.
    """
    if not spec:
        return {t: [p] for p, t in zip(task_names, task_names[1:])}
    parents: dict[str, list[str]] = {}
    for entry in spec:
        child, sep, rest = entry.partition(":")
        names = [child, *rest.split("+")] if sep and rest else []
        if not names or not all(names):
            raise ConfigError(f"model.dbmtl_parents: {entry!r} is not task:parent+parent")
        for name in names:
            if name not in task_names:
                raise ConfigError(
                    f"model.dbmtl_parents: no task named {name!r}" + suggest(name, task_names)
                )
        if child in parents:
            raise ConfigError(f"model.dbmtl_parents: task {child!r} listed twice")
        parents[child] = names[1:]
    try:
        tuple(TopologicalSorter(parents).static_order())
    except CycleError as e:
        raise ConfigError(f"model.dbmtl_parents: a cycle {' -> '.join(e.args[1])}") from None
    return parents


# --------------------------------------------------------------------------- heads


def _check_aitm(cfg: JobConfig) -> None:
    kinds = {t.name: t.kind for t in cfg.tasks}
    chain = cfg.model.aitm_chain or [t.name for t in cfg.tasks if t.kind == "binary"]
    bad = [c for c in chain if kinds.get(c) != "binary"]
    if len(chain) < 2 or bad or len(set(chain)) != len(chain):
        raise ConfigError(
            f"model.aitm_chain {chain}: needs 2 or more distinct binary tasks"
            + (f"; not binary tasks: {bad}" + suggest(bad[0], list(kinds)) if bad else "")
        )


def _check_dbmtl(cfg: JobConfig) -> None:
    task_parents(cfg.model.dbmtl_parents, [t.name for t in cfg.tasks])
    check_choices(("model.dbmtl_base", cfg.model.dbmtl_base, DBMTL_BASES))
    if not cfg.model.tower_hidden or not cfg.model.dbmtl_relation_hidden:
        raise ConfigError("dbmtl: model.tower_hidden and dbmtl_relation_hidden need a layer")


def _check_pepnet(cfg: JobConfig) -> None:
    inputs = [f.name for f in cfg.features.sparse] + list(cfg.features.dense)
    for key in ("pepnet_domain_features", "pepnet_prior_features"):
        for name in getattr(cfg.model, key):
            if name not in inputs:
                raise ConfigError(f"model.{key}: no feature {name!r}" + suggest(name, inputs))
    if not cfg.model.pepnet_domain_features and not cfg.model.pepnet_prior_features:
        raise ConfigError(
            "model.head = pepnet needs model.pepnet_domain_features or pepnet_prior_features"
        )


# the heads with keys of their own that must agree with the tasks / features
HEAD_CHECKS = {"aitm": _check_aitm, "dbmtl": _check_dbmtl, "pepnet": _check_pepnet}


def check_head(cfg: JobConfig) -> None:
    """``model.head`` is one of :data:`HEADS`, and its own keys fit the tasks and features."""
    head = cfg.model.head
    if head not in HEADS:
        raise ConfigError(f"model.head: unknown head {head!r}" + suggest(head, HEADS))
    if head in HEAD_CHECKS:
        HEAD_CHECKS[head](cfg)
    feature_names = [f.name for f in cfg.features.sparse]
    for name in cfg.model.stem_features:
        if name not in feature_names:
            raise ConfigError(
                f"model.stem_features: no sparse feature {name!r}" + suggest(name, feature_names)
            )


# --------------------------------------------------------------------------- ESMM / ESCM2


def check_esmm(cfg: JobConfig) -> None:
    """ESMM's CTR and CVR tasks exist and are binary; ESCM2's risks need ESMM with cvr labels."""
    m = cfg.model
    task_names = [t.name for t in cfg.tasks]
    if m.esmm:
        for key in ("esmm_ctr_task", "esmm_cvr_task"):
            name = getattr(m, key)
            if name not in task_names:
                raise ConfigError(
                    f"model.{key}: no task named {name!r}" + suggest(name, task_names)
                )
            if next(t for t in cfg.tasks if t.name == name).kind != "binary":
                raise ConfigError(f"model.{key}: task {name!r} must be binary")
        cvr = next(t for t in cfg.tasks if t.name == m.esmm_cvr_task)
        if cvr.negative_rate < 1:
            i = cfg.tasks.index(cvr)
            raise ConfigError(
                f"tasks[{i}] ({cvr.name}).negative_rate = {cvr.negative_rate} with model.esmm: the "
                "CVR task trains only through pCTCVR on every exposure, so no negative of it "
                "would be dropped while its predictions would be 'corrected'; keep "
                "negative_rate = 1 for the ESMM CVR task (downsample the CTR task instead)"
            )
        if m.esmm_cvr_label not in ESMM_CVR_LABELS:
            raise ConfigError(
                f"model.esmm_cvr_label: {m.esmm_cvr_label!r} is not "
                + one_of(ESMM_CVR_LABELS, sep=" or ")
            )
    for key in ("escm2_ips", "escm2_dr"):
        value = getattr(m, key)
        if value < 0 or (value > 0 and not (m.esmm and m.esmm_cvr_label == "cvr")):
            raise ConfigError(
                f"model.{key} = {value}: must be >= 0, and > 0 needs model.esmm = true with "
                "esmm_cvr_label = cvr (the risk reweights the observed conversions)"
            )
    if m.escm2_ips > 0 and m.escm2_dr > 0:
        raise ConfigError(
            "model.escm2_ips and model.escm2_dr are both > 0: choose one form of ESCM2's risk "
            "(dr already contains the IPS-weighted term)"
        )


# --------------------------------------------------------------------------- experts and gates


def check_experts(cfg: JobConfig) -> None:
    """Expert activation / norm names, HoME's feature gate and self-gate."""
    m = cfg.model
    check_choices(
        ("model.expert_activation", m.expert_activation, EXPERT_ACTIVATIONS),
        ("model.expert_norm", m.expert_norm, EXPERT_NORMS),
    )
    if m.expert_feature_gate_rank < 0 or (
        m.expert_feature_gate_rank
        and m.head in ("omoe", "mmoe")
        and (0 < m.gate_top_k < m.num_experts or m.gate_gumbel)
    ):
        raise ConfigError(
            f"model.expert_feature_gate_rank = {m.expert_feature_gate_rank}: must be >= 0 "
            "and, > 0, not with top-k or Gumbel gates (their sparse dispatch shares one input)"
        )
    if m.expert_self_gate and (m.head not in ("ple", "stem") or m.ple_task_experts < 1):
        raise ConfigError(
            "model.expert_self_gate mixes each task's own experts: needs model.head = ple or stem "
            f"with ple_task_experts >= 1 (head {m.head!r}, "
            f"ple_task_experts {m.ple_task_experts})"
        )


def check_gates(cfg: JobConfig) -> None:
    """DSelect-k replaces the softmax gate; top-k lies in [0, num_experts]."""
    m = cfg.model
    if m.gate_dselect_k:
        clash = [k for k, on in (("gate_top_k", m.gate_top_k), ("gate_noisy", m.gate_noisy),
                                 ("gate_gumbel", m.gate_gumbel)) if on]  # fmt: skip
        if clash or m.gate_dselect_k < 0 or m.gate_dselect_gamma <= 0:
            raise ConfigError(
                f"model.gate_dselect_k = {m.gate_dselect_k} needs gate_dselect_gamma > 0 "
                f"and replaces the softmax gate: not with {', '.join(clash) or 'a negative k'}"
            )
    if m.gate_top_k < 0 or m.gate_top_k > max(m.num_experts, 1):
        raise ConfigError(f"model.gate_top_k: {m.gate_top_k} must lie in [0, num_experts]")


# --------------------------------------------------------------------------- interaction, embeddings


def check_interaction(cfg: JobConfig) -> None:
    """The interaction stage's names and sizes; dot / fm need enough fields to pair."""
    m = cfg.model
    check_choices(
        ("model.interaction", m.interaction, INTERACTIONS),
        ("model.interaction_output", m.interaction_output, INTERACTION_OUTPUTS),
    )
    for key in ("cross_layers", "cross_low_rank", "cross_experts"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
    sparse, dense = len(cfg.features.sparse), len(cfg.features.dense)
    fields = sparse + (min(dense, 1) if m.interaction == "dot" else dense)
    if m.interaction in ("dot", "fm") and (sparse < 1 or fields < 2):
        raise ConfigError(
            f"model.interaction = {m.interaction} needs a sparse feature and 2 or more fields "
            f"(sparse features, {'the dense vector' if m.interaction == 'dot' else 'dense values'}"
            f"), got {sparse} sparse and {dense} dense"
        )


def check_embedding_regularisers(cfg: JobConfig) -> None:
    """Embedding dropout and L2 (model), fused embedding weight decay (optim)."""
    m, o = cfg.model, cfg.optim
    if not 0 <= m.embedding_dropout < 1:
        raise ConfigError(f"model.embedding_dropout must lie in [0, 1), got {m.embedding_dropout}")
    if m.embedding_l2 < 0:
        raise ConfigError(f"model.embedding_l2 must be >= 0, got {m.embedding_l2}")
    check_choices(
        ("optim.embedding_weight_decay_mode", o.embedding_weight_decay_mode, WEIGHT_DECAY_MODES)
    )
    if o.embedding_weight_decay < 0 or (
        o.embedding_weight_decay > 0 and o.embedding_optimizer != "rowwise_adagrad"
    ):
        raise ConfigError(
            f"optim.embedding_weight_decay = {o.embedding_weight_decay}: must be >= 0, and > 0 "
            f"needs embedding_optimizer = rowwise_adagrad (fbgemm's fused adagrad and sgd "
            f"ignore weight decay), got {o.embedding_optimizer!r}"
        )


# in the order validate() runs them
MODEL_CHECKS = (
    check_head,
    check_esmm,
    check_experts,
    check_gates,
    check_interaction,
    check_embedding_regularisers,
)
