"""The runs of a comparison, planned before any training: head labels (``mmoe+esmm+famo``) to
training overrides, every (head, seed) run with its config loaded and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl_dist.config import BALANCERS, ConfigError, JobConfig, load_config, to_dict
from mtl_dist.data.source import check_filters

HEADS = ["shared_bottom", "omoe", "mmoe", "ple", "stem"]
SWEEP_HEADS = ["shared_bottom", "mmoe"]
# metric keys that describe the data, not the model: left out of the comparison


class CompareError(RuntimeError):
    """A comparison cannot go on; the message names the run (and its log) at fault."""


def head_args(label: str) -> list[str]:
    """Training overrides of a head label: ``mmoe``, ``mmoe+esmm``, ``mmoe+famo`` (a loss
    balancer of ``loss.balancer``) or both, ``mmoe+esmm+famo``."""
    base, *mods = label.split("+")
    unknown = [m for m in mods if m != "esmm" and m not in BALANCERS]
    if unknown:
        raise CompareError(
            f"--heads: {label!r}: unknown modifier {unknown[0]!r} (known: esmm, "
            f"{', '.join(BALANCERS)})"
        )
    args = ["--model.head", base, "--model.esmm.enabled", "true" if "esmm" in mods else "false"]
    return args + [a for m in mods if m in BALANCERS for a in ("--loss.balancer", m)]


def with_balancers(heads: list[str], balancers: list[str]) -> list[str]:
    """Every head label once per balancer (``mmoe+famo``); the labels alone without any."""
    return [f"{h}+{b}" for h in heads for b in balancers] if balancers else heads


def has_esmm_tasks(cfg: JobConfig) -> bool:
    kinds = {t.name: t.kind for t in cfg.tasks}
    return all(kinds.get(n) == "binary" for n in (cfg.model.esmm.ctr_task, cfg.model.esmm.cvr_task))


def default_heads(cfg: JobConfig) -> list[str]:
    return HEADS + ([f"{h}+esmm" for h in HEADS] if has_esmm_tasks(cfg) else [])


@dataclass(frozen=True)
class Run:
    """One training run: a head with a seed, its arguments and the config they resolve to."""

    head: str
    seed: int
    dir: Path
    argv: list[str]  # mtl_dist.train arguments
    config: dict[str, Any]  # to_dict of the resolved config, as metrics.json stores it

    @property
    def name(self) -> str:
        return f"{self.head}/seed{self.seed}"


def plan_runs(
    config: str, overrides: list[str], heads: list[str], seeds: list[int], out: Path
) -> list[Run]:
    """Every (head, seed) run, each config loaded and validated now: a bad head or override
    stops the command before any training, naming the run."""
    runs = []
    for head in heads:
        for seed in seeds:
            run_dir = out / head / f"seed{seed}"
            argv = [
                "--config", config, *overrides, *head_args(head), "--train.seed", str(seed),
                "--train.output_dir", str(run_dir), "--train.progress_bar", "false",
            ]  # fmt: skip
            try:
                cfg = check_filters(load_config(argv))
            except ConfigError as e:
                raise CompareError(f"run {head}/seed{seed}: {e}") from None
            # through JSON, as metrics.json holds it (tuples become lists)
            resolved = json.loads(json.dumps(to_dict(cfg)))
            runs.append(Run(head, seed, run_dir, argv, resolved))
    return runs
