"""Gate health: is each task's gate spreading its weight over the experts, or polarising?

Every ``monitor.gate_every`` steps, from the gate weights the head produced in that step (no
second forward), each rank computes per gate (a task's gate; PLE: per level, and the shared
gates) — names follow fairseq's MoE (``entropy_gating``, ``unused_expert_count``) and
Megatron-LM (``load_imbalance``):

======================================  ====================================================
``gates/<gate>/entropy_gating``         mean normalised entropy H(w) / log E, in [0, 1]
``gates/<gate>/max_weight``             mean over samples of the largest weight
``gates/<gate>/polarized_share``        share of samples whose largest weight > threshold
``gates/<gate>/utilization/expert_<e>`` mean weight ÷ fair share 1/E (1 fair, 0 dead)
``gates/<gate>/load_imbalance``         max utilisation over experts
``gates/<gate>/load_cv``                coefficient of variation of the utilisations
``gates/<gate>/load/expert_<e>``        top-k gates: share of samples routed to the expert
``gates/<gate>/routed_max_share``       top-k gates: the busiest expert's share of the routed
                                        (sample, expert) pairs (1/E balanced, 1 collapsed)
``gates/<gate>/polarized``              1 while the gate is polarised (see below)
``gates/<set>/unused_expert_count``     experts whose utilisation is below the dead
                                        threshold in every gate that can route to them
``gates/<set>/dead_activation/          share of the expert's output (last hidden layer)
expert_<e>``                            ReLU units that are 0 for every sample of the batch
                                        (expert collapse, as HoME, Kuaishou 2024, measures it)
======================================  ====================================================

Polarised means: a dense softmax gate's mean largest weight exceeds the threshold; a sparse
gate (top-k with k < E, or Gumbel: k = 1) routes a larger share than the threshold of its
(sample, expert) pairs to one expert — its largest weight is 1 by construction with k = 1, so
that says nothing — or, with k ≥ 2, its mean largest weight among the k selected exceeds the
threshold; a gate over one expert has nothing to polarise.

Each rank writes its own values to its TensorBoard run (``tb/rank_<r>``); rank 0 also writes
the cross-rank ``gates_ranks/<gate>/<metric>/{mean,min,max}``, warns on the console when a gate
polarises or an expert dies (rank, gate, level, expert, since which step), and the train loop
may stop or strengthen the cure — decided from all-gathered values, so every rank agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtl_dist.distributed import collectives
from mtl_dist.distributed.collectives import gather_rows
from mtl_dist.models.experts import dead_units

__all__ = ["Alarm", "GateHealth", "dead_units", "gate_stats", "heatmaps"]

SCALARS = [
    "entropy_gating", "max_weight", "polarized_share", "load_imbalance", "load_cv",
    "routed_max_share",
]  # fmt: skip


def gate_stats(w: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Health of one gate from its weights ``w`` ``[B, E]`` (rows sum to 1): the scalars of
    :data:`SCALARS` and per-expert ``utilization`` / ``load`` ``[E]``."""
    E = w.shape[1]
    w = w.float()
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1) / math.log(E) if E > 1 else w[:, 0] * 0
    top = w.max(-1).values
    util = w.mean(0) * E
    load = (w > 0).float().mean(0)
    return {
        "entropy_gating": entropy.mean(),
        "max_weight": top.mean(),
        "polarized_share": (top > threshold).float().mean(),
        "load_imbalance": util.max(),
        "load_cv": util.std(unbiased=False) / util.mean().clamp_min(1e-12),
        "routed_max_share": load.max() / load.sum().clamp_min(1e-12),
        "utilization": util,
        "load": load,
    }


@dataclass
class Alarm:
    """A gate that polarised (``expert`` = its favourite) or an expert that died."""

    kind: str  # "polarized" | "dead"
    rank: int
    where: str  # the gate (polarized) or the expert set (dead)
    expert: int
    since: int
    value: float  # the mean max weight (polarized) or the best utilisation (dead)
    measure: str = "mean max weight"  # sparse gates: "routed share"

    def message(self) -> str:
        level = f" (level {self.where.rsplit('level', 1)[1]})" if "/level" in self.where else ""
        if self.kind == "polarized":
            return (
                f"[gates] rank {self.rank}: gate '{self.where}'{level} polarised since step "
                f"{self.since}: {self.measure} {self.value:.3f}, mostly on expert {self.expert}"
            )
        return (
            f"[gates] rank {self.rank}: expert {self.expert} of '{self.where}' unused since step "
            f"{self.since}: utilisation {self.value:.3f} at best over its gates"
        )


