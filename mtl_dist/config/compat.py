"""The previous release's flat ``[model]`` keys (``model.gate_temperature``, ...), accepted for
one more release: :data:`FLAT_MODEL_KEYS` maps each to its key in the nested sections, and the
loader (TOML, ``--model.<old>`` overrides, :func:`~mtl_dist.config.from_dict` on an old
checkpoint's config) moves the value there with one warning naming the new key.
"""

from __future__ import annotations

import warnings
from typing import Any

from mtl_dist.config.base import ConfigError

# old flat key under [model] -> its dotted path under [model] now; the one place old keys live
FLAT_MODEL_KEYS: dict[str, str] = {
    "num_experts": "experts.num", "expert_hidden": "experts.hidden",
    "expert_activation": "experts.activation", "expert_norm": "experts.norm",
    "expert_feature_gate_rank": "experts.feature_gate_rank",
    "expert_self_gate": "experts.self_gate",
    "gate_temperature": "gate.temperature", "gate_hidden": "gate.hidden",
    "gate_top_k": "gate.top_k", "gate_noisy": "gate.noisy", "gate_gumbel": "gate.gumbel",
    "gate_uniform_init": "gate.uniform_init", "gate_dselect_k": "gate.dselect_k",
    "gate_dselect_gamma": "gate.dselect_gamma",
    "gate_dselect_entropy_coef": "gate.dselect_entropy_coef",
    "expert_dropout": "gate.expert_dropout", "gate_entropy_coef": "gate.entropy_coef",
    "load_balance_coef": "gate.load_balance_coef",
    "sparse_max_fraction": "gate.sparse_max_fraction",
    "tower_hidden": "tower.hidden", "tower_dropout": "tower.dropout",
    "tower_batch_norm": "tower.batch_norm", "bottom_hidden": "shared_bottom.hidden",
    "ple_levels": "ple.levels", "ple_shared_experts": "ple.shared_experts",
    "ple_task_experts": "ple.task_experts",
    "stem_features": "stem.features", "stem_dim": "stem.dim",
    "aitm_chain": "aitm.chain", "aitm_calibration": "aitm.calibration",
    "dbmtl_base": "dbmtl.base", "dbmtl_parents": "dbmtl.parents",
    "dbmtl_relation_hidden": "dbmtl.relation_hidden",
    "pepnet_domain_features": "pepnet.domain_features",
    "pepnet_prior_features": "pepnet.prior_features", "pepnet_gate_hidden": "pepnet.gate_hidden",
    "esmm": "esmm.enabled", "esmm_ctr_task": "esmm.ctr_task", "esmm_cvr_task": "esmm.cvr_task",
    "esmm_cvr_label": "esmm.cvr_label", "escm2_ips": "esmm.escm2_ips",
    "escm2_dr": "esmm.escm2_dr",
    "interaction": "interaction.kind", "interaction_output": "interaction.output",
    "cross_layers": "interaction.cross_layers", "cross_low_rank": "interaction.cross_low_rank",
    "cross_experts": "interaction.cross_experts",
    "embedding_dropout": "embedding.dropout", "embedding_l2": "embedding.l2",
}  # fmt: skip


def _warn(renamed: list[tuple[str, str]]) -> None:
    pairs = ", ".join(f"model.{old} -> model.{new}" for old, new in renamed)
    warnings.warn(
        f"flat [model] keys are deprecated and will be refused in the next release; "
        f"renamed: {pairs}",
        FutureWarning,
        stacklevel=4,
    )


def nest_model_keys(data: dict[str, Any], where: str = "model") -> dict[str, Any]:
    """``data`` (a ``[model]`` table) with every old flat key moved to its nested section, with
    one warning listing the renames. ``model.interaction`` / ``model.esmm`` are old keys when
    their value is not a table.

    Raises:
        ConfigError: an old key and its new key are both given.
    """
    old_keys = [k for k in FLAT_MODEL_KEYS if k in data and not isinstance(data[k], dict)]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in old_keys}
    renamed = [(old, FLAT_MODEL_KEYS[old]) for old in old_keys]
    for old, new in renamed:
        section, key = new.split(".")
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.{section}: expected a table, got {table!r}")
        if key in table:
            raise ConfigError(f"{where}.{old} and {where}.{new} are both set: keep {where}.{new}")
        table[key] = data[old]
    if renamed:
        _warn(renamed)
    return out


def nest_model_override(dotted: str) -> str:
    """``model.gate_temperature`` -> ``model.gate.temperature`` (with a warning); other keys
    unchanged."""
    section, _, key = dotted.partition(".")
    if section == "model" and key in FLAT_MODEL_KEYS:
        _warn([(key, FLAT_MODEL_KEYS[key])])
        return f"model.{FLAT_MODEL_KEYS[key]}"
    return dotted
