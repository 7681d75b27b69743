"""One typed config tree: dataclasses, loaded from TOML, overridden from the command line.

A job is described by :class:`JobConfig`. Values come from, in order: the dataclass defaults,
a TOML file (``--config configs/X.toml``), then ``--section.key value`` overrides. Unknown keys
and values of the wrong type are rejected at startup with a message naming the key (and the
closest valid key), so a typo never silently trains the wrong model.

Example::

    cfg = load_config(["--config", "configs/default.toml", "--model.num_experts", "8"])
    cfg.model.num_experts  # 8
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import tomllib

from mtl_dist.data.source import RowFilter


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key at fault."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line meaning shown by ``--help``."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- feature schema


@dataclass
class SparseFeature:
    """A categorical column looked up in an embedding table (one row of ``[[features.sparse]]``)."""

    name: str = opt(
        "",
        "Parquet column: integer or string ids (single-hot) or a list of them (multi-hot); "
        "string ids need hash_buckets",
    )
    vocab_size: int = opt(0, "ids lie in [0, vocab_size); rows of the table")
    hash_buckets: int = opt(
        0,
        "if > 0, ids are hashed into this many rows instead: integer id mod buckets, string "
        "xxh3_64(utf-8 bytes, data.hash_seed) mod buckets",
    )
    embedding_dim: int = opt(16, "embedding width D")
    table: str = opt("", "table name; features naming the same table share it (default: name)")
    multi_hot: bool = opt(False, "column holds variable-length id lists")
    pooling: str = opt("sum", "pooling of a multi-hot list: sum | mean")
    invalid_ids: str = opt(
        "error",
        "ids outside [0, vocab_size) and nulls inside lists: error | clip (into [0, vocab_size-1]) "
        "| hash (id mod vocab_size) | drop (from the bag); clip/hash drop list nulls too",
    )
    collision: str = opt(
        "modulo",
        "how ids map to the hash_buckets rows: modulo (id mod buckets: distinct ids may share a "
        "row) | managed (TorchRec managed collision: the ids seen most (lfu) or last (lru) each "
        "own a row, the rest share the table's miss row; row-wise sharded)",
    )
    eviction: str = opt("lfu", "collision = managed: which ids keep their rows, lfu | lru")
    eviction_interval: int = opt(
        10,
        "collision = managed: admit new ids (evicting others) every N training steps; in "
        "between, new ids read the miss row. Each admission costs about one step",
    )

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def num_rows(self) -> int:
        return self.hash_buckets or self.vocab_size


@dataclass
class TaskSpec:
    """One prediction task (one row of ``[[tasks]]``)."""

    name: str = opt("", "task name, used in logs and metric tags")
    kind: str = opt("binary", "binary (logit, BCE loss) | regression (value, MSE loss)")
    label: str = opt("", "label column; null / NaN values are masked out of loss and metrics")
    truth: str = opt("", "optional column with the true probability / expected value (oracle)")
    transform: str = opt("none", "regression target transform: none | log1p")
    weight: float = opt(1.0, "fixed loss weight (the fixed balancer; initial weight of others)")
    missing_values: list[float] = opt(
        [], "label values that mean 'no label', e.g. [-1] (null and NaN always do)"
    )
    condition: str = opt(
        "", "a binary task whose label must be 1 for this label to count (conversion: 'click')"
    )
    sample_weight: str = opt("", "column of per-row loss weights (finite, >= 0)")
    on_invalid: str = opt(
        "error", "label outside the task's domain (binary not 0/1, infinite target): error | mask"
    )
    negative_rate: float = opt(
        1.0,
        "binary: keep each negative with this rate in training (downsampling); predictions and "
        "metrics are corrected back: p' = p / (p + (1 - p) / rate)",
    )


@dataclass
class FeaturesConfig:
    sparse: list[SparseFeature] = opt([], "sparse features ([[features.sparse]] tables in TOML)")
    dense: list[str] = opt([], "dense float columns fed beside the pooled embeddings")


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    train_path: str = opt(
        "data/synth/train",
        "training Parquet: a directory (hive partitions key=value/ become columns), a glob, "
        "comma-separated files, or a URI pyarrow.fs resolves (file://, s3://, gs://, ...)",
    )
    val_path: str = opt("data/synth/val", "validation Parquet: as train_path")
    num_workers: int = opt(0, "loader worker processes per rank (0 reads in the training process)")
    prefetch_batches: int = opt(2, "batches each worker reads ahead (memory bound: batch x this)")
    dense_nan: str = opt(
        "error", "NaN / infinite dense values: error (names the column) | zero; nulls read as 0"
    )
    hash_seed: int = opt(
        0, "seed of xxh3_64, the hash of string ids (a row = xxh3_64(utf-8 bytes, seed) mod N)"
    )
    train_filter: str = opt(
        "",
        "rows to train on: an expression over file and hive-partition columns, e.g. "
        "\"dt >= '2026-11-01' and dt < '2026-11-08'\" (== != < <= > >= in, and or not)",
    )
    val_filter: str = opt("", "rows to validate on, as train_filter (e.g. \"dt == '2026-11-08'\")")


@dataclass
class ModelConfig:
    head: str = opt(
        "mmoe",
        "multi-task head: shared_bottom | omoe | mmoe | ple | stem | aitm (Xi et al. 2021) | "
        "dbmtl (Wang et al. 2019) | pepnet (Chang et al. 2023)",
    )
    num_experts: int = opt(4, "experts E (omoe, mmoe)")
    expert_hidden: list[int] = opt([256, 128], "expert MLP widths; the last is the expert output H")
    expert_activation: str = opt(
        "relu", "experts' (and the shared bottom's) activation: relu | swish (HoME, 2024)"
    )
    expert_norm: str = opt(
        "none",
        "normalise each expert's output before its activation: none | batch | layer (HoME's "
        "expert normalisation: every expert on one scale)",
    )
    expert_feature_gate_rank: int = opt(
        0,
        "HoME's feature gate: each expert reads x * 2 sigmoid(x A B) with rank-r A, B of its own "
        "(r; 0: off; not with gate_top_k or gate_gumbel)",
    )
    expert_self_gate: bool = opt(
        False,
        "HoME's self-gate (ple, stem): each task also adds its own experts weighted by "
        "independent sigmoids, so a sparse task keeps training them",
    )
    bottom_hidden: list[int] = opt([256, 128], "shared_bottom: the shared MLP's widths")
    tower_hidden: list[int] = opt([64], "per-task tower MLP widths before the output unit")
    tower_dropout: float = opt(0.0, "dropout after each tower hidden layer")
    tower_batch_norm: bool = opt(False, "batch-normalise each tower hidden layer")
    ple_levels: int = opt(2, "ple: extraction levels (1 = CGC)")
    ple_shared_experts: int = opt(2, "ple, stem: shared experts (per level)")
    ple_task_experts: int = opt(2, "ple, stem: experts per task (per level)")
    aitm_chain: list[str] = opt(
        [], "aitm: the funnel's tasks in order, e.g. click,conversion ([]: the binary tasks)"
    )
    aitm_calibration: float = opt(
        0.6, "aitm: weight of the calibrator max(p_t - p_(t-1), 0) along the chain (0: off)"
    )
    dbmtl_base: str = opt("mmoe", "dbmtl: the shared representation: mmoe | shared_bottom")
    dbmtl_parents: list[str] = opt(
        [],
        "dbmtl: each task's parent tasks as task:parent+parent, e.g. conversion:click "
        "([]: each task's parent is the task before it)",
    )
    dbmtl_relation_hidden: list[int] = opt(
        [32], "dbmtl: widths of each task's relation MLP over its tower and its parents' outputs"
    )
    pepnet_domain_features: list[str] = opt(
        [],
        "pepnet: features naming the domain / scenario; EPNet scales the head's input from them "
        "([]: no EPNet)",
    )
    pepnet_prior_features: list[str] = opt(
        [],
        "pepnet: personal prior features (user / item / author ids); PPNet scales every tower "
        "layer from them ([]: no PPNet)",
    )
    pepnet_gate_hidden: int = opt(64, "pepnet: hidden width of each Gate NU")
    stem_features: list[str] = opt([], "stem: sparse features that get a table per task ([]: all)")
    stem_dim: int = opt(8, "stem: embedding dim of the task-specific tables")
    gate_temperature: float = opt(
        1.0, "softmax temperature of the gates (>1 flattens: a polarization cure)"
    )
    gate_hidden: list[int] = opt([], "gate MLP hidden widths ([]: a linear gate)")
    gate_top_k: int = opt(
        0, "keep each sample's k largest gate logits, renormalised (0: dense softmax)"
    )
    gate_noisy: bool = opt(
        False, "noisy top-k: learned Gaussian noise on the gate logits in training"
    )
    gate_gumbel: bool = opt(False, "Gumbel-softmax straight-through one-hot gate")
    gate_uniform_init: bool = opt(
        False, "near-uniform gate init: zero weights + tiny noise (a cure)"
    )
    gate_dselect_k: int = opt(
        0,
        "DSelect-k gate (Hazimeh et al. 2021): k selectors over the experts' binary codes, "
        "differentiable, ending with at most k non-zero weights (0: off)",
    )
    gate_dselect_gamma: float = opt(1.0, "DSelect-k: width gamma of the smooth step")
    gate_dselect_entropy_coef: float = opt(
        0.001, "DSelect-k: weight of the selectors' entropy (pushes each to one expert)"
    )
    expert_dropout: float = opt(
        0.0,
        "drop each gate weight with this probability in training, renormalise (a cure; 0.1 typical)",
    )
    gate_entropy_coef: float = opt(
        0.0, "weight of the gate-entropy regulariser (a cure; 0.005-0.02 typical)"
    )
    load_balance_coef: float = opt(0.0, "weight of the top-k load-balancing auxiliary loss")
    sparse_max_fraction: float = opt(
        0.5,
        "top-k: run experts only on routed rows when at most this share of (sample, expert) pairs is selected",
    )
    esmm: bool = opt(
        False, "ESMM: train the CVR task through pCTCVR = pCTR x pCVR on all exposures"
    )
    esmm_ctr_task: str = opt("click", "esmm: the CTR task")
    esmm_cvr_task: str = opt(
        "conversion", "esmm: the CVR task (its label must be null or 0 where there is no click)"
    )
    esmm_cvr_label: str = opt(
        "cvr",
        "esmm: what the CVR task's label is — cvr (conversion given a click; predictions and "
        "metrics are pCVR) | ctcvr (click and conversion on every exposure, e.g. a purchase "
        "column; predictions and metrics are pCTCVR = pCTR x pCVR)",
    )
    escm2_ips: float = opt(
        0.0,
        "ESCM2 (Wang et al. 2022) beside ESMM: weight of the counterfactual CVR risk, IPS form "
        "(clicked rows' CVR loss divided by pCTR, over all exposures); needs esmm_cvr_label = cvr",
    )
    escm2_dr: float = opt(
        0.0,
        "ESCM2 beside ESMM: weight of the counterfactual CVR risk, doubly robust form, plus an "
        "imputation tower predicting the CVR error on every exposure (its loss at the same "
        "weight); needs esmm_cvr_label = cvr; not with escm2_ips",
    )
    dense_batch_norm: bool = opt(True, "batch-normalise the dense features at the input")
    interaction: str = opt(
        "none",
        "feature interaction between the embeddings and the head: none | dot (DLRM pairwise dot "
        "products) | fm (factorisation machine 2nd-order term per dimension) | dcn_v2 (DCN-V2 "
        "cross network) | dcn_v2_lowrank | dcn_mix (mixture of low-rank cross experts)",
    )
    interaction_output: str = opt(
        "concat",
        "the head's input: concat ([x, interaction(x)]) | replace (interaction(x) alone)",
    )
    cross_layers: int = opt(3, "dcn_v2, dcn_v2_lowrank, dcn_mix: cross layers")
    cross_low_rank: int = opt(64, "dcn_v2_lowrank, dcn_mix: rank r of each cross matrix U V")
    cross_experts: int = opt(4, "dcn_mix: low-rank cross experts K per layer")
    embedding_dropout: float = opt(
        0.0,
        "per-feature embedding dropout: in training, zero a sample's whole pooled embedding of "
        "a feature with this probability, the kept ones scaled by 1/(1-p) (0: off)",
    )
    embedding_l2: float = opt(
        0.0,
        "L2 on the embedding rows a batch looks up, any optimizer and device: adds "
        "embedding_l2/2 * mean over samples of the squared norm of the pooled embeddings to the "
        "loss (single-hot features: each looked-up row, as often as it occurs; 0: off)",
    )


@dataclass
class OptimConfig:
    dense_optimizer: str = opt("adam", "optimizer for the dense part: adam | adamw | sgd | adagrad")
    dense_lr: float = opt(1e-3, "learning rate of the dense part")
    weight_decay: float = opt(0.0, "weight decay of the dense part")
    embedding_optimizer: str = opt(
        "rowwise_adagrad", "fused embedding optimizer: rowwise_adagrad | adagrad | sgd"
    )
    embedding_lr: float = opt(0.05, "learning rate of the embedding tables")
    embedding_eps: float = opt(1e-8, "epsilon of the (row-wise) Adagrad embedding optimizer")
    embedding_weight_decay: float = opt(
        0.0,
        "weight decay of the embedding rows a batch touches, inside fbgemm's fused "
        "rowwise_adagrad on CUDA (fbgemm's CPU kernels ignore it: refused on CPU, use "
        "model.embedding_l2 there; 0: off)",
    )
    embedding_weight_decay_mode: str = opt(
        "l2",
        "embedding_weight_decay: l2 (wd * w added to the row's gradient, before Adagrad's "
        "scaling) | decouple (w -= lr * wd * w, AdamW-style)",
    )
    dense_schedule: str = opt(
        "constant", "dense lr after warm-up: constant | cosine | step | exponential"
    )
    dense_warmup_steps: int = opt(0, "dense lr: linear warm-up over this many steps")
    embedding_schedule: str = opt(
        "constant", "embedding lr after warm-up: constant | cosine | step | exponential"
    )
    embedding_warmup_steps: int = opt(0, "embedding lr: linear warm-up over this many steps")
    schedule_gamma: float = opt(0.5, "step / exponential: the factor per schedule_step_size steps")
    schedule_step_size: int = opt(1000, "step / exponential: steps per factor of schedule_gamma")
    schedule_min_ratio: float = opt(0.0, "cosine: the final rate as a share of the base rate")
    clip_grad_norm: float = opt(
        0.0,
        "clip the dense gradients to this global L2 norm (0: off); the pre-clip norm is logged "
        "as train/grad_norm (the fused embedding optimizers' gradients are not clipped)",
    )


@dataclass
class EmbeddingConfig:
    """How the embedding tables are stored (TorchRec's ``EmbeddingBagConfig.data_type``)."""

    data_type: str = opt(
        "fp32",
        "table storage: fp32 | fp16 (half the memory per rank; the row-wise optimizer state "
        "stays fp32; pooled embeddings are cast to the dense precision)",
    )


BALANCERS = [
    "fixed", "uncertainty", "gradnorm", "dwa", "rlw", "gls", "stch", "famo", "mgda", "imtl_g",
    "aligned_mtl", "pcgrad", "cagrad",
]  # fmt: skip


@dataclass
class LossConfig:
    """How the per-task losses are combined: ``loss = Σ_t w_t · loss_t + Σ aux``."""

    balancer: str = opt(
        "fixed",
        "fixed (tasks[].weight) | uncertainty (Kendall et al. 2018) | gradnorm (Chen et al. "
        "2018) | dwa (dynamic weight average, Liu et al. 2019) | rlw (random loss weighting, "
        "Lin et al. 2022) | gls (geometric mean of the losses, Chennupati et al. 2019) | stch "
        "(smooth Tchebycheff, Lin et al. 2024) | famo (Liu et al. 2023) | mgda (MGDA-UB, Sener & "
        "Koltun 2018) | imtl_g (Liu et al. 2021) | aligned_mtl (Senushkin et al. 2023): the "
        "last three on the shared representation's task gradients | pcgrad (Yu et al. 2020) | "
        "cagrad (Liu et al. 2021): on the head's shared dense parameters",
    )
    gradnorm_alpha: float = opt(1.5, "gradnorm: asymmetry alpha (0: equal gradient norms)")
    gradnorm_lr: float = opt(0.025, "gradnorm: step size of the task-weight update")
    dwa_temperature: float = opt(2.0, "dwa: softmax temperature over the loss ratios")
    dwa_period: int = opt(100, "dwa: steps per period (the paper's epoch) whose mean loss counts")
    stch_mu: float = opt(0.5, "stch: smoothing mu > 0 (small: follow the worst task)")
    cagrad_c: float = opt(0.4, "cagrad: conflict-aversion radius c in [0, 1) (0: the mean)")
    famo_lr: float = opt(0.025, "famo: Adam step size of the task logits")
    famo_weight_decay: float = opt(0.001, "famo: weight decay gamma of the task logits")


@dataclass
class MonitorConfig:
    """Gate health, alarms, probes and step telemetry (see ``mtl_dist/gate_health.py``)."""

    gate_every: int = opt(50, "gate health every N steps on every rank (0: off)")
    heatmap_every: int = opt(500, "task x expert gate-weight heatmap image every N steps (0: off)")
    polarized_threshold: float = opt(
        0.9, "a gate is polarised when its mean max weight exceeds this (per sample likewise)"
    )
    dead_threshold: float = opt(
        0.05, "an expert is unused when its utilisation is below this in every gate"
    )
    on_polarization: str = opt(
        "warn",
        "when a gate polarises or an expert dies: warn | stop (end the run) | strengthen (raise "
        "the gates' expert dropout by 0.1, up to 0.5)",
    )
    conflict_every: int = opt(
        0, "cosine similarity of task gradients on the shared experts every N steps (0: off)"
    )
    attribution: bool = opt(
        True, "per-task feature attribution (mean |grad x input|) at each validation"
    )
    attribution_batches: int = opt(4, "validation batches per rank used for attribution")
    step_timing: bool = opt(
        True, "split step time into data / forward / backward / optimizer (syncs on CUDA)"
    )
    profile_steps: int = opt(
        0,
        "profile N training steps (torch.profiler) and split them into data / embedding / dense "
        "/ collectives / optimizer / python time: profile_rank<r>.json (0: off)",
    )
    profile_after: int = opt(10, "warm-up steps before the profiled ones")


@dataclass
class CheckpointConfig:
    """When to save, what to keep, whether to resume (see ``mtl_dist/checkpoint.py``)."""

    every: int = opt(0, "save every N steps (0: only at the end)")
    at_end: bool = opt(True, "save when training ends")
    keep: int = opt(3, "complete checkpoints kept (older ones are deleted)")
    resume: str = opt(
        "auto",
        "auto (resume from the latest checkpoint if the run has one) | latest (must exist; "
        "also --resume) | never | a checkpoint directory",
    )
    dir: str = opt("", "checkpoint directory (default: <train.output_dir>/checkpoints)")
    continue_finished: bool = opt(
        False,
        "a relaunch of a run that ended (early stop, max_steps, all epochs: recorded in "
        "<checkpoint dir>/finished.json) trains on from its last checkpoint instead of exiting "
        "with 'nothing to do' (a larger max_steps or epochs continues without it)",
    )


SHARDING_TYPES = [
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
]


@dataclass
class ShardingConfig:
    sharding_types: list[str] = opt(
        SHARDING_TYPES,
        "sharding types the planner may choose from (row_wise / table_row_wise included on CPU too)",
    )
    force: str = opt(
        "", "if set, every table uses this sharding type (overrides the planner's choice)"
    )
    pipeline: bool = opt(
        True, "train with TorchRec's TrainPipelineSparseDist (overlaps input dist)"
    )


@dataclass
class TrainConfig:
    batch_size: int = opt(2048, "per-rank batch size B")
    epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "stop after this many steps (0: run all epochs)")
    val_every: int = opt(0, "validate every N steps (0: at the end of each epoch)")
    val_max_batches: int = opt(0, "cap validation batches per rank (0: whole validation set)")
    log_every: int = opt(50, "write training scalars every N steps")
    seed: int = opt(
        0, "seed of parameter init and data order; same seed + world size => same numbers"
    )
    output_dir: str = opt("runs/default", "run directory: TensorBoard logs and metrics.json")
    gauc_by: str = opt("", "validation: also report group AUC (GAUC) grouped by this id column")
    device: str = opt("auto", "auto (cuda when present, else cpu) | cpu | cuda")
    threads: int = opt(0, "torch intra-op threads per rank (0: cores / local ranks)")
    progress_bar: bool = opt(True, "tqdm bar on rank 0")
    precision: str = opt(
        "auto",
        "dense compute: auto (bf16 on CUDA sm_80+ or a CPU with amx_bf16 / avx512_bf16, else "
        "fp32; the start-up log says which and why) | fp32 | bf16 (autocast, fp32 master "
        "weights) | fp16 (CUDA only, dynamic loss scaling)",
    )
    allow_tf32: bool = opt(True, "CUDA, precision fp32: TF32 tensor cores for fp32 matmuls")
    best_metric: str = opt(
        "",
        "keep a 'best' checkpoint by this validation metric, '<task>/<metric>' (auc, gauc: "
        "higher is better; logloss, mse, mae: lower); '' = off",
    )
    early_stop_patience: int = opt(
        0, "with best_metric: stop after this many validations without improvement (0: off)"
    )
    on_nonfinite: str = opt(
        "stop",
        "a non-finite total or task loss on any rank: stop (end the run, non-zero exit, no "
        "checkpoint after it) | skip (drop that step's update on every rank, count it as "
        "train/nonfinite_steps) | off (no guard: for measuring its cost only)",
    )
    max_nonfinite: int = opt(10, "skip: stop after this many consecutive non-finite steps")


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


