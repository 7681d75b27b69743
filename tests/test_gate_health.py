"""Gate health: hand-computed stats on a tiny batch; polarisation and dead experts raise alarms."""

import math

import pytest
import torch

from mtl_dist.models.heads import PLE, MoE
from mtl_dist.models.outputs import Probes
from mtl_dist.models.ple import MixedExperts
from mtl_dist.observe.gate_health import GateHealth, dead_units, gate_stats, heatmaps

GATES = Probes(gates=True)


def test_stats_match_hand_computation():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    s = gate_stats(w, threshold=0.9)
    # entropies / log 4: log 2 / log 4 = 0.5, 0, 1 → mean 0.5
    assert s["entropy_gating"].item() == pytest.approx(0.5)
    assert s["max_weight"].item() == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert s["polarized_share"].item() == pytest.approx(1 / 3)
    # mean weights (0.5833, 0.25, 0.0833, 0.0833) × 4
    util = [7 / 3, 1.0, 1 / 3, 1 / 3]
    assert s["utilization"].tolist() == pytest.approx(util)
    assert s["load_imbalance"].item() == pytest.approx(7 / 3)
    mean = sum(util) / 4
    cv = math.sqrt(sum((u - mean) ** 2 for u in util) / 4) / mean
    assert s["load_cv"].item() == pytest.approx(cv)
    assert s["load"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 1 / 3])


def test_forced_polarisation_raises_alarm_and_flag_uniform_does_not():
    torch.manual_seed(0)
    head = MoE(8, ["click", "conv"], 4, [8], [4])
    x = torch.randn(64, 8)
    health = GateHealth(head.gate_experts, threshold=0.9, dead_threshold=0.05)
    with torch.no_grad():  # near-uniform gates
        for w in head.gates.logits.weights:
            w.mul_(1e-4)
    own, across, alarms = health.update(10, head(x, GATES).gates)
    assert alarms == [] and own["gates/click/polarized"] == 0.0
    assert own["gates/click/entropy_gating"] > 0.99
    assert own["gates/experts/unused_expert_count"] == 0.0
    assert across["gates_ranks/click/max_weight/max"] == own["gates/click/max_weight"]

    with torch.no_grad():  # a huge bias on expert 2 for the click gate
        head.gates.logits.biases[0][0, 0, 2] = 50.0
    own, _, alarms = health.update(20, head(x, GATES).gates)
    assert own["gates/click/polarized"] == 1.0 and own["gates/click/max_weight"] > 0.99
    assert own["gates/conv/polarized"] == 0.0
    (alarm,) = [a for a in alarms if a.kind == "polarized"]
    assert (alarm.rank, alarm.where, alarm.expert, alarm.since) == (0, "click", 2, 20)
    assert "rank 0: gate 'click' polarised since step 20" in alarm.message()
    # still polarised at the next check: no new alarm, the 'since' step is kept
    gates = head(x, GATES).gates
    assert [a for a in health.update(30, gates)[2] if a.kind == "polarized"] == []


def test_dead_expert_needs_every_gate_to_ignore_it():
    health = GateHealth({"a": ("experts", [0, 1, 2]), "b": ("experts", [0, 1, 2])})
    ignore_2 = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    use_2 = torch.tensor([[0.2, 0.2, 0.6]] * 4)
    own, _, alarms = health.update(5, {"a": ignore_2, "b": use_2})
    assert own["gates/experts/unused_expert_count"] == 0.0 and alarms == []
    own, _, alarms = health.update(6, {"a": ignore_2, "b": ignore_2})
    assert own["gates/experts/unused_expert_count"] == 1.0
    assert [(a.kind, a.expert, a.since) for a in alarms] == [("dead", 2, 6)]
    assert "expert 2 of 'experts' unused since step 6" in alarms[0].message()


def test_ple_gates_per_level_and_heatmaps():
    torch.manual_seed(0)
    head = PLE(8, ["a", "b"], 2, MixedExperts(2, 1, [8], [4]))
    gates = head(torch.randn(16, 8), GATES).gates
    health = GateHealth(head.gate_experts)
    own, _, _ = health.update(1, gates)
    assert {
        "gates/a/level0/max_weight",
        "gates/shared/level0/max_weight",
        "gates/b/level1/load_cv",
    } <= set(own)
    assert "gates/level1/unused_expert_count" in own
    assert (
        "gates/a/level0/utilization/expert_2" in own
        and "gates/a/level0/utilization/expert_3" not in own
    )
    figs = heatmaps(head.gate_experts, gates)
    assert set(figs) == {"level0", "level1"}
    layout = health.layout()
    assert "gates a/level0" in layout and "polarisation" in layout["gates a/level0"]