class GateHealth:
    """Computes, gathers, writes and watches the gate health of ``head`` (see module doc).

    Args:
        gate_experts: ``head.gate_experts`` — gate → (expert set, the set's expert ids).
        threshold: a gate is polarised when its mean max weight exceeds it (and a sample when
            its max weight does).
        dead_threshold: an expert is unused below this utilisation in all its gates.
        routed: gate → experts each sample is routed to (k): E for a dense softmax gate,
            ``top_k`` for a top-k gate, 1 for a Gumbel gate (default: every gate dense).
    """

    def __init__(
        self,
        gate_experts: dict[str, tuple[str, list[int]]],
        threshold: float = 0.9,
        dead_threshold: float = 0.05,
        routed: dict[str, int] | None = None,
    ) -> None:
        self.gate_experts = gate_experts
        self.threshold, self.dead_threshold = threshold, dead_threshold
        routed = routed or {}
        self.k = {g: min(routed.get(g, len(ids)), len(ids)) for g, (_, ids) in gate_experts.items()}
        self.since: dict[tuple, int] = {}  # (kind, rank, where, expert) → first step seen

    def sparse(self, gate: str) -> bool:
        """Whether ``gate`` routes each sample to fewer experts than it has."""
        return self.k[gate] < len(self.gate_experts[gate][1])

    def polarized(self, gate: str, s: dict) -> bool:
        """The polarisation rule of the module docstring, on one gate's stats ``s``."""
        E, k = len(self.gate_experts[gate][1]), self.k[gate]
        if E == 1:
            return False
        if k == E:
            return s["max_weight"] > self.threshold
        return s["routed_max_share"] > self.threshold or (
            k >= 2 and s["max_weight"] > self.threshold
        )

    def dropout_acts(self, alarm: Alarm) -> bool:
        """Whether raising expert dropout can act on what ``alarm`` is about: not on a gate
        that routes each sample to one expert (dropping it leaves the sample's weights as
        they were) nor on a gate over one expert."""
        gates = (
            [alarm.where]
            if alarm.kind == "polarized"
            else [g for g, (s, _) in self.gate_experts.items() if s == alarm.where]
        )
        return any(self.k[g] >= 2 for g in gates)

    def layout(self) -> dict:
        """TensorBoard custom-scalars layout: one category per gate."""
        return {
            f"gates {gate}": {
                "polarisation": [
                    "Multiline",
                    [
                        f"gates/{gate}/{m}"
                        for m in ("entropy_gating", "max_weight", "polarized_share")
                    ],
                ],
                "utilisation per expert": ["Multiline", [f"gates/{gate}/utilization/.*"]],
                "imbalance": [
                    "Multiline",
                    [f"gates/{gate}/load_imbalance", f"gates/{gate}/load_cv"],
                ],
            }
            for gate in self.gate_experts
        }

    def _vector(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's stats of every gate, flat: per gate the scalars, then utilisation [E]."""
        parts = []
        for name in self.gate_experts:
            s = gate_stats(gates[name], self.threshold)
            parts += [torch.stack([s[k] for k in SCALARS]), s["utilization"], s["load"]]
        return torch.cat(parts)

    def _unpack(self, vec: list[float]) -> dict[str, dict[str, object]]:
        out, i = {}, 0
        for name, (_, ids) in self.gate_experts.items():
            E = len(ids)
            out[name] = dict(zip(SCALARS, vec[i : i + len(SCALARS)]))
            i += len(SCALARS)
            out[name]["utilization"] = dict(zip(ids, vec[i : i + E]))
            out[name]["load"] = dict(zip(ids, vec[i + E : i + 2 * E]))
            i += 2 * E
        return out

    def update(
        self,
        step: int,
        gates: dict[str, torch.Tensor],
        dead: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, float], dict[str, float], list[Alarm]]:
        """Call on every rank at the same steps (one all-gather).

        ``dead``: per expert set, :func:`dead_units` of its experts ``[E]`` this step (from
        the output's ``dead``; written as this rank's ``dead_activation`` scalars).

        Returns this rank's scalars, the cross-rank scalars (for rank 0 to write) and the alarms
        that started at this step (identical on every rank).
        """
        gathered = gather_rows(self._vector(gates).unsqueeze(0)).cpu().tolist()  # [R, N]
        rank = collectives.rank()
        per_rank = [self._unpack(v) for v in gathered]
        own = self._scalars(per_rank[rank], rank, step)
        for expert_set, shares in (dead or {}).items():
            own.update(
                {
                    f"gates/{expert_set}/dead_activation/expert_{e}": v
                    for e, v in enumerate(shares.tolist())
                    if math.isfinite(v)  # an expert no row was routed to: no figure
                }
            )
        across: dict[str, float] = {}
        for name in self.gate_experts:
            for k in SCALARS:
                vals = [r[name][k] for r in per_rank]
                across.update(
                    {
                        f"gates_ranks/{name}/{k}/mean": sum(vals) / len(vals),
                        f"gates_ranks/{name}/{k}/min": min(vals),
                        f"gates_ranks/{name}/{k}/max": max(vals),
                    }
                )
        alarms = [a for r, stats in enumerate(per_rank) for a in self._watch(r, stats, step)]
        return own, across, alarms

    def _scalars(self, stats: dict, rank: int, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, s in stats.items():
            shown = [k for k in SCALARS if k != "routed_max_share" or self.sparse(name)]
            if self.k[name] == 1:  # the largest weight is 1 by construction
                shown = [k for k in shown if k not in ("max_weight", "polarized_share")]
            out.update({f"gates/{name}/{k}": s[k] for k in shown})
            out.update(
                {f"gates/{name}/utilization/expert_{e}": u for e, u in s["utilization"].items()}
            )
            if self.sparse(name):
                out.update({f"gates/{name}/load/expert_{e}": v for e, v in s["load"].items()})
            out[f"gates/{name}/polarized"] = float(self.polarized(name, s))
        for expert_set, dead in self._dead(stats).items():
            out[f"gates/{expert_set}/unused_expert_count"] = float(len(dead))
        return out

    def _dead(self, stats: dict) -> dict[str, dict[int, float]]:
        """Per expert set: expert id → its best utilisation, for experts below the threshold."""
        best: dict[str, dict[int, float]] = {}
        for name, (expert_set, ids) in self.gate_experts.items():
            b = best.setdefault(expert_set, {})
            for e in ids:
                b[e] = max(b.get(e, 0.0), stats[name]["utilization"][e])
        return {s: {e: u for e, u in b.items() if u < self.dead_threshold} for s, b in best.items()}

    def _watch(self, rank: int, stats: dict, step: int) -> list[Alarm]:
        """New alarms of one rank; forget the ones that cleared."""
        now: dict[tuple, Alarm] = {}
        for name, s in stats.items():
            if self.polarized(name, s):
                by = "load" if self.sparse(name) else "utilization"
                favourite = max(s[by], key=s[by].get)
                value = s["routed_max_share"] if self.sparse(name) else s["max_weight"]
                measure = "routed share" if self.sparse(name) else "mean max weight"
                now[("polarized", rank, name, favourite)] = Alarm(
                    "polarized", rank, name, favourite, step, value, measure
                )
        for expert_set, dead in self._dead(stats).items():
            for e, u in dead.items():
                now[("dead", rank, expert_set, e)] = Alarm("dead", rank, expert_set, e, step, u)
        for key in [k for k in self.since if k[1] == rank and k not in now]:
            del self.since[key]  # recovered
        new = []
        for key, alarm in now.items():
            if key not in self.since:
                self.since[key] = step
                new.append(alarm)
        return new


def heatmap_figure(name: str, gates: list[str], experts: list[int], weights: list[list[float]]):
    """A gate × expert heatmap of mean gate weights (NaN: the gate cannot route there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(experts), 0.8 + 0.45 * len(gates)))
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(experts)), [f"e{e}" for e in experts])
    ax.set_yticks(range(len(gates)), gates)
    ax.set_title(f"mean gate weight: {name}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def heatmaps(
    gate_experts: dict[str, tuple[str, list[int]]], gates: dict[str, torch.Tensor]
) -> dict[str, object]:
    """One figure per expert set from this rank's last gate weights: ``{set: figure}``."""
    figs = {}
    for expert_set in dict.fromkeys(s for s, _ in gate_experts.values()):
        names = [g for g, (s, _) in gate_experts.items() if s == expert_set]
        experts = sorted({e for g in names for e in gate_experts[g][1]})
        rows = []
        for g in names:
            mean = dict(zip(gate_experts[g][1], gates[g].float().mean(0).tolist()))
            rows.append([mean.get(e, float("nan")) for e in experts])
        figs[expert_set] = heatmap_figure(expert_set, names, experts, rows)
    return figs