# --------------------------------------------------------------------------- building from dicts


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (from TOML) against type ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")  # pragma: no cover - not used
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}'" + _suggest(key, list(hints)))
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _parse_cli_value(text: str, tp: Any, key: str) -> Any:
    """Turn a command-line string into a value of ``tp`` (``256,128`` is a list of ints)."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item_tp):
                raise ConfigError(
                    f"--{key}: a list of tables is set in the TOML file, not on the command line"
                )
            parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
            return [_parse_cli_value(p, item_tp, key) for p in parts]
    except ConfigError:
        raise
    except ValueError:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"--{key}: expected {name}, got {text!r}") from None
    raise ConfigError(f"--{key}: cannot be set from the command line")  # pragma: no cover


def apply_override(cfg: JobConfig, dotted: str, text: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string, checking key and type."""
    obj: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        prefix = ".".join(parts[:i])
        if part not in hints:
            leaves = [key for key, *_ in _walk(JobConfig)]
            close = difflib.get_close_matches(dotted, leaves, n=1, cutoff=0.5)
            hint = (
                f" (did you mean '{close[0]}'?)"
                if close
                else _suggest(part, [f"{prefix}.{k}" if prefix else k for k in hints])
            )
            raise ConfigError(f"unknown config key '--{dotted}'{hint}")
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(
                    f"--{dotted} is a section; set one of its keys, e.g. --{dotted}.<key>"
                )
            setattr(obj, part, _parse_cli_value(text, tp, dotted))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{dotted}: '{part}' has no sub-keys")


