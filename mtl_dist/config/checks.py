""":func:`validate`: the cross-field checks types alone cannot express, one function per section
(the model's families are in :mod:`mtl_dist.config.model_checks`), and the integer ranges.

Not checked here: the syntax of ``data.train_filter`` / ``val_filter`` (this package imports
nothing from mtl_dist outside it); the train entry point parses them with
``mtl_dist.data.source.RowFilter.parse`` at start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from mtl_dist.config.base import ConfigError, check_choices, claim_name, one_of, suggest
from mtl_dist.config.data import (
    COLLISIONS,
    DENSE_NANS,
    EVICTIONS,
    INVALID_IDS,
    ON_INVALID,
    POOLINGS,
    TASK_KINDS,
    TRANSFORMS,
    SparseFeature,
)
from mtl_dist.config.job import JobConfig
from mtl_dist.config.model_checks import MODEL_CHECKS
from mtl_dist.config.runtime import ON_POLARIZATION, SHARDING_TYPES
from mtl_dist.config.sequence import check_sequences
from mtl_dist.config.training import (
    BALANCERS,
    BEST_METRICS,
    CPU_AFFINITIES,
    DATA_TYPES,
    DEVICES,
    EMBEDDING_OPTIMIZERS,
    ON_NONFINITE,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
)


def _expect(key: str, value: str, allowed: tuple[str, ...], close: bool = False) -> None:
    """``<key>: expected a | b, got 'x'`` (with the close match if ``close``)."""
    if value not in allowed:
        raise ConfigError(
            f"{key}: expected {one_of(allowed)}, got {value!r}"
            + (suggest(value, allowed) if close else "")
        )


# --------------------------------------------------------------------------- features, tasks


def _check_collision(f: SparseFeature, where: str, cfg: JobConfig) -> None:
    """``collision`` / ``eviction`` keys of one sparse feature (managed collision's limits)."""
    check_choices(
        (f"{where}: collision", f.collision, COLLISIONS),
        (f"{where}: eviction", f.eviction, EVICTIONS),
    )
    if f.admit_min_count and f.collision == "managed":
        raise ConfigError(
            f"{where}: admit_min_count = {f.admit_min_count} with collision = 'managed' (which "
            "admits ids itself): set one of them"
        )
    if f.admit_min_count and cfg.data.train_filter:
        raise ConfigError(
            f"{where}: admit_min_count counts the whole training path, but data.train_filter = "
            f"{cfg.data.train_filter!r} selects part of it: drop one of them"
        )
    if f.collision != "managed":
        return
    if not f.hash_buckets:
        raise ConfigError(
            f"{where}: collision = 'managed' needs hash_buckets = N (the table's rows)"
        )
    if f.eviction_interval < 1:
        raise ConfigError(f"{where}: eviction_interval must be >= 1, got {f.eviction_interval}")
    if cfg.model.head == "stem" and f.name in (cfg.model.stem.features or [f.name]):
        raise ConfigError(
            f"{where}: a collision = 'managed' feature cannot have STEM's per-task tables (each "
            "would need an id remapping of its own): list model.stem.features without it"
        )
    if cfg.sharding.force and cfg.sharding.force != "row_wise":
        raise ConfigError(
            f"{where}: collision = 'managed' tables shard row_wise only, but sharding.force = "
            f"{cfg.sharding.force!r}"
        )


def _check_shared_tables(cfg: JobConfig) -> None:
    """Features naming one table agree on its rows, dim, pooling and collision."""
    tables: dict[str, SparseFeature] = {}
    for f in cfg.features.sparse:
        other = tables.setdefault(f.table_name, f)
        if (other.num_rows, other.embedding_dim, other.pooling, other.collision) != (
            f.num_rows,
            f.embedding_dim,
            f.pooling,
            f.collision,
        ):
            raise ConfigError(
                f"features.sparse: '{f.name}' and '{other.name}' share table '{f.table_name}' but differ "
                f"in rows/dim/pooling/collision ({f.num_rows}x{f.embedding_dim} {f.pooling} "
                f"{f.collision} vs {other.num_rows}x{other.embedding_dim} {other.pooling} "
                f"{other.collision})" + _admission_note(f, other)
            )


def _admission_note(f: SparseFeature, other: SparseFeature) -> str:
    if bool(f.admit_min_count) == bool(other.admit_min_count):
        return ""
    return (
        f"; admit_min_count ({f.admit_min_count} vs {other.admit_min_count}) adds the shared "
        "OOV row: set it on both or neither"
    )


def check_features(cfg: JobConfig) -> None:
    """At least one feature; each sparse feature named once, sized, with known choices."""
    if not cfg.features.sparse and not cfg.features.dense:
        raise ConfigError("features: no sparse or dense features configured")
    names = set()
    for i, f in enumerate(cfg.features.sparse):
        where = f"features.sparse[{i}] ({f.name or '?'})"
        claim_name(names, f.name, where)
        if f.num_rows <= 0:
            raise ConfigError(f"{where}: set vocab_size or hash_buckets > 0")
        if f.embedding_dim <= 0:
            raise ConfigError(f"{where}: embedding_dim must be > 0")
        if f.pooling not in POOLINGS:
            raise ConfigError(
                f"{where}: pooling must be {one_of(POOLINGS, sep=' or ')}, got {f.pooling!r}"
            )
        check_choices((f"{where}: invalid_ids", f.invalid_ids, INVALID_IDS))
        _check_collision(f, where, cfg)
    _check_shared_tables(cfg)


def check_tasks(cfg: JobConfig) -> None:
    """At least one task; each named, labelled, with known choices; names unique."""
    if len(cfg.tasks) < 1:
        raise ConfigError("tasks: at least one [[tasks]] entry is required")
    for i, t in enumerate(cfg.tasks):
        where = f"tasks[{i}] ({t.name or '?'})"
        if not t.name or not t.label:
            raise ConfigError(f"{where}: 'name' and 'label' are required")
        for key, allowed in (("kind", TASK_KINDS), ("transform", TRANSFORMS),
                             ("on_invalid", ON_INVALID)):  # fmt: skip
            value = getattr(t, key)
            if value not in allowed:
                raise ConfigError(
                    f"{where}: {key} must be {one_of(allowed, sep=' or ')}, got {value!r}"
                )
        if not 0 < t.negative_rate <= 1:
            raise ConfigError(f"{where}: negative_rate must lie in (0, 1], got {t.negative_rate}")
        if t.negative_rate < 1 and t.kind != "binary":
            raise ConfigError(f"{where}: negative_rate applies to binary tasks only")
        if t.condition:
            others = {o.name: o for o in cfg.tasks if o is not t}
            if t.condition not in others or others[t.condition].kind != "binary":
                raise ConfigError(
                    f"{where}: condition {t.condition!r} must name another binary task"
                    + suggest(t.condition, list(others))
                )
    if len({t.name for t in cfg.tasks}) != len(cfg.tasks):
        raise ConfigError("tasks: task names must be unique")


# --------------------------------------------------------------------------- the other sections


def check_loss(cfg: JobConfig) -> None:
    loss = cfg.loss
    if loss.balancer not in BALANCERS:
        raise ConfigError(
            f"loss.balancer: unknown balancer {loss.balancer!r}" + suggest(loss.balancer, BALANCERS)
        )
    if not 0 <= loss.cagrad_c < 1:
        raise ConfigError(f"loss.cagrad_c must lie in [0, 1), got {loss.cagrad_c}")
    if loss.stch_mu <= 0:
        raise ConfigError(f"loss.stch_mu must be > 0, got {loss.stch_mu}")
    if loss.balancer == "dwa" and loss.dwa_period <= 0:
        raise ConfigError("loss.dwa_period must be > 0")


def check_monitor_and_checkpoint(cfg: JobConfig) -> None:
    _expect("monitor.on_polarization", cfg.monitor.on_polarization, ON_POLARIZATION)
    if cfg.checkpoint.keep < 1 or cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.keep must be >= 1 and checkpoint.every >= 0")


def check_optim(cfg: JobConfig) -> None:
    """Optimizer and schedule names, schedule shapes, clipping."""
    o = cfg.optim
    if o.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"optim.embedding_optimizer: {o.embedding_optimizer!r} is not a fused CPU/GPU "
            f"optimizer ({one_of(EMBEDDING_OPTIMIZERS)})"
        )
    if o.dense_optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.dense_optimizer: unknown optimizer {o.dense_optimizer!r}")
    for part in ("dense", "embedding"):
        kind = getattr(o, f"{part}_schedule")
        if kind not in SCHEDULES:
            raise ConfigError(
                f"optim.{part}_schedule: unknown schedule {kind!r}" + suggest(kind, SCHEDULES)
            )
        if getattr(o, f"{part}_warmup_steps") < 0:
            raise ConfigError(f"optim.{part}_warmup_steps must be >= 0")
    if o.schedule_step_size < 1 or not 0 < o.schedule_gamma <= 1:
        raise ConfigError("optim.schedule_step_size must be >= 1 and schedule_gamma in (0, 1]")
    if not 0 <= o.schedule_min_ratio <= 1 or o.clip_grad_norm < 0:
        raise ConfigError("optim.schedule_min_ratio must lie in [0, 1], clip_grad_norm >= 0")


