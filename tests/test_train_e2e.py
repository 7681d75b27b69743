"""The whole path under torchrun with 2 processes on CPU: Parquet → sharded EBC → MMoE → metrics."""

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, torchrun


def train(synth_data, out, *extra):
    args = [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(synth_data / "train"), "--data.val_path", str(synth_data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false", *extra,
    ]  # fmt: skip
    proc = torchrun(args, nproc=2)
    assert proc.returncode == 0
    return json.loads((out / "metrics.json").read_text()), proc


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # 160k rows / 2 ranks / batch 256 = 312 steps per rank, validation mid-way and at the end
    result, proc = train(
        synth_data, out, "--train.batch_size", "256", "--train.val_every", "150",
        "--monitor.gate_every", "25", "--monitor.heatmap_every", "100",
        "--monitor.conflict_every", "50",
    )  # fmt: skip
    return result, out, proc


def test_auc_close_to_oracle(trained):
    result, _, proc = trained
    m = result["metrics"]
    print({t: {k: round(v, 4) for k, v in mt.items()} for t, mt in m.items()})
    assert result["world_size"] == 2 and result["steps"] == 312
    for task, max_gap in (("click", 0.075), ("conversion", 0.09)):
        auc, oracle = m[task]["auc"], m[task]["oracle_auc"]
        assert auc > 0.68, (task, auc)
        assert oracle - auc < max_gap, (task, auc, oracle)
    # conversion is only labelled after a click: its metrics count the clicked rows only
    assert 0.1 * 40_000 < m["conversion"]["count"] < 0.25 * 40_000
    assert m["click"]["count"] == 40_000
    assert m["watch_time"]["mse"] < m["watch_time"]["oracle_mse"] + 0.08
    assert "validation (model vs oracle" in proc.stdout and "oracle" in proc.stdout


def test_tensorboard_events_written_and_readable(trained):
    """Every rank's run directory holds its own documented tags with finite, in-range values;
    rank 0 adds validation, cross-rank gate summaries and the gradient-conflict probe."""
    result, out, _ = trained
    tasks = ("click", "conversion", "watch_time")
    per_rank = [f"train/loss/{t}" for t in tasks] + [
        "train/loss", "train/weight/click", "train/lr/dense", "train/lr/embedding",
        "perf/samples_per_s", "perf/peak_memory_mb", "perf/step_ms/total",
        *[f"perf/share/{p}" for p in ("data", "forward", "backward", "optimizer")],
        "gates/experts/unused_expert_count",
        *[f"gates/{t}/{m}" for t in tasks for m in (
            "entropy_gating", "max_weight", "polarized_share", "load_imbalance", "load_cv",
            "polarized", "utilization/expert_0", "utilization/expert_3")],
    ]  # fmt: skip
    rank0_only = [
        "val/click/auc", "val/click/oracle_auc", "val/click/calibration", "val/watch_time/mse",
        "perf/global_samples_per_s", "gates_ranks/click/max_weight/max",
        "conflict/click__conversion", "conflict/conversion__watch_time",
    ]  # fmt: skip
    for rank in (0, 1):
        acc = EventAccumulator(str(out / "tb" / f"rank_{rank}"), size_guidance={"images": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert set(per_rank) <= tags, set(per_rank) - tags
        assert (set(rank0_only) <= tags) == (rank == 0)
        assert "gates/experts/heatmap" in acc.Tags()["images"]
        values = {t: [e.value for e in acc.Scalars(t)] for t in tags}
        assert all(math.isfinite(v) for vs in values.values() for v in vs)
        assert [e.step for e in acc.Scalars("gates/click/max_weight")] == list(range(25, 301, 25))
        for t, vs in values.items():
            if t.startswith("gates/") and t.endswith(("entropy_gating", "polarized_share")):
                assert all(0 <= v <= 1 for v in vs), t
            if t.endswith("max_weight"):  # at least the fair share 1/E
                assert all(0.25 - 1e-6 <= v <= 1 for v in vs), t
            if t.startswith(("perf/share/", "conflict/")):
                assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in vs), t
        shares = sum(
            values[f"perf/share/{p}"][-1] for p in ("data", "forward", "backward", "optimizer")
        )
        assert shares == pytest.approx(1.0, abs=1e-6)
        if rank == 0:
            aucs = acc.Scalars("val/click/auc")
            assert [e.step for e in aucs] == [150, 300, 312]
            assert aucs[-1].value == pytest.approx(result["metrics"]["click"]["auc"], abs=1e-6)
            assert "attribution" in acc.Tags()["images"]
    attribution = (out / "attribution.csv").read_text().splitlines()
    assert attribution[0].startswith("feature,click,conversion,watch_time,rank_click")
    assert len(attribution) == 1 + 21 + 12  # a row per sparse and dense feature


def test_same_seed_same_numbers(synth_data, tmp_path):
    a, _ = train(synth_data, tmp_path / "a", "--train.max_steps", "20", "--train.batch_size", "256")
    b, _ = train(synth_data, tmp_path / "b", "--train.max_steps", "20", "--train.batch_size", "256")
    assert a["metrics"] == b["metrics"]
    c, _ = train(
        synth_data,
        tmp_path / "c",
        "--train.max_steps",
        "20",
        "--train.batch_size",
        "256",
        "--train.seed",
        "1",
    )
    assert c["metrics"]["click"]["auc"] != a["metrics"]["click"]["auc"]


@pytest.mark.parametrize(
    "head_args",
    [
        [
            "--model.head",
            "dbmtl",
            "--model.dbmtl.base",
            "shared_bottom",
            "--model.dbmtl.parents",
            "conversion:click",
            "--loss.balancer",
            "famo",
        ],
        ["--model.head", "omoe", "--model.gate.expert_dropout", "0.1", "--loss.balancer", "gls"],
        [
            "--model.head",
            "mmoe",
            "--model.gate.top_k",
            "2",
            "--model.gate.noisy",
            "true",
            "--model.gate.load_balance_coef",
            "0.01",
            "--loss.balancer",
            "mgda",
        ],
        [
            "--model.head",
            "ple",
            "--model.ple.levels",
            "2",
            "--model.gate.entropy_coef",
            "0.01",
            "--model.experts.activation",
            "swish",
            "--model.experts.norm",
            "layer",
            "--model.experts.self_gate",
            "true",
            "--model.experts.feature_gate_rank",
            "8",
        ],
        [
            "--model.head",
            "mmoe",
            "--model.esmm.enabled",
            "true",
            "--model.gate.dselect_k",
            "2",
            "--model.esmm.escm2_dr",
            "0.2",
        ],
        [
            "--model.head",
            "stem",
            "--model.stem.features",
            "user_id,item_id,author_id",
            "--model.ple.task_experts",
            "1",
            "--loss.balancer",
            "pcgrad",
        ],
        [
            "--model.head",
            "pepnet",
            "--model.pepnet.domain_features",
            "device_type,network_type",
            "--model.pepnet.prior_features",
            "user_id,item_id,author_id",
            "--loss.balancer",
            "imtl_g",
        ],
        [
            "--model.head",
            "aitm",
            "--model.aitm.chain",
            "click,conversion",
            "--loss.balancer",
            "stch",
        ],
    ],
    ids=["dbmtl_shared_bottom", "omoe", "mmoe_top2", "ple", "mmoe_esmm", "stem", "pepnet", "aitm"],
)
def test_every_head_trains_sharded_under_torchrun(synth_data, tmp_path, head_args):
    """Each head trains on the sharded-embedding path with 2 processes and learns something."""
    result, _ = train(
        synth_data, tmp_path, *head_args, "--train.max_steps", "200", "--train.batch_size", "256",
        "--model.experts.hidden", "64,32", "--model.shared_bottom.hidden", "64,32", "--train.log_every", "20",
    )  # fmt: skip
    m = result["metrics"]
    assert result["steps"] == 200
    assert m["click"]["auc"] > 0.6 and m["conversion"]["auc"] > 0.55, m
    acc = EventAccumulator(str(tmp_path / "tb" / "rank_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if "--model.gate.load_balance_coef" in head_args:
        assert "train/aux/load_balance" in tags
    if "--model.gate.entropy_coef" in head_args:
        assert "train/aux/gate_entropy" in tags
    if "aitm" in head_args:
        assert "train/aux/aitm_calibration" in tags
    if "--model.gate.dselect_k" in head_args:
        assert "train/aux/dselect_entropy" in tags
    if "--loss.balancer" in head_args:  # a new balancer's weights, logged per task
        assert {"train/weight/click", "train/weight/conversion"} <= tags, tags
    if "stem" in head_args:  # the task-specific tables are planned and sharded like the rest
        for table in ("user_id__click", "item_id__conversion", "author_id__watch_time"):
            assert table in result["plan"], result["plan"]


INTERACTION_RUNS = {  # each option once, each under another head; the dense part is DDP-trained
    "dot_ple": ["--model.interaction.kind", "dot", "--model.head", "ple", "--model.ple.levels", "1"],
    "fm_shared_bottom": [
        "--model.interaction.kind", "fm", "--model.head", "shared_bottom",
        "--model.embedding.dropout", "0.1",
    ],
    "dcn_v2_stem": [
        "--model.interaction.kind", "dcn_v2", "--model.interaction.cross_layers", "2", "--model.head", "stem",
        "--model.stem.features", "user_id,item_id", "--model.ple.task_experts", "1",
        "--model.embedding.l2", "1e-4",
    ],
    "dcn_v2_lowrank_replace_aitm": [
        "--model.interaction.kind", "dcn_v2_lowrank", "--model.interaction.output", "replace",
        "--model.interaction.cross_low_rank", "32", "--model.head", "aitm",
        "--model.aitm.chain", "click,conversion",
    ],
    "dcn_mix_mmoe_top2": [
        "--model.interaction.kind", "dcn_mix", "--model.interaction.cross_layers", "2", "--model.interaction.cross_low_rank",
        "16", "--model.gate.top_k", "2", "--model.gate.load_balance_coef", "0.01",
    ],
}  # fmt: skip


@pytest.mark.parametrize("args", INTERACTION_RUNS.values(), ids=INTERACTION_RUNS.keys())
def test_every_interaction_trains_sharded_under_torchrun(synth_data, tmp_path, args):
    """Each interaction option under 2 processes, in front of a different head: it trains (its
    parameters leave their initial values in the checkpoint: the dense optimizer steps them),
    the model learns, and attribution still ranks the 21 sparse + 12 dense input features."""
    import torch

    from mtl_dist.checkpoint.store import resolve_checkpoint
    from mtl_dist.config import load_config
    from mtl_dist.serve.export import build_unsharded, load_checkpoint_model

    result, _ = train(
        synth_data, tmp_path, *args, "--train.max_steps", "200", "--train.batch_size", "256",
        "--model.experts.hidden", "32,16", "--model.shared_bottom.hidden", "32,16",
        "--train.val_max_batches", "20", "--monitor.attribution_batches", "2",
    )  # fmt: skip
    m = result["metrics"]
    assert result["steps"] == 200
    assert m["click"]["auc"] > 0.6 and m["conversion"]["auc"] > 0.55, m
    attribution = (tmp_path / "attribution.csv").read_text().splitlines()
    assert len(attribution) == 1 + 21 + 12
    assert {row.split(",")[0] for row in attribution[1:]} >= {"user_id", "dense_0"}
    cfg, trained = load_checkpoint_model(resolve_checkpoint(tmp_path / "checkpoints" / "latest"))
    assert cfg.model.interaction.kind == args[1]
    fresh = build_unsharded(load_config(["--config", "configs/default.toml", *args]))
    moved = [
        not torch.equal(p, dict(fresh.model.interaction.named_parameters())[name])
        for name, p in trained.model.interaction.named_parameters()
    ]
    assert moved and all(moved)


@pytest.mark.parametrize("balancer", ["gradnorm", "uncertainty", "dwa"])
def test_balancers_train_with_equal_weights_on_every_rank(synth_data, tmp_path, balancer):
    """Each balancer under 2 processes: weights move, are logged, and agree across ranks. The
    gradnorm run also downsamples click negatives (rate 0.3) and reports GAUC by user."""
    cfg = (ROOT / "configs" / "default.toml").read_text()
    if balancer == "gradnorm":
        cfg = cfg.replace('label = "click"\n', 'label = "click"\nnegative_rate = 0.3\n')
    (tmp_path / "job.toml").write_text(cfg)
    result, _ = train(
        synth_data, tmp_path / "run", "--config", str(tmp_path / "job.toml"),
        "--loss.balancer", balancer, "--loss.dwa_period", "20", "--train.gauc_by", "user_id",
        "--train.max_steps", "120", "--train.batch_size", "256", "--train.log_every", "20",
        "--model.experts.hidden", "64,32",
    )  # fmt: skip
    by_rank = result["task_weights_by_rank"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    assert max(abs(w - 1.0) for w in by_rank[0]) > 1e-3, by_rank  # the balancer acted
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "rank_0"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/weight/click")]
    assert len(steps) > 1 if balancer != "dwa" else steps[-1] >= 60, steps
    click = result["metrics"]["click"]
    assert 0.5 < click["gauc"] <= 1 and 0.5 < click["oracle_gauc"] <= 1
    if balancer == "gradnorm":
        # trained on ~3x inflated positive rate; predictions are corrected to the true scale
        assert abs(click["calibration"] - 1) < 0.15, click


def gate_run(synth_data, tmp_path, *extra: str):
    """40 small steps on 2 ranks with gate health every 10 steps."""
    args = [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(synth_data / "train"), "--data.val_path", str(synth_data / "val"),
        "--train.output_dir", str(tmp_path), "--train.progress_bar", "false",
        "--train.max_steps", "40", "--train.batch_size", "256", "--model.experts.hidden", "32,16",
        "--monitor.gate_every", "10", *extra,
    ]  # fmt: skip
    return torchrun(args, nproc=2, timeout=300)


@pytest.mark.parametrize("action", ["stop", "strengthen"])
def test_polarising_gate_stops_the_run_or_strengthens_the_cure(synth_data, tmp_path, action):
    """A near-hard gate (temperature 0.02) polarises; every rank reacts alike, none hangs."""
    proc = gate_run(
        synth_data, tmp_path, "--model.gate.temperature", "0.02",
        "--monitor.on_polarization", action,
    )  # fmt: skip
    assert "polarised since step 10" in proc.stdout + proc.stderr
    if action == "stop":
        assert proc.returncode != 0
        assert "stopping (monitor.on_polarization = stop)" in proc.stderr
        assert not (tmp_path / "metrics.json").exists()
    else:
        assert proc.returncode == 0
        assert "strengthening the cure: expert dropout now [0.1]" in proc.stdout


def test_top1_routing_is_not_polarised_and_logs_dead_units(synth_data, tmp_path):
    """Top-1 gates put weight 1 on one expert per sample by construction: a healthy run with
    on_polarization = stop must finish (it used to be killed at the first check), judged by
    the routed load; every expert's dead-unit share is logged with gate health."""
    proc = gate_run(
        synth_data, tmp_path, "--model.gate.top_k", "1", "--model.gate.load_balance_coef", "0.01",
        "--monitor.on_polarization", "stop",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "polarised" not in proc.stdout
    for rank in (0, 1):
        acc = EventAccumulator(str(tmp_path / "tb" / f"rank_{rank}"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert "gates/click/max_weight" not in tags  # 1 by construction with k = 1
        shares = [e.value for e in acc.Scalars("gates/click/routed_max_share")]
        assert [e.step for e in acc.Scalars("gates/click/polarized")] == [10, 20, 30, 40]
        assert all(0.25 <= v < 0.9 for v in shares), shares
        assert all(e.value == 0.0 for e in acc.Scalars("gates/click/polarized"))
        dead = [t for t in tags if t.startswith("gates/experts/dead_activation/expert_")]
        assert dead, tags
        for t in dead:
            assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(t))
            assert {e.step for e in acc.Scalars(t)} <= {10, 20, 30, 40}