INVALID_IDS = ("error", "clip", "hash", "drop")
COLLISIONS = ("modulo", "managed")
EVICTIONS = ("lfu", "lru")


def _check_choices(*items: tuple[str, str, tuple[str, ...]]) -> None:
    """Each ``(label, value, allowed)``: refuse a value outside ``allowed``, with the close
    match."""
    for label, value, allowed in items:
        if value not in allowed:
            raise ConfigError(
                f"{label} must be {' | '.join(allowed)}, got {value!r}"
                + _suggest(value, list(allowed))
            )


def _check_collision(f: SparseFeature, where: str, cfg: JobConfig) -> None:
    """``collision`` / ``eviction`` keys of one sparse feature (managed collision's limits)."""
    _check_choices(
        (f"{where}: collision", f.collision, COLLISIONS),
        (f"{where}: eviction", f.eviction, EVICTIONS),
    )
    if f.collision != "managed":
        return
    if not f.hash_buckets:
        raise ConfigError(
            f"{where}: collision = 'managed' needs hash_buckets = N (the table's rows)"
        )
    if f.eviction_interval < 1:
        raise ConfigError(f"{where}: eviction_interval must be >= 1, got {f.eviction_interval}")
    if cfg.model.head == "stem" and f.name in (cfg.model.stem_features or [f.name]):
        raise ConfigError(
            f"{where}: a collision = 'managed' feature cannot have STEM's per-task tables (each "
            "would need an id remapping of its own): list model.stem_features without it"
        )
    if cfg.sharding.force and cfg.sharding.force != "row_wise":
        raise ConfigError(
            f"{where}: collision = 'managed' tables shard row_wise only, but sharding.force = "
            f"{cfg.sharding.force!r}"
        )


