"""The ``[model]`` section: the multi-task head and its families' keys (experts, gates, PLE/STEM,
AITM, DBMTL, PEPNet, ESMM/ESCM2, feature interaction, embedding regularisers), with the names
their choice keys allow. The cross-field rules live in :mod:`mtl_dist.config.model_checks`."""

from __future__ import annotations

from dataclasses import dataclass

from mtl_dist.config.base import one_of, opt

HEADS = ("shared_bottom", "omoe", "mmoe", "ple", "stem", "aitm", "dbmtl", "pepnet")
EXPERT_ACTIVATIONS = ("relu", "swish")
EXPERT_NORMS = ("none", "batch", "layer")
DBMTL_BASES = ("mmoe", "shared_bottom")
ESMM_CVR_LABELS = ("cvr", "ctcvr")
INTERACTIONS = ("none", "dot", "fm", "dcn_v2", "dcn_v2_lowrank", "dcn_mix")
INTERACTION_OUTPUTS = ("concat", "replace")


@dataclass
class ModelConfig:
    head: str = opt(
        "mmoe",
        "multi-task head: "
        + one_of(
            HEADS,
            aitm="(Xi et al. 2021)",
            dbmtl="(Wang et al. 2019)",
            pepnet="(Chang et al. 2023)",
        ),
    )
    num_experts: int = opt(4, "experts E (omoe, mmoe)")
    expert_hidden: list[int] = opt([256, 128], "expert MLP widths; the last is the expert output H")
    expert_activation: str = opt(
        "relu",
        "experts' (and the shared bottom's) activation: "
        + one_of(EXPERT_ACTIVATIONS, swish="(HoME, 2024)"),
    )
    expert_norm: str = opt(
        "none",
        "normalise each expert's output before its activation: "
        + one_of(EXPERT_NORMS, layer="(HoME's expert normalisation: every expert on one scale)"),
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
    dbmtl_base: str = opt("mmoe", f"dbmtl: the shared representation: {one_of(DBMTL_BASES)}")
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
        "feature interaction between the embeddings and the head: "
        + one_of(
            INTERACTIONS,
            dot="(DLRM pairwise dot products)",
            fm="(factorisation machine 2nd-order term per dimension)",
            dcn_v2="(DCN-V2 cross network)",
            dcn_mix="(mixture of low-rank cross experts)",
        ),
    )
    interaction_output: str = opt(
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
