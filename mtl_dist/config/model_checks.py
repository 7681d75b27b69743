"""Cross-field rules of the ``[model]`` section, one check per nested section (the head and
its head-specific sections, ESMM/ESCM2, experts, gates, feature interaction, embedding
regularisers), registered in :data:`MODEL_CHECKS` by the section they guard.

Each raises :class:`ConfigError` naming the key at fault; :func:`mtl_dist.config.validate` runs
them in :data:`MODEL_CHECKS` order. The choice keys' names are checked at parse (their
``Literal`` types), not here.
"""

from __future__ import annotations

from collections.abc import Callable
from graphlib import CycleError, TopologicalSorter

from mtl_dist.config.base import ConfigError, check_choices, suggest
from mtl_dist.config.job import JobConfig
from mtl_dist.config.training import WEIGHT_DECAY_MODES


def task_parents(spec: list[str], task_names: list[str]) -> dict[str, list[str]]:
    """``model.dbmtl.parents`` (``["conversion:click", "watch_time:click+conversion"]``) as
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
            raise ConfigError(f"model.dbmtl.parents: {entry!r} is not task:parent+parent")
        for name in names:
            if name not in task_names:
                raise ConfigError(
                    f"model.dbmtl.parents: no task named {name!r}" + suggest(name, task_names)
                )
        if child in parents:
            raise ConfigError(f"model.dbmtl.parents: task {child!r} listed twice")
        parents[child] = names[1:]
    try:
        tuple(TopologicalSorter(parents).static_order())
    except CycleError as e:
        raise ConfigError(f"model.dbmtl.parents: a cycle {' -> '.join(e.args[1])}") from None
    return parents


# --------------------------------------------------------------------------- heads


def check_aitm(cfg: JobConfig) -> None:
    """``model.aitm.chain`` (head aitm): 2 or more distinct binary tasks."""
    if cfg.model.head != "aitm":
        return
    kinds = {t.name: t.kind for t in cfg.tasks}
    chain = cfg.model.aitm.chain or [t.name for t in cfg.tasks if t.kind == "binary"]
    bad = [c for c in chain if kinds.get(c) != "binary"]
    if len(chain) < 2 or bad or len(set(chain)) != len(chain):
        raise ConfigError(
            f"model.aitm.chain {chain}: needs 2 or more distinct binary tasks"
            + (f"; not binary tasks: {bad}" + suggest(bad[0], list(kinds)) if bad else "")
        )


def check_dbmtl(cfg: JobConfig) -> None:
    """``[model.dbmtl]`` (head dbmtl): the parents name tasks, without a cycle; layers to relate."""
    if cfg.model.head != "dbmtl":
        return
    task_parents(cfg.model.dbmtl.parents, [t.name for t in cfg.tasks])
    if not cfg.model.tower.hidden or not cfg.model.dbmtl.relation_hidden:
        raise ConfigError("dbmtl: model.tower.hidden and model.dbmtl.relation_hidden need a layer")


def check_pepnet(cfg: JobConfig) -> None:
    """``[model.pepnet]`` (head pepnet): its features exist, and one of the two lists is set."""
    if cfg.model.head != "pepnet":
        return
    p = cfg.model.pepnet
    inputs = [f.name for f in cfg.features.sparse] + list(cfg.features.dense)
    inputs += [s.name for s in cfg.features.sequence]  # a pooled sequence is an input too
    for key in ("domain_features", "prior_features"):
        for name in getattr(p, key):
            if name not in inputs:
                raise ConfigError(
                    f"model.pepnet.{key}: no feature {name!r}" + suggest(name, inputs)
                )
    if not p.domain_features and not p.prior_features:
        raise ConfigError(
            "model.head = pepnet needs model.pepnet.domain_features or model.pepnet.prior_features"
        )


def check_stem(cfg: JobConfig) -> None:
    """``model.stem.features`` name sparse features."""
    feature_names = [f.name for f in cfg.features.sparse]
    for name in cfg.model.stem.features:
        if name not in feature_names:
            raise ConfigError(
                f"model.stem.features: no sparse feature {name!r}" + suggest(name, feature_names)
            )


# --------------------------------------------------------------------------- ESMM / ESCM2


def check_esmm(cfg: JobConfig) -> None:
    """ESMM's CTR and CVR tasks exist and are binary; ESCM2's risks need ESMM with cvr labels."""
    m = cfg.model.esmm
    task_names = [t.name for t in cfg.tasks]
    if m.enabled:
        for key in ("ctr_task", "cvr_task"):
            name = getattr(m, key)
            if name not in task_names:
                raise ConfigError(
                    f"model.esmm.{key}: no task named {name!r}" + suggest(name, task_names)
                )
            if next(t for t in cfg.tasks if t.name == name).kind != "binary":
                raise ConfigError(f"model.esmm.{key}: task {name!r} must be binary")
        cvr = next(t for t in cfg.tasks if t.name == m.cvr_task)
        if cvr.negative_rate < 1:
            i = cfg.tasks.index(cvr)
            raise ConfigError(
                f"tasks[{i}] ({cvr.name}).negative_rate = {cvr.negative_rate} with "
                "model.esmm.enabled: the CVR task trains only through pCTCVR on every exposure, "
                "so no negative of it would be dropped while its predictions would be "
                "'corrected'; keep negative_rate = 1 for the ESMM CVR task (downsample the CTR "
                "task instead)"
            )
    for key in ("escm2_ips", "escm2_dr"):
        value = getattr(m, key)
        if value < 0 or (value > 0 and not (m.enabled and m.cvr_label == "cvr")):
            raise ConfigError(
                f"model.esmm.{key} = {value}: must be >= 0, and > 0 needs model.esmm.enabled = "
                "true with model.esmm.cvr_label = cvr (the risk reweights the observed "
                "conversions)"
            )
    if m.escm2_ips > 0 and m.escm2_dr > 0:
        raise ConfigError(
            "model.esmm.escm2_ips and model.esmm.escm2_dr are both > 0: choose one form of "
            "ESCM2's risk (dr already contains the IPS-weighted term)"
        )


# --------------------------------------------------------------------------- experts and gates


def check_experts(cfg: JobConfig) -> None:
    """HoME's feature gate and self-gate."""
    m, e = cfg.model, cfg.model.experts
    if e.feature_gate_rank < 0 or (
        e.feature_gate_rank
        and m.head in ("omoe", "mmoe")
        and (0 < m.gate.top_k < e.num or m.gate.gumbel)
    ):
        raise ConfigError(
            f"model.experts.feature_gate_rank = {e.feature_gate_rank}: must be >= 0 and, > 0, "
            "not with top-k or Gumbel gates (their sparse dispatch shares one input)"
        )
    if e.self_gate and (m.head not in ("ple", "stem") or m.ple.task_experts < 1):
        raise ConfigError(
            "model.experts.self_gate mixes each task's own experts: needs model.head = ple or "
            f"stem with model.ple.task_experts >= 1 (head {m.head!r}, "
            f"ple.task_experts {m.ple.task_experts})"
        )