SCHEDULES = ("constant", "cosine", "step", "exponential")
INTERACTIONS = ("none", "dot", "fm", "dcn_v2", "dcn_v2_lowrank", "dcn_mix")
INTERACTION_OUTPUTS = ("concat", "replace")
# metrics train.best_metric may name, per task kind; the first ones are "higher is better"
BEST_METRICS = {"binary": ("auc", "gauc", "logloss"), "regression": ("mse", "mae")}
HIGHER_IS_BETTER = ("auc", "gauc")


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
                    f"model.dbmtl_parents: no task named {name!r}" + _suggest(name, task_names)
                )
        if child in parents:
            raise ConfigError(f"model.dbmtl_parents: task {child!r} listed twice")
        parents[child] = names[1:]
    try:
        tuple(TopologicalSorter(parents).static_order())
    except CycleError as e:
        raise ConfigError(f"model.dbmtl_parents: a cycle {' -> '.join(e.args[1])}") from None
    return parents


def _check_interaction(cfg: JobConfig) -> None:
    """The interaction stage's and the embedding regularisers' keys."""
    m = cfg.model
    _check_choices(
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
    if not 0 <= m.embedding_dropout < 1:
        raise ConfigError(f"model.embedding_dropout must lie in [0, 1), got {m.embedding_dropout}")
    if m.embedding_l2 < 0:
        raise ConfigError(f"model.embedding_l2 must be >= 0, got {m.embedding_l2}")
    o = cfg.optim
    _check_choices(
        ("optim.embedding_weight_decay_mode", o.embedding_weight_decay_mode, ("l2", "decouple"))
    )
    if o.embedding_weight_decay < 0 or (
        o.embedding_weight_decay > 0 and o.embedding_optimizer != "rowwise_adagrad"
    ):
        raise ConfigError(
            f"optim.embedding_weight_decay = {o.embedding_weight_decay}: must be >= 0, and > 0 "
            f"needs embedding_optimizer = rowwise_adagrad (fbgemm's fused adagrad and sgd "
            f"ignore weight decay), got {o.embedding_optimizer!r}"
        )


_I64 = 1 << 63  # the upper bound of every other integer key: ids, sizes and counts are int64
# integer keys with a range, [low, high): refused outside it naming the key and the range (a
# value that would wrap silently: an xxh3 seed is a uint64, numpy's seed a uint32)
INT_RANGES: dict[str, tuple[int, int]] = {
    "data.num_workers": (0, _I64), "data.prefetch_batches": (1, _I64),
    "data.hash_seed": (0, 1 << 64),
    "model.num_experts": (1, _I64), "model.expert_feature_gate_rank": (0, _I64),
    "model.ple_levels": (1, _I64), "model.ple_shared_experts": (0, _I64),
    "model.ple_task_experts": (0, _I64), "model.pepnet_gate_hidden": (1, _I64),
    "model.stem_dim": (1, _I64), "model.gate_top_k": (0, _I64),
    "model.gate_dselect_k": (0, _I64), "model.cross_layers": (1, _I64),
    "model.cross_low_rank": (1, _I64), "model.cross_experts": (1, _I64),
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
    "eviction_interval": (1, _I64),
}  # fmt: skip
# list[int] keys: layer widths, each >= 1
WIDTH_LISTS = ("model.expert_hidden", "model.bottom_hidden", "model.tower_hidden",
               "model.gate_hidden", "model.dbmtl_relation_hidden")  # fmt: skip


def _bound(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 1 and n & (n - 1) == 0 else str(n)


def _check_range(key: str, value: int, low: int, high: int) -> None:
    if not low <= value < high:
        raise ConfigError(f"{key} = {value}: must lie in [{low}, {_bound(high)})")


def _check_int_ranges(cfg: JobConfig) -> None:
    """Every integer key with a range (:data:`INT_RANGES`, the sparse features' sizes, the
    layer widths): a value outside it is refused, naming the key and the range."""
    for key, (low, high) in INT_RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), low, high)
    for key in WIDTH_LISTS:
        section, name = key.split(".")
        for i, width in enumerate(getattr(getattr(cfg, section), name)):
            _check_range(f"{key}[{i}]", width, 1, _I64)
    for i, f in enumerate(cfg.features.sparse):
        for name, (low, high) in SPARSE_INT_RANGES.items():
            _check_range(f"features.sparse[{i}] ({f.name or '?'}).{name}", getattr(f, name), low,
                         high)  # fmt: skip


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    heads = ["shared_bottom", "omoe", "mmoe", "ple", "stem", "aitm", "dbmtl", "pepnet"]
    if cfg.model.head not in heads:
        raise ConfigError(
            f"model.head: unknown head {cfg.model.head!r}" + _suggest(cfg.model.head, heads)
        )
    task_names = [t.name for t in cfg.tasks]
    feature_names = [f.name for f in cfg.features.sparse]
    if cfg.model.head == "aitm":
        kinds = {t.name: t.kind for t in cfg.tasks}
        chain = cfg.model.aitm_chain or [t.name for t in cfg.tasks if t.kind == "binary"]
        bad = [c for c in chain if kinds.get(c) != "binary"]
        if len(chain) < 2 or bad or len(set(chain)) != len(chain):
            raise ConfigError(
                f"model.aitm_chain {chain}: needs 2 or more distinct binary tasks"
                + (f"; not binary tasks: {bad}" + _suggest(bad[0], list(kinds)) if bad else "")
            )
    if cfg.model.head == "dbmtl":
        task_parents(cfg.model.dbmtl_parents, task_names)
        _check_choices(("model.dbmtl_base", cfg.model.dbmtl_base, ("mmoe", "shared_bottom")))
        if not cfg.model.tower_hidden or not cfg.model.dbmtl_relation_hidden:
            raise ConfigError("dbmtl: model.tower_hidden and dbmtl_relation_hidden need a layer")
    if cfg.model.head == "pepnet":
        inputs = feature_names + list(cfg.features.dense)
        for key in ("pepnet_domain_features", "pepnet_prior_features"):
            for name in getattr(cfg.model, key):
                if name not in inputs:
                    raise ConfigError(f"model.{key}: no feature {name!r}" + _suggest(name, inputs))
        if not cfg.model.pepnet_domain_features and not cfg.model.pepnet_prior_features:
            raise ConfigError(
                "model.head = pepnet needs model.pepnet_domain_features or pepnet_prior_features"
            )
    for name in cfg.model.stem_features:
        if name not in feature_names:
            raise ConfigError(
                f"model.stem_features: no sparse feature {name!r}" + _suggest(name, feature_names)
            )
    if cfg.model.esmm:
        for key in ("esmm_ctr_task", "esmm_cvr_task"):
            name = getattr(cfg.model, key)
            if name not in task_names:
                raise ConfigError(
                    f"model.{key}: no task named {name!r}" + _suggest(name, task_names)
                )
            if next(t for t in cfg.tasks if t.name == name).kind != "binary":
                raise ConfigError(f"model.{key}: task {name!r} must be binary")
        cvr = next(t for t in cfg.tasks if t.name == cfg.model.esmm_cvr_task)
        if cvr.negative_rate < 1:
            i = cfg.tasks.index(cvr)
            raise ConfigError(
                f"tasks[{i}] ({cvr.name}).negative_rate = {cvr.negative_rate} with model.esmm: the "
                "CVR task trains only through pCTCVR on every exposure, so no negative of it "
                "would be dropped while its predictions would be 'corrected'; keep "
                "negative_rate = 1 for the ESMM CVR task (downsample the CTR task instead)"
            )
        if cfg.model.esmm_cvr_label not in ("cvr", "ctcvr"):
            raise ConfigError(
                f"model.esmm_cvr_label: {cfg.model.esmm_cvr_label!r} is not cvr or ctcvr"
            )
    for key in ("escm2_ips", "escm2_dr"):
        value = getattr(cfg.model, key)
        if value < 0 or (value > 0 and not (cfg.model.esmm and cfg.model.esmm_cvr_label == "cvr")):
            raise ConfigError(
                f"model.{key} = {value}: must be >= 0, and > 0 needs model.esmm = true with "
                "esmm_cvr_label = cvr (the risk reweights the observed conversions)"
            )
    if cfg.model.escm2_ips > 0 and cfg.model.escm2_dr > 0:
        raise ConfigError(
            "model.escm2_ips and model.escm2_dr are both > 0: choose one form of ESCM2's risk "
            "(dr already contains the IPS-weighted term)"
        )
    _check_choices(
        ("model.expert_activation", cfg.model.expert_activation, ("relu", "swish")),
        ("model.expert_norm", cfg.model.expert_norm, ("none", "batch", "layer")),
    )
    if cfg.model.expert_feature_gate_rank < 0 or (
        cfg.model.expert_feature_gate_rank
        and cfg.model.head in ("omoe", "mmoe")
        and (0 < cfg.model.gate_top_k < cfg.model.num_experts or cfg.model.gate_gumbel)
    ):
        raise ConfigError(
            f"model.expert_feature_gate_rank = {cfg.model.expert_feature_gate_rank}: must be >= 0 "
            "and, > 0, not with top-k or Gumbel gates (their sparse dispatch shares one input)"
        )
    if cfg.model.expert_self_gate and (
        cfg.model.head not in ("ple", "stem") or cfg.model.ple_task_experts < 1
    ):
        raise ConfigError(
            "model.expert_self_gate mixes each task's own experts: needs model.head = ple or stem "
            f"with ple_task_experts >= 1 (head {cfg.model.head!r}, "
            f"ple_task_experts {cfg.model.ple_task_experts})"
        )
    if cfg.model.gate_dselect_k:
        clash = [k for k, on in (("gate_top_k", cfg.model.gate_top_k), ("gate_noisy",
                 cfg.model.gate_noisy), ("gate_gumbel", cfg.model.gate_gumbel)) if on]  # fmt: skip
        if clash or cfg.model.gate_dselect_k < 0 or cfg.model.gate_dselect_gamma <= 0:
            raise ConfigError(
                f"model.gate_dselect_k = {cfg.model.gate_dselect_k} needs gate_dselect_gamma > 0 "
                f"and replaces the softmax gate: not with {', '.join(clash) or 'a negative k'}"
            )
    _check_interaction(cfg)
    if cfg.model.gate_top_k < 0 or cfg.model.gate_top_k > max(cfg.model.num_experts, 1):
        raise ConfigError(f"model.gate_top_k: {cfg.model.gate_top_k} must lie in [0, num_experts]")
    if not cfg.features.sparse and not cfg.features.dense:
        raise ConfigError("features: no sparse or dense features configured")
    if len(cfg.tasks) < 1:
        raise ConfigError("tasks: at least one [[tasks]] entry is required")
    names = set()
    for i, f in enumerate(cfg.features.sparse):
        where = f"features.sparse[{i}] ({f.name or '?'})"
        if not f.name:
            raise ConfigError(f"{where}: 'name' is required")
        if f.name in names:
            raise ConfigError(f"{where}: duplicate feature name")
        names.add(f.name)
        if f.num_rows <= 0:
            raise ConfigError(f"{where}: set vocab_size or hash_buckets > 0")
        if f.embedding_dim <= 0:
            raise ConfigError(f"{where}: embedding_dim must be > 0")
        if f.pooling not in ("sum", "mean"):
            raise ConfigError(f"{where}: pooling must be sum or mean, got {f.pooling!r}")
        if f.invalid_ids not in INVALID_IDS:
            raise ConfigError(
                f"{where}: invalid_ids must be {' | '.join(INVALID_IDS)}, got {f.invalid_ids!r}"
                + _suggest(f.invalid_ids, list(INVALID_IDS))
            )
        _check_collision(f, where, cfg)
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
                f"{other.collision})"
            )
    for i, t in enumerate(cfg.tasks):
        where = f"tasks[{i}] ({t.name or '?'})"
        if not t.name or not t.label:
            raise ConfigError(f"{where}: 'name' and 'label' are required")
        if t.kind not in ("binary", "regression"):
            raise ConfigError(f"{where}: kind must be binary or regression, got {t.kind!r}")
        if t.transform not in ("none", "log1p"):
            raise ConfigError(f"{where}: transform must be none or log1p, got {t.transform!r}")
        if t.on_invalid not in ("error", "mask"):
            raise ConfigError(f"{where}: on_invalid must be error or mask, got {t.on_invalid!r}")
        if not 0 < t.negative_rate <= 1:
            raise ConfigError(f"{where}: negative_rate must lie in (0, 1], got {t.negative_rate}")
        if t.negative_rate < 1 and t.kind != "binary":
            raise ConfigError(f"{where}: negative_rate applies to binary tasks only")
        if t.condition:
            others = {o.name: o for o in cfg.tasks if o is not t}
            if t.condition not in others or others[t.condition].kind != "binary":
                raise ConfigError(
                    f"{where}: condition {t.condition!r} must name another binary task"
                    + _suggest(t.condition, list(others))
                )
    if len({t.name for t in cfg.tasks}) != len(cfg.tasks):
        raise ConfigError("tasks: task names must be unique")
    if cfg.loss.balancer not in BALANCERS:
        raise ConfigError(
            f"loss.balancer: unknown balancer {cfg.loss.balancer!r}"
            + _suggest(cfg.loss.balancer, BALANCERS)
        )
    if cfg.monitor.on_polarization not in ("warn", "stop", "strengthen"):
        raise ConfigError(
            f"monitor.on_polarization: expected warn | stop | strengthen, got "
            f"{cfg.monitor.on_polarization!r}"
        )
    if cfg.checkpoint.keep < 1 or cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.keep must be >= 1 and checkpoint.every >= 0")
    if not 0 <= cfg.loss.cagrad_c < 1:
        raise ConfigError(f"loss.cagrad_c must lie in [0, 1), got {cfg.loss.cagrad_c}")
    if cfg.loss.stch_mu <= 0:
        raise ConfigError(f"loss.stch_mu must be > 0, got {cfg.loss.stch_mu}")
    if cfg.loss.balancer == "dwa" and cfg.loss.dwa_period <= 0:
        raise ConfigError("loss.dwa_period must be > 0")
    if cfg.optim.embedding_optimizer not in ("rowwise_adagrad", "adagrad", "sgd"):
        raise ConfigError(
            f"optim.embedding_optimizer: {cfg.optim.embedding_optimizer!r} is not a fused CPU/GPU "
            "optimizer (rowwise_adagrad | adagrad | sgd)"
        )
    if cfg.optim.dense_optimizer not in ("adam", "adamw", "sgd", "adagrad"):
        raise ConfigError(f"optim.dense_optimizer: unknown optimizer {cfg.optim.dense_optimizer!r}")
    for st in [*cfg.sharding.sharding_types, *([cfg.sharding.force] if cfg.sharding.force else [])]:
        if st not in SHARDING_TYPES:
            raise ConfigError(
                f"sharding: unknown sharding type {st!r}" + _suggest(st, SHARDING_TYPES)
            )
    for key in ("train_filter", "val_filter"):
        if getattr(cfg.data, key):
            try:
                RowFilter.parse(getattr(cfg.data, key), f"data.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if cfg.data.dense_nan not in ("error", "zero"):
        raise ConfigError(f"data.dense_nan: expected error | zero, got {cfg.data.dense_nan!r}")
    if cfg.train.batch_size <= 0:
        raise ConfigError("train.batch_size must be > 0")
    if cfg.train.on_nonfinite not in ("stop", "skip", "off"):
        raise ConfigError(
            f"train.on_nonfinite: expected stop | skip | off, got {cfg.train.on_nonfinite!r}"
            + _suggest(cfg.train.on_nonfinite, ["stop", "skip", "off"])
        )
    if cfg.train.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"train.precision: expected auto | fp32 | bf16 | fp16, got {cfg.train.precision!r}"
            + _suggest(cfg.train.precision, ["auto", "fp32", "bf16", "fp16"])
        )
    if cfg.embedding.data_type not in ("fp32", "fp16"):
        raise ConfigError(
            f"embedding.data_type: expected fp32 | fp16, got {cfg.embedding.data_type!r}"
        )
    for part in ("dense", "embedding"):
        kind = getattr(cfg.optim, f"{part}_schedule")
        if kind not in SCHEDULES:
            raise ConfigError(
                f"optim.{part}_schedule: unknown schedule {kind!r}" + _suggest(kind, SCHEDULES)
            )
        if getattr(cfg.optim, f"{part}_warmup_steps") < 0:
            raise ConfigError(f"optim.{part}_warmup_steps must be >= 0")
    if cfg.optim.schedule_step_size < 1 or not 0 < cfg.optim.schedule_gamma <= 1:
        raise ConfigError("optim.schedule_step_size must be >= 1 and schedule_gamma in (0, 1]")
    if not 0 <= cfg.optim.schedule_min_ratio <= 1 or cfg.optim.clip_grad_norm < 0:
        raise ConfigError("optim.schedule_min_ratio must lie in [0, 1], clip_grad_norm >= 0")
    if cfg.train.best_metric:
        task_name, _, metric = cfg.train.best_metric.partition("/")
        task = next((t for t in cfg.tasks if t.name == task_name), None)
        metrics = BEST_METRICS[task.kind] if task else ()
        if task is None or metric not in metrics:
            known = [f"{t.name}/{m}" for t in cfg.tasks for m in BEST_METRICS[t.kind]]
            raise ConfigError(
                f"train.best_metric: {cfg.train.best_metric!r} is not '<task>/<metric>' of a "
                "configured task" + _suggest(cfg.train.best_metric, known)
            )
        if metric == "gauc" and not cfg.train.gauc_by:
            raise ConfigError(
                f"train.best_metric = {cfg.train.best_metric!r}: GAUC is computed only when "
                "validation rows are grouped: set train.gauc_by (the group id column, e.g. "
                "user_id), or choose another metric"
            )
    if cfg.train.early_stop_patience < 0 or (
        cfg.train.early_stop_patience and not cfg.train.best_metric
    ):
        raise ConfigError("train.early_stop_patience needs train.best_metric (and must be >= 0)")
    if cfg.train.max_nonfinite < 1:
        raise ConfigError(f"train.max_nonfinite must be >= 1, got {cfg.train.max_nonfinite}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: expected auto | cpu | cuda, got {cfg.train.device!r}")
    _check_int_ranges(cfg)  # last: the specific checks above keep their messages