def check_data_sharding_embedding(cfg: JobConfig) -> None:
    for st in [*cfg.sharding.sharding_types, *([cfg.sharding.force] if cfg.sharding.force else [])]:
        if st not in SHARDING_TYPES:
            raise ConfigError(
                f"sharding: unknown sharding type {st!r}" + suggest(st, SHARDING_TYPES)
            )
    if cfg.sharding.ddp_bucket_cap_mb < 1:
        raise ConfigError(
            f"sharding.ddp_bucket_cap_mb must be >= 1 MiB, got {cfg.sharding.ddp_bucket_cap_mb}"
        )
    _expect("data.dense_nan", cfg.data.dense_nan, DENSE_NANS)
    _expect("embedding.data_type", cfg.embedding.data_type, DATA_TYPES)


def _check_best_metric(cfg: JobConfig) -> None:
    """``train.best_metric`` names a configured task's metric; gauc needs ``train.gauc_by``."""
    best = cfg.train.best_metric
    task_name, _, metric = best.partition("/")
    task = next((t for t in cfg.tasks if t.name == task_name), None)
    metrics = BEST_METRICS[task.kind] if task else ()
    if task is None or metric not in metrics:
        known = [f"{t.name}/{m}" for t in cfg.tasks for m in BEST_METRICS[t.kind]]
        raise ConfigError(
            f"train.best_metric: {best!r} is not '<task>/<metric>' of a configured task"
            + suggest(best, known)
        )
    if metric == "gauc" and not cfg.train.gauc_by:
        raise ConfigError(
            f"train.best_metric = {best!r}: GAUC is computed only when validation rows are "
            "grouped: set train.gauc_by (the group id column, e.g. user_id), or choose another "
            "metric"
        )


