"""The optimisation sections: ``[optim]``, ``[embedding]``, ``[loss]`` and ``[train]``, with the
names their choice keys allow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mtl_dist.config.base import one_of, opt

DenseOptimizer = Literal["adam", "adamw", "sgd", "adagrad"]
OPTIMIZERS = get_args(DenseOptimizer)
# fbgemm's fused embedding optimizers that run on CPU and GPU
EmbeddingOptimizer = Literal["rowwise_adagrad", "adagrad", "sgd"]
EMBEDDING_OPTIMIZERS = get_args(EmbeddingOptimizer)
WeightDecayMode = Literal["l2", "decouple"]
WEIGHT_DECAY_MODES = get_args(WeightDecayMode)
Schedule = Literal["constant", "cosine", "step", "exponential"]
SCHEDULES = get_args(Schedule)
DataType = Literal["fp32", "fp16"]
DATA_TYPES = get_args(DataType)
BALANCERS = [
    "fixed", "uncertainty", "gradnorm", "dwa", "rlw", "gls", "stch", "famo", "mgda", "imtl_g",
    "aligned_mtl", "pcgrad", "cagrad",
]  # fmt: skip
Device = Literal["auto", "cpu", "cuda"]
DEVICES = get_args(Device)
CpuAffinity = Literal["auto", "off"]
CPU_AFFINITIES = get_args(CpuAffinity)
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = get_args(PrecisionName)
MultiEpoch = Literal["none", "meda"]
MULTI_EPOCH = get_args(MultiEpoch)
OnNonFinite = Literal["stop", "skip", "off"]
ON_NONFINITE = get_args(OnNonFinite)
# metrics train.best_metric may name, per task kind; the first ones are "higher is better"
BEST_METRICS = {"binary": ("auc", "gauc", "logloss"), "regression": ("mse", "mae")}
HIGHER_IS_BETTER = ("auc", "gauc")
_LOWER_IS_BETTER = [m for ms in BEST_METRICS.values() for m in ms if m not in HIGHER_IS_BETTER]


@dataclass
class OptimConfig:
    dense_optimizer: DenseOptimizer = opt(
        "adam", f"optimizer for the dense part: {one_of(OPTIMIZERS)}"
    )
    dense_lr: float = opt(1e-3, "learning rate of the dense part")
    weight_decay: float = opt(0.0, "weight decay of the dense part")
    embedding_optimizer: str = opt(
        "rowwise_adagrad", f"fused embedding optimizer: {one_of(EMBEDDING_OPTIMIZERS)}"
    )
    embedding_lr: float = opt(0.05, "learning rate of the embedding tables")
    embedding_eps: float = opt(1e-8, "epsilon of the (row-wise) Adagrad embedding optimizer")
    embedding_weight_decay: float = opt(
        0.0,
        "weight decay of the embedding rows a batch touches, inside fbgemm's fused "
        "rowwise_adagrad on CUDA (fbgemm's CPU kernels ignore it: refused on CPU, use "
        "model.embedding.l2 there; 0: off)",
    )
    embedding_weight_decay_mode: WeightDecayMode = opt(
        "l2",
        "embedding_weight_decay: "
        + one_of(
            WEIGHT_DECAY_MODES,
            l2="(wd * w added to the row's gradient, before Adagrad's scaling)",
            decouple="(w -= lr * wd * w, AdamW-style)",
        ),
    )
    dense_schedule: Schedule = opt("constant", f"dense lr after warm-up: {one_of(SCHEDULES)}")
    dense_warmup_steps: int = opt(0, "dense lr: linear warm-up over this many steps")
    embedding_schedule: Schedule = opt(
        "constant", f"embedding lr after warm-up: {one_of(SCHEDULES)}"
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

    data_type: DataType = opt(
        "fp32",
        "table storage: "
        + one_of(
            DATA_TYPES,
            fp16="(half the memory per rank; the row-wise optimizer state stays fp32; pooled "
            "embeddings are cast to the dense precision)",
        ),
    )


@dataclass
class LossConfig:
    """How the per-task losses are combined: ``loss = Σ_t w_t · loss_t + Σ aux``."""

    balancer: str = opt(
        "fixed",
        one_of(
            BALANCERS,
            fixed="(tasks[].weight)",
            uncertainty="(Kendall et al. 2018)",
            gradnorm="(Chen et al. 2018)",
            dwa="(dynamic weight average, Liu et al. 2019)",
            rlw="(random loss weighting, Lin et al. 2022)",
            gls="(geometric mean of the losses, Chennupati et al. 2019)",
            stch="(smooth Tchebycheff, Lin et al. 2024)",
            famo="(Liu et al. 2023)",
            mgda="(MGDA-UB, Sener & Koltun 2018)",
            imtl_g="(Liu et al. 2021)",
            aligned_mtl="(Senushkin et al. 2023): the last three on the shared representation's "
            "task gradients",
            pcgrad="(Yu et al. 2020)",
            cagrad="(Liu et al. 2021): on the head's shared dense parameters",
        ),
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
class TrainConfig:
    batch_size: int = opt(2048, "per-rank batch size B")
    epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "stop after this many steps (0: run all epochs)")
    multi_epoch: MultiEpoch = opt(
        "none",
        "what happens between epochs: "
        + one_of(
            MULTI_EPOCH,
            none="(nothing: every epoch trains on)",
            meda="(Fan et al. 2024: at the start of every epoch after the first, every "
            "embedding table is drawn anew from its build-time init, seeded by train.seed and "
            "the epoch, and its optimizer state zeroed; the dense part and its optimizer kept)",
        ),
    )
    val_every: int = opt(0, "validate every N steps (0: at the end of each epoch)")
    val_max_batches: int = opt(0, "cap validation batches per rank (0: whole validation set)")
    log_every: int = opt(50, "write training scalars every N steps")
    seed: int = opt(
        0, "seed of parameter init and data order; same seed + world size => same numbers"
    )
    output_dir: str = opt("runs/default", "run directory: TensorBoard logs and metrics.json")
    gauc_by: str = opt("", "validation: also report group AUC (GAUC) grouped by this id column")
    device: Device = opt("auto", one_of(DEVICES, auto="(cuda when present, else cpu)"))
    threads: int = opt(0, "torch intra-op threads per rank (0: cores / local ranks)")
    cpu_affinity: CpuAffinity = opt(
        "auto",
        "binding of ranks to cores: "
        + one_of(
            CPU_AFFINITIES,
            auto="(CPU, several ranks on a host: each local rank bound to its own block of the "
            "allowed physical cores, with their hyperthreads; unbound when there are fewer cores "
            "than local ranks)",
            off="(the OS schedules every rank on any allowed core)",
        ),
    )
    progress_bar: bool = opt(True, "tqdm bar on rank 0")
    precision: PrecisionName = opt(
        "auto",
        "dense compute: "
        + one_of(
            PRECISIONS,
            auto="(bf16 on CUDA sm_80+ or a CPU with amx_bf16 / avx512_bf16, else fp32; the "
            "start-up log says which and why)",
            bf16="(autocast, fp32 master weights)",
            fp16="(CUDA only, dynamic loss scaling)",
        ),
    )
    allow_tf32: bool = opt(True, "CUDA, precision fp32: TF32 tensor cores for fp32 matmuls")
    best_metric: str = opt(
        "",
        "keep a 'best' checkpoint by this validation metric, '<task>/<metric>' "
        f"({', '.join(HIGHER_IS_BETTER)}: higher is better; {', '.join(_LOWER_IS_BETTER)}: "
        "lower); '' = off",
    )
    early_stop_patience: int = opt(
        0, "with best_metric: stop after this many validations without improvement (0: off)"
    )
    on_nonfinite: OnNonFinite = opt(
        "stop",
        "a non-finite total or task loss on any rank: "
        + one_of(
            ON_NONFINITE,
            stop="(end the run, non-zero exit, no checkpoint after it)",
            skip="(drop that step's update on every rank, count it as train/nonfinite_steps)",
            off="(no guard: for measuring its cost only)",
        ),
    )
    max_nonfinite: int = opt(10, "skip: stop after this many consecutive non-finite steps")