def load_toml(path: str | Path) -> JobConfig:
    """Load a config file; errors name the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return _build(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- command line


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf key of a config dataclass."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, key + ".")
        else:
            yield key, tp, getattr(defaults, f.name), f.metadata.get("help", "")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list[{getattr(item, '__name__', item)}]"
    return getattr(tp, "__name__", str(tp))


def help_text(prog: str = "python -m mtl_dist.train") -> str:
    """Every config key with its type, default and meaning (what ``--help`` prints)."""
    lines = [
        "usage: torchrun --nproc_per_node N -m mtl_dist.train [--config FILE.toml] [--section.key VALUE ...]",
        "",
        "Values: dataclass defaults < TOML file < command-line overrides. Lists: --model.expert_hidden 256,128",
        "",
        "config keys:",
    ]
    for key, tp, default, help_ in _walk(JobConfig):
        lines.append(f"  --{key:<32} {_type_name(tp):<12} default={default!r}")
        lines.append(f"      {help_}")
    for cls, name in ((SparseFeature, "features.sparse[]"), (TaskSpec, "tasks[]")):
        lines.append(f"\n  {name} entries (TOML only):")
        for key, tp, default, help_ in _walk(cls):
            lines.append(f"    {key:<18} {_type_name(tp):<8} default={default!r}  {help_}")
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Parse ``[--config FILE] [--section.key VALUE ...]`` into a validated :class:`JobConfig`.

    ``--help`` prints :func:`help_text` and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    known, rest = parser.parse_known_args(argv)
    cfg = load_toml(known.config) if known.config else JobConfig()
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key}: missing value")
            i += 1
            value = rest[i]
        apply_override(cfg, key, value)
        i += 1
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> JobConfig:
    """A validated :class:`JobConfig` from :func:`to_dict`'s plain data (e.g. a checkpoint's)."""
    cfg = _build(JobConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (written beside the run's outputs)."""
    return dataclasses.asdict(cfg)
