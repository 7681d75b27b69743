"""The ``[model]`` section: the multi-task head, and one nested section per family of its keys
(``[model.experts]``, ``[model.gate]``, ``[model.tower]``, ``[model.shared_bottom]``,
``[model.ple]``, ``[model.stem]``, ``[model.aitm]``, ``[model.dbmtl]``, ``[model.pepnet]``,
``[model.esmm]``, ``[model.interaction]``, ``[model.embedding]``).

Each choice key's type is a ``typing.Literal``: the one definition of the names it allows, checked
when the config is parsed, and the source of its ``--help`` text. The cross-field rules live in
:mod:`mtl_dist.config.model_checks` (one check per section); the flat keys of the previous
release (``model.gate_temperature``, ...) are mapped by :mod:`mtl_dist.config.compat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from mtl_dist.config.base import one_of, opt

Head = Literal["shared_bottom", "omoe", "mmoe", "ple", "stem", "aitm", "dbmtl", "pepnet"]
ExpertActivation = Literal["relu", "swish"]
ExpertNorm = Literal["none", "batch", "layer"]
DBMTLBase = Literal["mmoe", "shared_bottom"]
CVRLabel = Literal["cvr", "ctcvr"]
Interaction = Literal["none", "dot", "fm", "dcn_v2", "dcn_v2_lowrank", "dcn_mix"]
InteractionOutput = Literal["concat", "replace"]

# the allowed names as tuples, for code that iterates over them
HEADS = get_args(Head)
EXPERT_ACTIVATIONS = get_args(ExpertActivation)
EXPERT_NORMS = get_args(ExpertNorm)
DBMTL_BASES = get_args(DBMTLBase)
ESMM_CVR_LABELS = get_args(CVRLabel)
INTERACTIONS = get_args(Interaction)
INTERACTION_OUTPUTS = get_args(InteractionOutput)


@dataclass
class ExpertsConfig:
    """``[model.experts]``: the expert MLPs of the MoE heads (and the shared bottom's style)."""

    num: int = opt(4, "experts E (omoe, mmoe)")
    hidden: list[int] = opt([256, 128], "expert MLP widths; the last is the expert output H")
    activation: ExpertActivation = opt(
        "relu",
        "experts' (and the shared bottom's) activation: "
        + one_of(EXPERT_ACTIVATIONS, swish="(HoME, 2024)"),
    )
    norm: ExpertNorm = opt(
        "none",
        "normalise each expert's output before its activation: "
        + one_of(EXPERT_NORMS, layer="(HoME's expert normalisation: every expert on one scale)"),
    )
    feature_gate_rank: int = opt(
        0,
        "HoME's feature gate: each expert reads x * 2 sigmoid(x A B) with rank-r A, B of its own "
        "(r; 0: off; not with model.gate.top_k or model.gate.gumbel)",
    )
    self_gate: bool = opt(
        False,
        "HoME's self-gate (ple, stem): each task also adds its own experts weighted by "
        "independent sigmoids, so a sparse task keeps training them",
    )


@dataclass
class GateConfig:
    """``[model.gate]``: the gates over the experts, shared by every MoE head (and read by
    :class:`mtl_dist.models.gates.Gates` as is)."""

    temperature: float = opt(
        1.0, "softmax temperature of the gates (>1 flattens: a polarization cure)"
    )
    hidden: list[int] = opt([], "gate MLP hidden widths ([]: a linear gate)")
    top_k: int = opt(0, "keep each sample's k largest gate logits, renormalised (0: dense softmax)")
    noisy: bool = opt(False, "noisy top-k: learned Gaussian noise on the gate logits in training")
    gumbel: bool = opt(False, "Gumbel-softmax straight-through one-hot gate")
    uniform_init: bool = opt(False, "near-uniform gate init: zero weights + tiny noise (a cure)")
    dselect_k: int = opt(
        0,
        "DSelect-k gate (Hazimeh et al. 2021): k selectors over the experts' binary codes, "
        "differentiable, ending with at most k non-zero weights (0: off)",
    )
    dselect_gamma: float = opt(1.0, "DSelect-k: width gamma of the smooth step")
    dselect_entropy_coef: float = opt(
        0.001, "DSelect-k: weight of the selectors' entropy (pushes each to one expert)"
    )
    expert_dropout: float = opt(
        0.0,
        "drop each gate weight with this probability in training, renormalise (a cure; 0.1 typical)",
    )
    entropy_coef: float = opt(
        0.0, "weight of the gate-entropy regulariser (a cure; 0.005-0.02 typical)"
    )
    load_balance_coef: float = opt(0.0, "weight of the top-k load-balancing auxiliary loss")
    sparse_max_fraction: float = opt(
        0.5,
        "top-k: run experts only on routed rows when at most this share of (sample, expert) pairs is selected",
    )


@dataclass
class TowerConfig:
    """``[model.tower]``: the per-task towers every head ends with."""

    hidden: list[int] = opt([64], "per-task tower MLP widths before the output unit")
    dropout: float = opt(0.0, "dropout after each tower hidden layer")
    batch_norm: bool = opt(False, "batch-normalise each tower hidden layer")


@dataclass
class SharedBottomConfig:
    """``[model.shared_bottom]``: the shared_bottom head's (and DBMTL base's) shared MLP."""

    hidden: list[int] = opt([256, 128], "shared_bottom: the shared MLP's widths")


@dataclass
class PLEConfig:
    """``[model.ple]``: Progressive Layered Extraction (Tang et al. 2020); STEM reuses its
    expert counts."""

    levels: int = opt(2, "ple: extraction levels (1 = CGC)")
    shared_experts: int = opt(2, "ple, stem: shared experts (per level)")
    task_experts: int = opt(2, "ple, stem: experts per task (per level)")


@dataclass
class STEMConfig:
    """``[model.stem]``: STEM's task-specific embedding tables (Su et al. 2024)."""

    features: list[str] = opt([], "stem: sparse features that get a table per task ([]: all)")
    dim: int = opt(8, "stem: embedding dim of the task-specific tables")


@dataclass
class AITMConfig:
    """``[model.aitm]``: the adaptive information transfer along a funnel (Xi et al. 2021)."""

    chain: list[str] = opt(
        [], "aitm: the funnel's tasks in order, e.g. click,conversion ([]: the binary tasks)"
    )
    calibration: float = opt(
        0.6, "aitm: weight of the calibrator max(p_t - p_(t-1), 0) along the chain (0: off)"
    )


@dataclass
class DBMTLConfig:
    """``[model.dbmtl]``: towers that read their parent tasks' outputs (Wang et al. 2019)."""

    base: DBMTLBase = opt("mmoe", f"dbmtl: the shared representation: {one_of(DBMTL_BASES)}")
    parents: list[str] = opt(
        [],
        "dbmtl: each task's parent tasks as task:parent+parent, e.g. conversion:click "
        "([]: each task's parent is the task before it)",
    )
    relation_hidden: list[int] = opt(
        [32], "dbmtl: widths of each task's relation MLP over its tower and its parents' outputs"
    )


@dataclass
class PEPNetConfig:
    """``[model.pepnet]``: EPNet / PPNet gates from domain and personal priors (Chang et al.
    2023)."""

    domain_features: list[str] = opt(
        [],
        "pepnet: features naming the domain / scenario; EPNet scales the head's input from them "
        "([]: no EPNet)",
    )
    prior_features: list[str] = opt(
        [],
        "pepnet: personal prior features (user / item / author ids); PPNet scales every tower "
        "layer from them ([]: no PPNet)",
    )
    gate_hidden: int = opt(64, "pepnet: hidden width of each Gate NU")


@dataclass
class ESMMConfig:
    """``[model.esmm]``: ESMM's entire-space CVR (Ma et al. 2018) and ESCM2's counterfactual
    risks beside it (Wang et al. 2022)."""

    enabled: bool = opt(
        False, "ESMM: train the CVR task through pCTCVR = pCTR x pCVR on all exposures"
    )
    ctr_task: str = opt("click", "esmm: the CTR task")
    cvr_task: str = opt(
        "conversion", "esmm: the CVR task (its label must be null or 0 where there is no click)"
    )
    cvr_label: CVRLabel = opt(
        "cvr",
        "esmm: what the CVR task's label is — "
        + one_of(
            ESMM_CVR_LABELS,
            cvr="(conversion given a click; predictions and metrics are pCVR)",
            ctcvr="(click and conversion on every exposure, e.g. a purchase column; predictions "
            "and metrics are pCTCVR = pCTR x pCVR)",
        ),
    )
    escm2_ips: float = opt(
        0.0,
        "ESCM2 beside ESMM: weight of the counterfactual CVR risk, IPS form (clicked rows' CVR "
        "loss divided by pCTR, over all exposures); needs model.esmm.cvr_label = cvr",
    )
    escm2_dr: float = opt(
        0.0,
        "ESCM2 beside ESMM: weight of the counterfactual CVR risk, doubly robust form, plus an "
        "imputation tower predicting the CVR error on every exposure (its loss at the same "
        "weight); needs model.esmm.cvr_label = cvr; not with escm2_ips",
    )


@dataclass
class InteractionConfig:
    """``[model.interaction]``: the feature interaction between the embeddings and the head."""

    kind: Interaction = opt(
        "none",
        "feature interaction between the embeddings and the head: "
        + one_of(
            INTERACTIONS,
            dot="(DLRM pairwise dot products)",
            fm="(factorisation machine 2nd-order term per dimension)",
            dcn_v2="(DCN-V2 cross network)",
            dcn_mix="(mixture of low-rank cross experts)",
        ),
    )
    output: InteractionOutput = opt(
        "concat",
        "the head's input: "
        + one_of(
            INTERACTION_OUTPUTS,
            concat="([x, interaction(x)])",
            replace="(interaction(x) alone)",
        ),
    )
    cross_layers: int = opt(3, "dcn_v2, dcn_v2_lowrank, dcn_mix: cross layers")
    cross_low_rank: int = opt(64, "dcn_v2_lowrank, dcn_mix: rank r of each cross matrix U V")
    cross_experts: int = opt(4, "dcn_mix: low-rank cross experts K per layer")


@dataclass
class ModelEmbeddingConfig:
    """``[model.embedding]``: regularisers of the looked-up embeddings (the tables' storage is
    the top-level ``[embedding]`` section)."""

    dropout: float = opt(
        0.0,
        "per-feature embedding dropout: in training, zero a sample's whole pooled embedding of "
        "a feature with this probability, the kept ones scaled by 1/(1-p) (0: off)",
    )
    l2: float = opt(
        0.0,
        "L2 on the embedding rows a batch looks up, any optimizer and device: adds "
        "l2/2 * mean over samples of the squared norm of the pooled embeddings to the "
        "loss (single-hot features: each looked-up row, as often as it occurs; 0: off)",
    )
    l2_frequency: bool = opt(
        False,
        "with l2 > 0: scale each sample's term of a feature by mean_count / count(id), the "
        "id's count in the training split (counted before training, kept in the model; a "
        "multi-hot bag: the mean over its ids), so rare ids are held hardest and the weights "
        "average 1 over the training lookups",
    )


def _section(cls: type):
    return field(default_factory=cls)


@dataclass
class ModelConfig:
    """``[model]``: the head, the dense input's norm, and one nested section per family."""

    head: Head = opt(
        "mmoe",
        "multi-task head: "
        + one_of(
            HEADS,
            aitm="(Xi et al. 2021)",
            dbmtl="(Wang et al. 2019)",
            pepnet="(Chang et al. 2023)",
        ),
    )
    dense_batch_norm: bool = opt(True, "batch-normalise the dense features at the input")
    experts: ExpertsConfig = _section(ExpertsConfig)
    gate: GateConfig = _section(GateConfig)
    tower: TowerConfig = _section(TowerConfig)
    shared_bottom: SharedBottomConfig = _section(SharedBottomConfig)
    ple: PLEConfig = _section(PLEConfig)
    stem: STEMConfig = _section(STEMConfig)
    aitm: AITMConfig = _section(AITMConfig)
    dbmtl: DBMTLConfig = _section(DBMTLConfig)
    pepnet: PEPNetConfig = _section(PEPNetConfig)
    esmm: ESMMConfig = _section(ESMMConfig)
    interaction: InteractionConfig = _section(InteractionConfig)
    embedding: ModelEmbeddingConfig = _section(ModelEmbeddingConfig)
