"""Submit training to Slurm: ``mtl-submit`` / ``python -m mtl_dist.tools.submit``.

Renders an sbatch script from a config and flags and submits it with ``sbatch`` (``--dry-run``
prints it instead). The script runs one ``srun`` task per node; each starts ``torchrun`` with a
c10d rendezvous on the allocation's first node, and torchrun starts ``mtl_dist.train``.

* Sweeps: ``--sweep model.head=mmoe,ple --sweep train.seed=0,1`` is one job array with an element
  per combination (``--sweep config=a.toml,b.toml`` sweeps configs). Each element trains in its
  own run dir ``<output-dir>/<job-name>/<head-mmoe_seed-0>``, so
  ``tensorboard --logdir <output-dir>/<job-name>`` compares the runs.
* Preemption: ``--requeue`` and ``--signal=B:TERM@<secs>``; the batch shell traps SIGTERM (time
  limit close, or preemption), passes it on to training — which saves a checkpoint at a step
  every rank agrees on and exits 75 (:mod:`mtl_dist.loop.preempt`) — waits for it, then runs
  ``scontrol requeue $SLURM_JOB_ID``. The requeued job runs the same script with the same job
  id and the SAME run dir (its name holds no job id), so training resumes exactly where it
  stopped. Logs are appended (``--open-mode=append``).
* Quoting: every value in a shell line goes through ``shlex.quote``; ``#SBATCH`` values are
  checked (no line breaks or double quotes) and double-quoted, so a job name or path with spaces
  or ``;$()`` is one argument, never code. ``--setup`` lines are shell code by intent.

Example::

    mtl-submit --config configs/default.toml --nodes 4 --gpus-per-node 8 --time 04:00:00 \\
        --partition gpu --setup 'source .venv/bin/activate' -- --train.batch_size 4096
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtl_dist.loop.preempt import REQUEUE_EXIT_CODE

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (runs of other characters become ``_``), at most
    100 characters."""
    return _SAFE.sub("_", text).strip("_")[:100] or "job"


