"""The root of the tree: :class:`JobConfig`, one field per TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtl_dist.config.base import opt
from mtl_dist.config.data import DataConfig, FeaturesConfig, TaskSpec
from mtl_dist.config.model import ModelConfig
from mtl_dist.config.runtime import CheckpointConfig, MonitorConfig, ShardingConfig
from mtl_dist.config.training import EmbeddingConfig, LossConfig, OptimConfig, TrainConfig


@dataclass
class JobConfig:
    """The whole job. Each field is a TOML section and a ``--section.key`` override prefix."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    tasks: list[TaskSpec] = opt([], "tasks ([[tasks]] tables in TOML)")
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
