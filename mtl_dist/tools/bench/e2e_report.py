"""The end-to-end benchmark's report: each row's speed against the best peer and AUC gap to the
oracle, the finite-figures check, and the Markdown of the table, roofline, scaling, levers,
step profiles, memory and the sequence rows."""

from __future__ import annotations

import math

from mtl_dist.observe.profiling import PHASES
from mtl_dist.tools.bench.e2e_runs import TASKS


def with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each row's speed relative to the fastest peer (None without peers)."""
    peers = [r["samples_per_s"] for r in rows if r["system"] != "mtl-dist"]
    best = max(peers) if peers else None
    for r in rows:
        r["speed_vs_best_peer"] = r["samples_per_s"] / best if best else None
        r["auc_gap"] = {t: gap(r["oracle_auc"][t], r["auc"][t]) for t in TASKS}
    return rows


def steady(row: dict[str, object]) -> str:
    """Ours: samples/s after the first 10 steps (tracing, warm-up); '-' for the peers."""
    rate = row.get("steady_samples_per_s")
    return f"{rate:,.0f}" if rate else "-"


def markdown(result: dict[str, object]) -> str:
    """The table (and profiles, scaling, memory) as Markdown."""
    lines = _table_lines(result) + _roofline_lines(result) + _scaling_lines(result)
    lines += _lever_lines(result) + _profile_lines(result) + _memory_lines(result)
    lines += _sequence_lines(result)
    return "\n".join(lines) + "\n"


def _table_lines(result: dict[str, object]) -> list[str]:
    """The CPU line, a row per system, layout and precision, then ours against each peer."""
    head = (
        "| system | precision | procs × threads | samples/s (epoch) | after 10 steps | × best peer "
        "| peak RSS / proc (MiB) | " + " | ".join(f"{t} AUC (oracle, gap)" for t in TASKS) + " |"
    )
    lines = [result.get("cpu", ""), "", head, "|" + "---|" * (7 + len(TASKS))]
    for r in result["table"]:
        ratio = r["speed_vs_best_peer"]
        aucs = " | ".join(
            f"{num(r['auc'][t])} ({num(r['oracle_auc'][t])}, {num(r['auc_gap'][t], '+.4f')})"
            for t in TASKS
        )
        lines.append(
            f"| {r['system']} | {r.get('precision', 'fp32')} | {r['layout'].replace('x', ' × ')} "
            f"| {r['samples_per_s']:,.0f} | "
            f"{steady(r)} | "
            f"{'-' if ratio is None else f'{ratio:.2f}×'} | {r['peak_rss_mb']:,.0f} | {aucs} |"
        )
    for peer, ratio in result.get("ours_vs_peer", {}).items():
        lines.append(f"\nOurs at its fastest layout against {peer}: **{ratio:.2f}×** samples/s.")
    return lines


def _roofline_lines(result: dict[str, object]) -> list[str]:
    """The dense model's cost, the matmul rate per layout and the samples/s it caps, ours beside."""
    hw, roof = result["matmul_gflops"], result["roofline_samples_per_s"]
    lines = [
        "",
        f"Roofline: the dense model costs {result['model_mflop_per_sample']:.2f} MFLOP per sample "
        "(forward + backward); the matmul rate measured in this run, and the samples/s it caps:",
        "",
        "| procs × threads | matmul GFLOP/s | roofline samples/s | ours | ours / roofline |",
        "|---|---|---|---|---|",
    ]
    ours = {
        r["layout"] + ("" if r["precision"] == "fp32" else f" {r['precision']}"): r["samples_per_s"]
        for r in result["table"]
        if r["system"] == "mtl-dist"
    }
    for k in roof:
        mine = ours.get(k)
        lines.append(
            f"| {k.replace('x', ' × ')} | {hw[k]:.0f} | {roof[k]:,.0f} | "
            + (f"{mine:,.0f} | {mine / roof[k]:.0%} |" if mine else "- | - |")
        )
    return lines


def _scaling_lines(result: dict[str, object]) -> list[str]:
    """Ours at 2 × 1 against 1 × 1, and a pure matmul's (none without both layouts)."""
    if not result.get("scaling"):
        return []
    s, st, hw = result["scaling"], result["scaling_steady"], result["matmul_gflops"]
    return [
        "",
        f"2 processes × 1 thread / 1 process × 1 thread: **{s:.2f}×** over the epoch, "
        f"**{st:.2f}×** after 10 steps (2 × 1 trains half as many steps, so its fixed start "
        f"costs weigh double); a pure matmul in two processes against one, same run: "
        f"{hw['scaling_2x1']:.2f}×",
    ]


