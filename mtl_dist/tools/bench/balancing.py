"""What each loss balancer costs: ``python -m mtl_dist.tools.bench.balancing``.

Trains the same job (``--config``, default ``configs/default.toml``, on ``--rows`` generated rows
of the default workload) under ``torchrun`` once per
balancer of ``--balancers`` (default: every registered one), ``--steps`` steps each, taking
turns over ``--repeats`` rounds, and prints samples/s (steady: after the first 10 steps) of
each beside ``fixed`` measured in the same run, with each task's validation AUC. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics

from mtl_dist.config import BALANCERS
from mtl_dist.data.synth import generate
from mtl_dist.tools.bench.training import cpu_line, run_training


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--balancers", default=",".join(BALANCERS))
    p.add_argument("--steps", type=int, default=150, help="training steps per run")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="rounds, balancers taking turns")
    p.add_argument("--rows", type=int, default=100_000, help="training rows generated")
    p.add_argument("--data-root", default="data", help="where the generated data goes")
    a, overrides = p.parse_known_args(argv)
    data = f"{a.data_root}/balancing_{a.rows}"
    generate(data, a.rows, 20_000, files=4)  # the default workload (funnel)
    overrides = [*overrides, "--data.train_path", f"{data}/train", "--data.val_path", f"{data}/val"]
    names = [b for b in a.balancers.split(",") if b]
    names = ["fixed"] + [b for b in names if b != "fixed"]
    rates: dict[str, list[float]] = {b: [] for b in names}
    aucs: dict[str, dict[str, float]] = {}
    for _ in range(a.repeats):
        for b in names:
            m = run_training(
                a.config,
                [*overrides, "--loss.balancer", b, "--train.max_steps", str(a.steps)],
                a.nproc,
            )
            rates[b].append(m["steady_samples_per_s"])
            aucs[b] = {t: v["auc"] for t, v in m["metrics"].items() if "auc" in v}
    print(cpu_line())
    print(f"{a.config}, {a.steps} steps, {a.nproc} ranks, median of {a.repeats} rounds in turns")
    tasks = list(aucs["fixed"])
    print(
        f"{'balancer':<12}{'samples/s':>11}{'vs fixed':>10}"
        + "".join(f"{'AUC ' + t:>16}" for t in tasks)
    )
    base = statistics.median(rates["fixed"])
    for b in names:
        r = statistics.median(rates[b])
        cells = "".join(f"{aucs[b].get(t, float('nan')):>16.4f}" for t in tasks)
        print(f"{b:<12}{r:>11,.0f}{r / base:>10.2f}{cells}")


if __name__ == "__main__":
    main()