def check_train(cfg: JobConfig) -> None:
    tr = cfg.train
    if tr.batch_size <= 0:
        raise ConfigError("train.batch_size must be > 0")
    _expect("train.on_nonfinite", tr.on_nonfinite, ON_NONFINITE, close=True)
    _expect("train.precision", tr.precision, PRECISIONS, close=True)
    if tr.best_metric:
        _check_best_metric(cfg)
    if tr.early_stop_patience < 0 or (tr.early_stop_patience and not tr.best_metric):
        raise ConfigError("train.early_stop_patience needs train.best_metric (and must be >= 0)")
    if tr.max_nonfinite < 1:
        raise ConfigError(f"train.max_nonfinite must be >= 1, got {tr.max_nonfinite}")
    _expect("train.device", tr.device, DEVICES)
    _expect("train.cpu_affinity", tr.cpu_affinity, CPU_AFFINITIES, close=True)


# --------------------------------------------------------------------------- integer ranges

_I64 = 1 << 63  # the upper bound of every other integer key: ids, sizes and counts are int64
# integer keys with a range, [low, high): refused outside it naming the key and the range (a
# value that would wrap silently: an xxh3 seed is a uint64, numpy's seed a uint32)
INT_RANGES: dict[str, tuple[int, int]] = {
    "data.num_workers": (0, _I64), "data.prefetch_batches": (1, _I64),
    "data.hash_seed": (0, 1 << 64),
    "model.experts.num": (1, _I64), "model.experts.feature_gate_rank": (0, _I64),
    "model.ple.levels": (1, _I64), "model.ple.shared_experts": (0, _I64),
    "model.ple.task_experts": (0, _I64), "model.pepnet.gate_hidden": (1, _I64),
    "model.stem.dim": (1, _I64), "model.gate.top_k": (0, _I64),
    "model.gate.dselect_k": (0, _I64), "model.interaction.cross_layers": (1, _I64),
    "model.interaction.cross_low_rank": (1, _I64),
    "model.interaction.cross_experts": (1, _I64),
    "optim.dense_warmup_steps": (0, _I64), "optim.embedding_warmup_steps": (0, _I64),
    "optim.schedule_step_size": (1, _I64), "loss.dwa_period": (1, _I64),
    "monitor.gate_every": (0, _I64), "monitor.heatmap_every": (0, _I64),
    "monitor.conflict_every": (0, _I64), "monitor.attribution_batches": (1, _I64),
    "monitor.profile_steps": (0, _I64), "monitor.profile_after": (0, _I64),
    "checkpoint.every": (0, _I64), "checkpoint.keep": (1, _I64),
    "train.batch_size": (1, _I64), "train.epochs": (1, _I64), "train.max_steps": (0, _I64),
    "train.val_every": (0, _I64), "train.val_max_batches": (0, _I64),
    "train.log_every": (1, _I64), "train.seed": (0, 1 << 32), "train.threads": (0, _I64),
    "train.early_stop_patience": (0, _I64), "train.max_nonfinite": (1, _I64),
}  # fmt: skip
SPARSE_INT_RANGES = {
    "vocab_size": (0, _I64), "hash_buckets": (0, _I64), "embedding_dim": (1, _I64),
    "eviction_interval": (1, _I64), "admit_min_count": (0, _I64),
}  # fmt: skip
# list[int] keys: layer widths, each >= 1
WIDTH_LISTS = ("model.experts.hidden", "model.shared_bottom.hidden", "model.tower.hidden",
               "model.gate.hidden", "model.dbmtl.relation_hidden")  # fmt: skip


