"""One typed config tree: dataclasses, loaded from TOML, overridden from the command line.

This package's job: describe a job as a :class:`JobConfig` and refuse a bad one at startup.
Values come from, in order: the dataclass defaults, a TOML file (``--config configs/X.toml``),
then ``--section.key value`` overrides. Unknown keys and values of the wrong type are rejected
with a message naming the key (and the closest valid key), so a typo never silently trains the
wrong model. It imports nothing from mtl_dist outside ``mtl_dist.config`` (only the standard
library), so every other package may import it.

Files:
    base.py          ConfigError, ``opt`` fields, the choices helpers
    data.py          [data], [features] ([[features.sparse]]), [[tasks]]
    model.py         [model] and its nested sections ([model.gate], [model.experts], ...); the
                     choice keys' ``Literal`` types (HEADS, INTERACTIONS, ... their get_args)
    compat.py        the previous release's flat [model] keys -> the nested ones (one table)
    training.py      [optim], [embedding], [loss], [train] (OPTIMIZERS, SCHEDULES, BALANCERS, ...)
    runtime.py       [monitor], [checkpoint], [sharding] (SHARDING_TYPES)
    job.py           JobConfig, the root
    model_checks.py  the model sections' cross-field rules, keyed by section (MODEL_CHECKS)
    checks.py        validate(): the model checks, one check per section, the integer ranges
    load.py          TOML, ``--section.key`` overrides, ``--help``, to_dict / from_dict

Example::

    cfg = load_config(["--config", "configs/default.toml", "--model.experts.num", "8"])
    cfg.model.experts.num  # 8
"""

from mtl_dist.config.base import ConfigError, opt
from mtl_dist.config.checks import INT_RANGES, SPARSE_INT_RANGES, WIDTH_LISTS, validate
from mtl_dist.config.compat import FLAT_MODEL_KEYS
from mtl_dist.config.data import (
    COLLISIONS,
    DENSE_NANS,
    EVICTIONS,
    FLOAT_TRANSFORMS,
    INVALID_IDS,
    ON_INVALID,
    POOLINGS,
    SEQUENCE_POOLINGS,
    TASK_KINDS,
    TRANSFORMS,
    DataConfig,
    FeaturesConfig,
    SequenceFeature,
    SparseFeature,
    TaskSpec,
)
from mtl_dist.config.job import JobConfig
from mtl_dist.config.load import (
    apply_override,
    from_dict,
    help_text,
    load_config,
    load_toml,
    to_dict,
)
from mtl_dist.config.model import (
    DBMTL_BASES,
    ESMM_CVR_LABELS,
    EXPERT_ACTIVATIONS,
    EXPERT_NORMS,
    HEADS,
    INTERACTION_OUTPUTS,
    INTERACTIONS,
    AITMConfig,
    DBMTLConfig,
    ESMMConfig,
    ExpertsConfig,
    GateConfig,
    InteractionConfig,
    ModelConfig,
    ModelEmbeddingConfig,
    PEPNetConfig,
    PLEConfig,
    SharedBottomConfig,
    STEMConfig,
    TowerConfig,
)
from mtl_dist.config.model_checks import task_parents
from mtl_dist.config.runtime import (
    ON_POLARIZATION,
    SHARDING_TYPES,
    CheckpointConfig,
    MonitorConfig,
    ShardingConfig,
)
from mtl_dist.config.training import (
    BALANCERS,
    BEST_METRICS,
    CPU_AFFINITIES,
    DATA_TYPES,
    DEVICES,
    EMBEDDING_OPTIMIZERS,
    HIGHER_IS_BETTER,
    MULTI_EPOCH,
    ON_NONFINITE,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    WEIGHT_DECAY_MODES,
    EmbeddingConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    # the tree
    "JobConfig", "DataConfig", "FeaturesConfig", "SparseFeature", "SequenceFeature", "TaskSpec",
    "ModelConfig",
    "ExpertsConfig", "GateConfig", "TowerConfig", "SharedBottomConfig", "PLEConfig", "STEMConfig",
    "AITMConfig", "DBMTLConfig", "PEPNetConfig", "ESMMConfig", "InteractionConfig",
    "ModelEmbeddingConfig",
    "EmbeddingConfig", "OptimConfig", "LossConfig", "MonitorConfig", "CheckpointConfig",
    "ShardingConfig", "TrainConfig",
    # loading, checking, plain data
    "ConfigError", "opt", "load_config", "load_toml", "apply_override", "help_text", "validate",
    "from_dict", "to_dict", "task_parents", "FLAT_MODEL_KEYS",
    # the allowed names of the choice keys
    "POOLINGS", "SEQUENCE_POOLINGS", "INVALID_IDS", "COLLISIONS", "EVICTIONS", "TASK_KINDS",
    "TRANSFORMS", "FLOAT_TRANSFORMS",
    "ON_INVALID", "DENSE_NANS", "HEADS", "EXPERT_ACTIVATIONS", "EXPERT_NORMS", "DBMTL_BASES",
    "ESMM_CVR_LABELS", "INTERACTIONS", "INTERACTION_OUTPUTS", "OPTIMIZERS",
    "EMBEDDING_OPTIMIZERS", "WEIGHT_DECAY_MODES", "SCHEDULES", "DATA_TYPES", "BALANCERS",
    "DEVICES", "CPU_AFFINITIES", "PRECISIONS", "ON_NONFINITE", "BEST_METRICS", "HIGHER_IS_BETTER",
    "MULTI_EPOCH", "ON_POLARIZATION", "SHARDING_TYPES",
    # integer ranges
    "INT_RANGES", "SPARSE_INT_RANGES", "WIDTH_LISTS",
]  # fmt: skip