@dataclass
class SweepElement:
    """One array element: its run-dir name, config path and extra train overrides."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class SubmitSpec:
    """Everything the sbatch script depends on."""

    config: str
    job_name: str = "mtl"
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0  # 0: GPUs per node, or 2 on CPU nodes
    cpus_per_node: int = 0  # 0: Slurm's default
    mem: str = ""
    time: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    output_dir: str = "runs/slurm"
    workdir: str = "."
    setup: list[str] = field(default_factory=list)
    python: str = "python"
    train_args: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)
    requeue: bool = True
    signal_secs: int = 120
    port: int = 0  # 0: 20000 + job id mod 20000
    ifname: str = ""
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def nproc(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 2

    @property
    def run_root(self) -> str:
        """``<output_dir>/<job name>``: the sweep dir (a single job's run dir)."""
        out = self.output_dir
        if not os.path.isabs(out):
            out = os.path.join(self.workdir, out)
        return os.path.normpath(os.path.join(out, safe_name(self.job_name)))


def expand_sweep(config: str, sweep: list[str]) -> list[SweepElement]:
    """``["model.head=mmoe,ple", "train.seed=0,1"]`` → 4 elements (cartesian product).

    The key ``config`` sweeps config files. No sweep: one element with an empty name.
    """
    axes: list[tuple[str, list[str]]] = []
    for item in sweep:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        axes.append((key.strip().removeprefix("--"), vals))
    if not axes:
        return [SweepElement("", config)]
    elements, seen = [], set()
    for combo in itertools.product(*(vals for _, vals in axes)):
        cfg, overrides, parts = config, [], []
        for (key, _), value in zip(axes, combo):
            if key == "config":
                cfg = value
                parts.append(f"config-{Path(value).stem}")
            else:
                overrides += [f"--{key}", value]
                parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
        name = safe_name("_".join(parts))
        if name in seen:
            name = f"{len(elements):03d}_{name}"
        seen.add(name)
        elements.append(SweepElement(name, cfg, overrides))
    return elements


def _directive_value(key: str, value: str) -> str:
    """An ``#SBATCH`` value: sbatch parses these lines itself (no shell), so a value must not
    break the line; it is double-quoted so spaces stay inside one argument."""
    if any(c in value for c in '\n\r\0"'):
        raise ValueError(f"--{key}: line breaks and double quotes are not allowed: {value!r}")
    return f'"{value}"' if re.search(r"\s", value) else value


def _sbatch_header(spec: SubmitSpec, elements: list) -> list[str]:
    """``#!/bin/bash`` and the ``#SBATCH`` directives (an array over a sweep's elements)."""
    array = len(elements) > 1
    root = spec.run_root
    log = os.path.join(root, "logs", f"{safe_name(spec.job_name)}-{'%A_%a' if array else '%j'}.out")
    d: list[tuple[str, str]] = [
        ("job-name", spec.job_name),
        ("nodes", str(spec.nodes)),
        ("ntasks-per-node", "1"),
        ("output", log),
        ("open-mode", "append"),
    ]
    if spec.gpus_per_node:
        d.append(("gres", f"gpu:{spec.gpus_per_node}"))
    for key, value in (
        ("cpus-per-task", str(spec.cpus_per_node) if spec.cpus_per_node else ""),
        ("mem", spec.mem),
        ("time", spec.time),
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
    ):
        if value:
            d.append((key, value))
    if spec.requeue:
        d += [("requeue", ""), ("signal", f"B:TERM@{spec.signal_secs}")]
    if array:
        d.append(("array", f"0-{len(elements) - 1}"))
    lines = ["#!/bin/bash"]
    for key, value in d:
        lines.append(f"#SBATCH --{key}" + (f"={_directive_value(key, value)}" if value else ""))
    for extra in spec.sbatch_args:
        lines.append(f"#SBATCH {_directive_value('sbatch-arg', extra)}")
    return lines


def _trap_lines() -> list[str]:
    """The SIGTERM trap of a requeueable job (``--requeue``)."""
    return [
        "# SIGTERM (sent --signal seconds before the time limit, or on preemption): pass it",
        "# on to training, which saves a checkpoint at a step every rank agrees on and exits",
        "# 75; then requeue: the job comes back with the same id and the same run dir",
        "PREEMPTED=0",
        "on_term() {",
        "  PREEMPTED=1",
        '  echo "[mtl-submit] SIGTERM: asking training to save and stop (run dir ${RUN_DIR})"',
        "  # to the training step's tasks (torchrun passes it to the workers); a SIGTERM to",
        "  # srun itself would make it kill the step after KillWait, before the save is done",
        '  scancel --signal=TERM "${SLURM_JOB_ID}.0" 2>/dev/null || kill -TERM "$TRAIN_PID"',
        "}",
        "trap on_term TERM",
    ]


def _launch_lines(spec: SubmitSpec) -> list[str]:
    """``srun`` one torchrun per node in the background, and wait for it (through a trapped
    signal too)."""
    q = shlex.quote
    srun = ["srun", f"--nodes={spec.nodes}", f"--ntasks={spec.nodes}", "--ntasks-per-node=1"]
    if spec.cpus_per_node:
        srun.append(f"--cpus-per-task={spec.cpus_per_node}")
    srun.append("--kill-on-bad-exit=1")
    torchrun = [
        spec.python, "-m", "torch.distributed.run", f"--nnodes={spec.nodes}",
        f"--nproc_per_node={spec.nproc}", "--rdzv_backend=c10d",
    ]  # fmt: skip
    train = ["-m", "mtl_dist.train"]
    return [
        "# one task per node, each a torchrun over the node's ranks; in the background so the",
        "# SIGTERM trap runs while training does",
        " ".join(q(a) for a in srun + torchrun)
        + ' --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="${SLURM_JOB_ID}" '
        + " ".join(q(a) for a in train)
        + ' "${RUN_ARGS[@]}" --train.output_dir "$RUN_DIR" --train.progress_bar false'
        + "".join(" " + q(a) for a in spec.train_args)
        + " &",
        "TRAIN_PID=$!",
        'wait "$TRAIN_PID" && RC=0 || RC=$?',
        "# a trapped signal ends the wait early: wait on until training has saved and exited",
        'while kill -0 "$TRAIN_PID" 2>/dev/null; do wait "$TRAIN_PID" && RC=0 || RC=$?; done',
        'echo "[mtl-submit] training exited with ${RC}"',
    ]


def render(spec: SubmitSpec, argv: list[str] | None = None) -> str:
    """The sbatch script for ``spec`` (see the module docstring)."""
    q = shlex.quote
    elements = expand_sweep(spec.config, spec.sweep)
    lines = _sbatch_header(spec, elements)
    if argv is not None:
        lines.append("# rendered by: mtl-submit " + " ".join(q(a) for a in argv).replace("\n", " "))
    lines += ["set -euo pipefail", f"cd {q(os.path.abspath(spec.workdir))}"]
    if spec.setup:
        lines += ["# environment set-up (--setup)", *spec.setup]
    lines += [
        "",
        "# this element's run dir and arguments (one element unless a sweep made a job array)",
        'case "${SLURM_ARRAY_TASK_ID:-0}" in',
    ]
    for i, el in enumerate(elements):
        args = " ".join(q(a) for a in ["--config", el.config, *el.overrides])
        lines.append(f"  {i}) RUN_NAME={q(el.name)}; RUN_ARGS=({args}) ;;")
    lines += [
        '  *) echo "no sweep element ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;',
        "esac",
        f"RUN_DIR={q(spec.run_root)}${{RUN_NAME:+/$RUN_NAME}}",
        'mkdir -p "$RUN_DIR"',
        "",
        "# rendezvous on the allocation's first node; the same id on every node",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={spec.port}"
        if spec.port
        else "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f"NPROC={spec.nproc}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / NPROC > 0 "
        "? ${SLURM_CPUS_PER_TASK:-$(nproc)} / NPROC : 1 ))}",
    ]
    if spec.ifname:
        lines.append(
            f"export NCCL_SOCKET_IFNAME={q(spec.ifname)} GLOO_SOCKET_IFNAME={q(spec.ifname)}"
        )
    lines += [
        'echo "[mtl-submit] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on'
        ' ${SLURM_JOB_NODELIST}: run dir ${RUN_DIR}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"',
        "",
    ]
    if spec.requeue:
        lines += _trap_lines()
    lines += _launch_lines(spec)
    if spec.requeue:
        lines += [
            f'if [ "$PREEMPTED" = 1 ] || [ "$RC" = {REQUEUE_EXIT_CODE} ]; then',
            '  echo "[mtl-submit] requeueing job ${SLURM_JOB_ID} (run dir ${RUN_DIR})"',
            '  scontrol requeue "${SLURM_JOB_ID}"',
            "fi",
        ]
    lines += ['exit "$RC"']
    return "\n".join(lines) + "\n"


def submit(script: str, path: str) -> str:
    """Write ``script`` to ``path`` and ``sbatch`` it; returns the job id. The log dir
    (``logs/`` beside it) is made first: Slurm does not create it."""
    os.makedirs(os.path.join(os.path.dirname(path), "logs"), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(script)
    out = subprocess.run(
        ["sbatch", "--parsable", path], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-submit",
        description="Render an sbatch script for mtl_dist.train and submit it (see module doc).",
        epilog="Arguments after -- go to mtl_dist.train (e.g. -- --train.max_steps 100).",
    )
    a = p.add_argument
    a("--config", required=True, help="job TOML, relative to --workdir or absolute")
    a("--job-name", default="mtl", help="Slurm job name; also names the run/sweep dir")
    a("--nodes", type=int, default=1)
    a("--gpus-per-node", type=int, default=0, help="GPUs per node (#SBATCH --gres=gpu:N)")
    a("--nproc-per-node", type=int, default=0, help="ranks per node (default: GPUs, or 2 on CPU)")
    a("--cpus-per-node", type=int, default=0, help="CPUs for the node's task (--cpus-per-task)")
    a("--mem", default="", help="memory per node, e.g. 200G")
    a("--time", default="", help="time limit, e.g. 04:00:00")
    a("--partition", default="")
    a("--account", default="")
    a("--qos", default="")
    a("--output-dir", default="runs/slurm", help="runs go to <output-dir>/<job-name>[/<element>]")
    a("--workdir", default=".", help="directory the job cd's to (the repo checkout)")
    a("--setup", action="append", default=[], help="shell line run before training; repeatable")
    a("--python", default=sys.executable, help="python on the nodes (default: this one)")
    a("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="job-array axis")
    a("--no-requeue", dest="requeue", action="store_false", help="no requeue on SIGTERM")
    a("--signal-secs", type=int, default=120, help="SIGTERM this long before the time limit")
    a("--port", type=int, default=0, help="rendezvous port (default: derived from the job id)")
    a("--ifname", default="", help="NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME on the nodes")
    a("--sbatch-arg", dest="sbatch_args", action="append", default=[], help="extra #SBATCH line")
    a("--dry-run", action="store_true", help="print the script, submit nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = build_parser().parse_args(ours)
    opts = {k: v for k, v in vars(args).items() if k != "dry_run"}
    spec = SubmitSpec(**opts, train_args=train_args)
    try:
        script = render(spec, argv)
    except ValueError as err:
        print(f"mtl-submit: {err}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        print(script, end="")
        return
    path = os.path.join(spec.run_root, f"{safe_name(spec.job_name)}.sbatch")
    try:
        job = submit(script, path)
    except RuntimeError as err:
        print(f"mtl-submit: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"submitted job {job}: script {path}, runs under {spec.run_root}")
    print(job)


if __name__ == "__main__":
    main()