def _lever_lines(result: dict[str, object]) -> list[str]:
    """Ours with each lever toggled alone against the defaults (none without ``--levers``)."""
    if not result.get("levers"):
        return []
    base = result["levers"]["defaults"]
    lines = ["", f"Levers, ours at {result['levers_layout'].replace('x', ' × ')}, each alone:"]
    lines += ["", "| change | samples/s | vs defaults |", "|---|---|---|"]
    for name, rate in result["levers"].items():
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f}× |")
    return lines


def _profile_lines(result: dict[str, object]) -> list[str]:
    """Each profiled layout's step phases: ms per step and share."""
    lines: list[str] = []
    for name, prof in result.get("profiles", {}).items():
        lines += [
            "",
            f"Step profile, ours at {name} (rank 0, {prof['step_ms']:.1f} ms per step):",
            "",
            "| phase | ms / step | share |",
            "|---|---|---|",
        ]
        lines += [f"| {p} | {prof['ms'][p]:.2f} | {prof['share'][p]:.1%} |" for p in PHASES]
    return lines


def _memory_lines(result: dict[str, object]) -> list[str]:
    """Peak RSS per process against dataset size (none without ``--memory-rows``)."""
    if not result.get("memory"):
        return []
    lines = ["", "Peak RSS per process against dataset size (ours, one epoch each):", ""]
    lines += [
        "| train rows | procs × threads | peak RSS / proc (MiB) | samples/s | "
        + " | ".join(f"{t} AUC (gap)" for t in TASKS)
        + " |",
        "|---|---|---|---|" + "---|" * len(TASKS),
    ]
    for m in result["memory"]:
        aucs = " | ".join(
            f"{num(m['auc'][t])} ({num(gap(m['oracle_auc'][t], m['auc'][t]), '+.4f')})"
            for t in TASKS
        )
        lines.append(
            f"| {m['rows']:,} | {m['layout'].replace('x', ' × ')} | {m['peak_rss_mb']:,.0f} "
            f"| {m['samples_per_s']:,.0f} | {aucs} |"
        )
    return lines


def _sequence_lines(result: dict[str, object]) -> list[str]:
    """Ours on the ``sequences`` workload at each ``max_len``, against the same model without
    its sequence on the same rows (none without ``--sequences``)."""
    rows = result.get("sequences")
    if not rows:
        return []
    tasks = list(rows[0]["auc"])
    r0 = rows[0]
    lines = [
        "",
        f"Sequences: ours on the `sequences` workload ({result.get('train_rows', '?'):,} "
        f"training rows regenerated with histories of up to `max_len` items, one epoch of "
        f"`configs/sequences.toml` at `max_len`, {r0['precision']}, "
        f"{r0['layout'].replace('x', ' × ')}, batch {result.get('batch', '?')} per process). "
        "× no sequence: samples/s over the same config without its `[[features.sequence]]` "
        "(pooling none) on the same rows — the history's whole cost (reader, lookups, pooling):",
        "",
        "| max_len | pooling | samples/s (epoch) | after 10 steps | × no sequence "
        "| peak RSS / proc (MiB) | " + " | ".join(f"{t} AUC (oracle, gap)" for t in tasks) + " |",
        "|---|" + "---|" * (5 + len(tasks)),
    ]
    for r in rows:
        aucs = " | ".join(
            f"{num(r['auc'][t])} ({num(r['oracle_auc'][t])}, "
            f"{num(gap(r['oracle_auc'][t], r['auc'][t]), '+.4f')})"
            for t in tasks
        )
        lines.append(
            f"| {r['max_len']} | {r['pooling']} | {r['samples_per_s']:,.0f} | {steady(r)} "
            f"| {r['speed_vs_no_sequence']:.2f}× | {r['peak_rss_mb']:,.0f} | {aucs} |"
        )
    return lines


def gap(a: float | None, b: float | None) -> float | None:
    """``a - b``, None when either is undefined."""
    return None if a is None or b is None else a - b


def num(x: float | None, spec: str = ".4f") -> str:
    """A figure for the table: 'undefined' where there is none (None), never 'None'; a NaN
    (a diverged run) is refused by :func:`check_finite` before any table is printed."""
    return "undefined" if x is None else format(x, spec)


def check_finite(result: dict[str, object]) -> None:
    """Every speed and memory figure must be a finite number, every AUC finite or undefined
    (None, printed as 'undefined'), in the table and the sequence rows: the smoke test's
    contract. Raises ``RuntimeError`` naming the row."""
    for r in [*result["table"], *result.get("sequences", [])]:
        figures = [r["samples_per_s"], r["peak_rss_mb"]]
        figures += [x for x in (*r["auc"].values(), *r["oracle_auc"].values()) if x is not None]
        figures += [r["speed_vs_no_sequence"]] if "speed_vs_no_sequence" in r else []
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in figures):
            raise RuntimeError(f"non-finite figure in the {r['system']} {r['layout']} row: {r}")