def _top1(load: list[float], n: int = 100) -> torch.Tensor:
    """Top-1 weights ``[n, E]``: one-hot rows, expert e taking ``load[e]`` of them."""
    counts = [round(x * n) for x in load]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    return torch.nn.functional.one_hot(ids, len(load)).float()


def test_top1_gate_is_judged_by_its_routed_load_not_its_max_weight():
    """Every top-1 sample's largest weight is 1: the old rule declared a healthy gate (routed
    load 30/26/19/25%) polarised at the first check, and on_polarization = stop killed the run."""
    experts = {"click": ("experts", [0, 1, 2, 3])}
    health = GateHealth(experts, threshold=0.9, routed={"click": 1})
    own, _, alarms = health.update(10, {"click": _top1([0.30, 0.26, 0.19, 0.25])})
    assert alarms == [] and own["gates/click/polarized"] == 0.0
    assert own["gates/click/routed_max_share"] == pytest.approx(0.30)
    assert "gates/click/max_weight" not in own  # 1 by construction: not plotted
    assert own["gates/click/load/expert_2"] == pytest.approx(0.19)
    # a collapsed top-1 gate (95% of the rows to expert 2) is polarised, by its routed share
    own, _, alarms = health.update(20, {"click": _top1([0.02, 0.02, 0.95, 0.01])})
    (alarm,) = [a for a in alarms if a.kind == "polarized"]  # (expert 3 is also unused)
    assert own["gates/click/polarized"] == 1.0 and alarm.expert == 2
    assert "routed share 0.950, mostly on expert 2" in alarm.message()
    assert not health.dropout_acts(alarm)  # strengthen must not act on a top-1 gate


def test_top2_gate_polarised_by_the_spread_among_its_two_and_one_expert_never():
    experts = {"a": ("experts", [0, 1, 2, 3])}
    health = GateHealth(experts, threshold=0.9, routed={"a": 2})
    w = torch.zeros(8, 4)
    w[:4, 0], w[:4, 1], w[4:, 2], w[4:, 3] = 0.5, 0.5, 0.5, 0.5  # balanced among the two
    own, _, alarms = health.update(1, {"a": w})
    assert alarms == [] and own["gates/a/routed_max_share"] == pytest.approx(0.25)
    w[:4, 0], w[:4, 1], w[4:, 2], w[4:, 3] = 0.96, 0.04, 0.96, 0.04  # the second barely counts
    _, _, alarms = health.update(2, {"a": w})
    assert [a.kind for a in alarms] == ["polarized"] and health.dropout_acts(alarms[0])
    single = GateHealth({"g": ("experts", [0])}, threshold=0.9)
    own, _, alarms = single.update(1, {"g": torch.ones(5, 1)})
    assert alarms == [] and own["gates/g/polarized"] == 0.0


def test_dead_units_by_hand_and_from_the_head_when_armed():
    h = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]],  # expert 0: units 0 and 2 dead
                      [[1.0, 0.0, 0.0], [0.0, 3.0, 0.5]]])  # expert 1: all alive  # fmt: skip
    assert dead_units(h).tolist() == pytest.approx([2 / 3, 0.0])
    rows = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])  # sparse rows of experts 0, 0, 2
    shares = dead_units(rows, torch.tensor([0, 0, 2]), 3)
    assert shares[0] == 0.5 and shares[2] == 0.5 and torch.isnan(shares[1])  # 1: no row
    torch.manual_seed(0)
    head = MoE(8, ["click", "conv"], 4, [8, 6], [4])
    x = torch.randn(32, 8)
    out = head(x)
    assert out.dead is None and out.gates is None  # not asked for: nothing computed
    with torch.no_grad():  # expert 3's output layer: every unit dead
        head.experts.weights[-1][3].zero_()
        head.experts.biases[-1][3].fill_(-1.0)
    out = head(x, Probes(gates=True, dead_units=True))
    dead = out.dead["experts"]
    assert dead.shape == (4,) and dead[3] == 1.0 and (dead[:3] < 1).all()
    assert head.eval()(x, Probes(dead_units=True)).dead is None  # training forwards only
    head.train()
    health = GateHealth(head.gate_experts)
    own, _, _ = health.update(1, out.gates, out.dead)
    assert own["gates/experts/dead_activation/expert_3"] == 1.0
    ple = PLE(8, ["a", "b"], 2, MixedExperts(1, 1, [8], [4]))
    dead = ple(x, Probes(dead_units=True)).dead
    assert set(dead) == {"level0", "level1"} and dead["level1"].shape == (3,)