def _get(cfg: JobConfig, dotted: str) -> Any:
    """``cfg.<dotted>`` (``model.gate.top_k``)."""
    return functools.reduce(getattr, dotted.split("."), cfg)


def check_literals(cfg: Any, where: str = "") -> None:
    """Every choice key (a ``Literal`` type) holds an allowed name: the parser checks TOML and
    the command line, this a config built in Python (``ModelConfig(head=...)``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_literals(value, path)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            allowed = typing.get_args(hints[f.name])
            if value not in allowed:
                raise ConfigError(
                    f"{path}: expected {one_of(allowed)}, got {value!r}"
                    + suggest(str(value), allowed)
                )


def _bound(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 1 and n & (n - 1) == 0 else str(n)


def _check_range(key: str, value: int, low: int, high: int) -> None:
    if not low <= value < high:
        raise ConfigError(f"{key} = {value}: must lie in [{low}, {_bound(high)})")


def check_int_ranges(cfg: JobConfig) -> None:
    """Every integer key with a range (:data:`INT_RANGES`, the sparse features' sizes, the
    layer widths): a value outside it is refused, naming the key and the range."""
    for key, (low, high) in INT_RANGES.items():
        _check_range(key, _get(cfg, key), low, high)
    for key in WIDTH_LISTS:
        for i, width in enumerate(_get(cfg, key)):
            _check_range(f"{key}[{i}]", width, 1, _I64)
    for i, f in enumerate(cfg.features.sparse):
        for name, (low, high) in SPARSE_INT_RANGES.items():
            _check_range(f"features.sparse[{i}] ({f.name or '?'}).{name}", getattr(f, name), low,
                         high)  # fmt: skip


SECTION_CHECKS = (
    check_literals,
    *MODEL_CHECKS.values(),
    check_features,
    check_sequences,
    check_tasks,
    check_loss,
    check_monitor_and_checkpoint,
    check_optim,
    check_data_sharding_embedding,
    check_train,
    check_int_ranges,  # last: the specific checks above keep their messages
)


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express.

    Runs the choice keys' check, the model families' rules
    (:data:`~mtl_dist.config.model_checks.MODEL_CHECKS`), then one check per section
    (:data:`SECTION_CHECKS`), the integer ranges last.

    Raises:
        ConfigError: the first rule broken, naming the key at fault.
    """
    for check in SECTION_CHECKS:
        check(cfg)