def check_gate(cfg: JobConfig) -> None:
    """DSelect-k replaces the softmax gate; top-k lies in [0, model.experts.num]."""
    g = cfg.model.gate
    if g.dselect_k:
        clash = [f"model.gate.{k}" for k, on in (("top_k", g.top_k), ("noisy", g.noisy),
                                                 ("gumbel", g.gumbel)) if on]  # fmt: skip
        if clash or g.dselect_k < 0 or g.dselect_gamma <= 0:
            raise ConfigError(
                f"model.gate.dselect_k = {g.dselect_k} needs model.gate.dselect_gamma > 0 "
                f"and replaces the softmax gate: not with {', '.join(clash) or 'a negative k'}"
            )
    if g.top_k < 0 or g.top_k > max(cfg.model.experts.num, 1):
        raise ConfigError(f"model.gate.top_k: {g.top_k} must lie in [0, model.experts.num]")


# --------------------------------------------------------------------------- interaction, embeddings


def check_interaction(cfg: JobConfig) -> None:
    """The interaction stage's sizes; dot / fm need enough fields to pair."""
    m = cfg.model.interaction
    for key in ("cross_layers", "cross_low_rank", "cross_experts"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.interaction.{key} must be >= 1, got {getattr(m, key)}")
    sparse, dense = len(cfg.features.sparse), len(cfg.features.dense)
    fields = sparse + (min(dense, 1) if m.kind == "dot" else dense)
    if m.kind in ("dot", "fm") and (sparse < 1 or fields < 2):
        raise ConfigError(
            f"model.interaction.kind = {m.kind} needs a sparse feature and 2 or more fields "
            f"(sparse features, {'the dense vector' if m.kind == 'dot' else 'dense values'}"
            f"), got {sparse} sparse and {dense} dense"
        )


def check_embedding_regularisers(cfg: JobConfig) -> None:
    """Embedding dropout and L2 (``[model.embedding]``), fused embedding weight decay (optim)."""
    m, o = cfg.model.embedding, cfg.optim
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.embedding.dropout must lie in [0, 1), got {m.dropout}")
    if m.l2 < 0:
        raise ConfigError(f"model.embedding.l2 must be >= 0, got {m.l2}")
    if m.l2_frequency and not m.l2 > 0:
        raise ConfigError(f"model.embedding.l2_frequency needs model.embedding.l2 > 0, got {m.l2}")
    managed = [f.name for f in cfg.features.sparse if f.collision == "managed"]
    if m.l2_frequency and managed:
        raise ConfigError(
            f"model.embedding.l2_frequency counts ids per row, but {managed} use collision = "
            "'managed' (raw ids, no fixed rows): drop one of them"
        )
    if m.l2_frequency and cfg.data.train_filter:
        raise ConfigError(
            "model.embedding.l2_frequency counts the whole training path, but data.train_filter "
            f"= {cfg.data.train_filter!r} selects part of it: drop one of them"
        )
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


# the [model] section each check guards -> the check, in the order validate() runs them
MODEL_CHECKS: dict[str, Callable[[JobConfig], None]] = {
    "aitm": check_aitm,
    "dbmtl": check_dbmtl,
    "pepnet": check_pepnet,
    "stem": check_stem,
    "esmm": check_esmm,
    "experts": check_experts,
    "gate": check_gate,
    "interaction": check_interaction,
    "embedding": check_embedding_regularisers,
}
