"""bench.heads and bench.ops at a tiny size: every row printed, every figure a positive finite
number. Both call the heads' internals (the sparse mix, the fused first layer, the formulations
before issue 28) and once crashed unnoticed when those changed; this run catches that kind."""

import math
import re

from mtl_dist.tools.bench import heads, ops

NUMBER = re.compile(r"-?[\d,]+\.?\d*|nan|inf", re.IGNORECASE)


def numbers(line: str) -> list[float]:
    return [float(m.replace(",", "")) for m in NUMBER.findall(line)]


def test_bench_heads_every_head_timed(capsys):
    heads.main(
        ["--batch", "64", "--in-dim", "16", "--experts", "4", "--hidden", "16,8", "--tasks", "2"]
        + ["--reps", "1", "--rounds", "1", "--precisions", "fp32"]
    )
    out = capsys.readouterr().out
    for name in heads.build_heads(16, ["t0", "t1"], 4, [16, 8]):
        rows = [line for line in out.splitlines() if line.strip().startswith(name)]
        assert rows, f"no row for {name!r}"
        assert all(math.isfinite(v) and v > 0 for v in numbers(rows[0][len(name) + 2 :])[:2])
    assert "GFLOP/s" in out and "top-2 of 4" in out and "nan" not in out.lower()


def test_bench_ops_every_head_before_and_now(capsys):
    ops.main(
        ["--heads", ",".join(ops.HEADS), "--precisions", "fp32", "--batch", "64"]
        + ["--in-dim", "16", "--experts", "4", "--hidden", "16,8", "--rounds", "1"]
    )
    out = capsys.readouterr().out
    for head in ops.HEADS:
        rows = [line.split() for line in out.splitlines() if line.split()[:2] == [head, "fp32"]]
        assert len(rows) == 1 and len(rows[0]) == 5, f"no before / now row for {head}"
        before, now, ratio = numbers(" ".join(rows[0][2:]))
        assert before > 0 and now > 0 and math.isfinite(ratio)
    assert "matmul" in out and "nan" not in out.lower()
