"""Quality once every system has converged: ours and the peers each trained to their best by
one rule, on a validation split that is not the test split (issue 30).

``python -m mtl_dist.tools.bench.converged`` (defaults: the peers' workload (``--workload
interactions``: pairwise feature products in the logits), 1M train rows,
100k validation + 100k test rows, 3 seeds, up to 8 epochs, patience 2):

* the workload is generated once (``mtl-datagen --workload peers``, seed 0); its validation
  split's two files are split in two: the first is the **validation** file every system stops
  on, the second the **test** file no system sees before its best epoch is chosen;
* every system trains up to ``--max-epochs`` epochs and stops once the first task's (click's)
  validation AUC has not improved for ``--patience`` epochs (ours: ``train.best_metric =
  click/auc``, ``train.early_stop_patience``, a checkpoint at each new best; the peers: the same
  rule in :func:`mtl_dist.tools.bench.peers.train_to_best`, one epoch per call of their own
  trainers); the **best epoch's test AUC** is reported, with the **first epoch's** beside it;
* ours: each ``--ours NAME=FLAGS`` option (default: the defaults; e.g. ``meda=--train.multi_epoch
  meda``), its best and first checkpoints exported and scored on the test file
  (:mod:`mtl_dist.serve.score`); the peers: torch-rechub's and DeepCTR-Torch's MMoE at the same
  size (:mod:`mtl_dist.tools.bench.peer_models`);
* ``--seeds`` training seeds (the data stay fixed): AUC mean ± std per task over seeds; ours
  leads a peer on a task only when the difference exceeds both stds.

A system *converged* when early stopping ended it (``--patience`` epochs after its best); one
that ran out of ``--max-epochs`` first is marked "still improving". Writes ``converged.md`` and
``converged.json`` under ``--out``, rewritten after every run (an interrupted benchmark keeps
what it finished; ``--resume`` skips the runs ``converged.json`` already holds). Nothing here
asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtl_dist.checkpoint.manifest import resolve_checkpoint
from mtl_dist.files import read_json
from mtl_dist.serve.export import export_checkpoint
from mtl_dist.serve.score import score
from mtl_dist.tools.bench.e2e_runs import CONFIG, TASKS, dataset
from mtl_dist.tools.bench.peer_models import PEERS
from mtl_dist.tools.bench.peers import finite_auc, peers_installed, run_peer
from mtl_dist.tools.bench.training import cpu_line, run_training


def split_files(meta: dict) -> tuple[str, str]:
    """The validation split's files as (validation file, test file), relative to the data.

    Raises:
        ValueError: the workload's validation split has fewer than two files."""
    files = meta["splits"]["val"]["files"]
    if len(files) < 2:
        raise ValueError(f"the validation split has {len(files)} file(s); 2 are needed (val, test)")
    return files[0], files[-1]


def test_aucs(model_file: Path, test_file: str, batch: int) -> dict[str, float]:
    """Test AUC per task of an exported model on ``test_file`` (labels kept beside the scores)."""
    with tempfile.TemporaryDirectory() as tmp:
        preds = Path(tmp, "preds.parquet")
        score(model_file, test_file, preds, list(TASKS), batch)
        t = pq.read_table(preds)
        return {
            task: finite_auc(t[task].to_numpy(), t[f"pred_{task}"].to_numpy()) for task in TASKS
        }


def oracle_aucs(test_file: str) -> dict[str, float]:
    """AUC of the true probabilities (``p_<task>``) on the test file: the ceiling."""
    t = pq.read_table(test_file, columns=[*TASKS, *(f"p_{task}" for task in TASKS)])
    return {task: finite_auc(t[task].to_numpy(), t[f"p_{task}"].to_numpy()) for task in TASKS}


def ours_to_best(data: str, files: tuple[str, str], flags: list[str], seed: int,
                 a: argparse.Namespace) -> dict:  # fmt: skip
    """One training of ours under the early-stopping rule; the best and the first epoch's
    checkpoints scored on the test file."""
    val, test = (os.path.join(data, f) for f in files)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            "--data.train_path", f"{data}/train", "--data.val_path", val,
            "--train.batch_size", str(a.batch), "--train.seed", str(seed),
            "--train.precision", "fp32", "--train.epochs", str(a.max_epochs),
            "--train.val_every", "0", "--train.best_metric", f"{TASKS[0]}/auc",
            "--train.early_stop_patience", str(a.patience), "--checkpoint.keep", "1000",
            "--checkpoint.at_end", "false", "--monitor.attribution", "false", *flags,
        ]  # fmt: skip
        m = run_training(CONFIG, overrides, a.procs, a.threads, a.timeout, output_dir=out)
        ckpts = Path(out, "checkpoints")
        history = [h["metrics"][TASKS[0]]["auc"] for h in m["history"]]
        best = resolve_checkpoint(ckpts / "best")
        first = min(ckpts.glob("step_*"))  # the first validation is always a new best
        auc = {}
        for name, ckpt in (("best", best), ("first", first)):
            model_file = Path(out, f"{name}.pt")
            export_checkpoint(ckpt, model_file)
            auc[name] = test_aucs(model_file, test, a.batch * 4)
    best_epoch = 1 + int(np.nanargmax(history)) if history else 0
    return {"epochs": len(history), "best_epoch": best_epoch, "val_auc_history": history,
            "auc": auc["best"], "first_epoch_auc": auc["first"],
            "samples_per_s": m["samples_per_s"]}  # fmt: skip


def peer_to_best(system: str, data: str, files: tuple[str, str], seed: int,
                 a: argparse.Namespace) -> dict:  # fmt: skip
    r = run_peer(system, data, a.batch, a.max_epochs, a.procs * a.threads, seed,
                 timeout=a.timeout, early_stop=(a.patience, [files[0]], [files[1]]))  # fmt: skip
    history = [h["val_auc"][TASKS[0]] for h in r["history"]]
    return {"epochs": r["epochs"], "best_epoch": r["best_epoch"], "val_auc_history": history,
            "test_auc_history": [h["test_auc"] for h in r["history"]],
            "version": r["version"],
            "auc": r["auc"], "first_epoch_auc": r["first_epoch_auc"],
            "samples_per_s": r["samples_per_s"]}  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); NaN when any run's value is not finite."""
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], patience: int) -> dict:
    """One system's runs (one per seed) → AUC mean ± std per task (best and first epoch),
    epochs, whether every run converged (the patience rule ended it: ``patience`` epochs after
    its best, not ``--max-epochs``), mean samples/s."""
    out = {"seeds": len(runs), "epochs": [r["epochs"] for r in runs],
           "best_epoch": [r["best_epoch"] for r in runs],
           "converged": all(r["epochs"] - r["best_epoch"] >= patience for r in runs),
           "samples_per_s": statistics.fmean(r["samples_per_s"] for r in runs)}  # fmt: skip
    for key in ("auc", "first_epoch_auc"):
        out[key] = {t: mean_std([r[key][t] for r in runs]) for t in TASKS}
    return out


def leads(ours: dict, peer: dict, seeds: int) -> dict[str, str]:
    """Per task: ``lead`` / ``behind`` when the difference of means exceeds both stds, else
    ``tie``; ``undefined`` when a mean is not finite, ``one seed`` when there is no std."""
    verdict = {}
    for t in TASKS:
        (m1, s1), (m2, s2) = ours["auc"][t], peer["auc"][t]
        if seeds < 2:
            verdict[t] = "one seed: no verdict"
        elif not (math.isfinite(m1) and math.isfinite(m2)):
            verdict[t] = "undefined"
        elif abs(m1 - m2) > max(s1, s2):
            verdict[t] = "lead" if m1 > m2 else "behind"
        else:
            verdict[t] = "tie"
    return verdict


def _fmt(ms: tuple[float, float]) -> str:
    return "undefined" if not math.isfinite(ms[0]) else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def markdown(result: dict) -> str:
    """The table: per system, the best epoch's test AUC and the first epoch's, per task."""
    head = [f"{t} AUC (best epoch)" for t in TASKS] + [f"{t} AUC (epoch 1)" for t in TASKS]
    lines = [
        f"{result['cpu']}; {result['workload']} workload, {result['train_rows']:,} train rows, "
        f"validation {result['files'][0]}, test {result['files'][1]}; up to {result['max_epochs']} epochs, "
        f"patience {result['patience']}, {result['seeds']} seeds; oracle test AUC "
        + ", ".join(f"{t} {v:.4f}" for t, v in result["oracle_auc"].items()),
        "",
        "| system | epochs (best) | converged | " + " | ".join(head) + " | samples/s |",
        "|---" * (len(head) + 4) + "|",
    ]
    for name, s in result["systems"].items():
        epochs = ", ".join(f"{e} ({b})" for e, b in zip(s["epochs"], s["best_epoch"]))
        cells = [_fmt(s["auc"][t]) for t in TASKS] + [_fmt(s["first_epoch_auc"][t]) for t in TASKS]
        conv = "yes" if s["converged"] else "still improving"
        lines.append(f"| {name} | {epochs} | {conv} | " + " | ".join(cells)
                     + f" | {s['samples_per_s']:,.0f} |")  # fmt: skip
    for name, verdicts in result.get("leads", {}).items():
        lines.append(f"\n{name}: " + ", ".join(f"{t} {v}" for t, v in verdicts.items()))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtl_dist.tools.bench.converged",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--workload", choices=("peers", "interactions"), default="peers",
                   help="mtl-datagen --workload (both have the peers' columns)")  # fmt: skip
    p.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    p.add_argument("--test-rows", type=int, default=200_000, help="validation + test rows")
    p.add_argument("--data-root", default="data/bench")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--procs", type=int, default=1, help="our processes (peers: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads per process (peers: all)")
    p.add_argument("--ours", action="append", default=[],
                   help="NAME=FLAGS, an option of ours (repeatable; default 'mtl-dist=')")  # fmt: skip
    p.add_argument("--peers", default="auto", help="auto | none | a comma-separated list")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--out", default="bench_out/converged")
    p.add_argument("--resume", action="store_true", help="keep the runs converged.json holds")
    a = p.parse_args(argv)
    if a.patience < 1 or a.max_epochs < 1 or a.seeds < 1:
        p.error("--patience, --max-epochs and --seeds must be >= 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    data, meta = dataset(a.data_root, a.rows, a.test_rows, 0, a.workload)
    files = split_files(meta)
    installed = peers_installed()
    peers = [p for p in (PEERS if a.peers == "auto" else a.peers.split(",")) if p and p != "none"]
    peers = [p for p in peers if installed.get(p) or a.peers != "auto"]
    options = dict(o.split("=", 1) for o in (a.ours or ["mtl-dist="]))
    saved = Path(a.out, "converged.json")
    runs: dict[str, list[dict]] = (
        read_json(saved, "benchmark record", "bench.converged")["runs"] if a.resume else {}
    )
    os.makedirs(a.out, exist_ok=True)
    result: dict = {}
    for seed in range(a.seeds):  # systems take turns within a seed: a noisy neighbour hits all
        for name in [*options, *peers]:
            if len(runs.get(name, [])) > seed:
                continue  # --resume: already measured
            if name in options:
                run = ours_to_best(data, files, options[name].split(), seed, a)
            else:
                run = peer_to_best(name, data, files, seed, a)
            runs.setdefault(name, []).append(run)
            result = report(a, files, data, runs, options, peers)
    return result or report(a, files, data, runs, options, peers)


def report(a: argparse.Namespace, files: tuple[str, str], data: str, runs: dict[str, list[dict]],
           options: dict[str, str], peers: list[str]) -> dict:  # fmt: skip
    """The result of the runs so far, written as ``converged.json`` / ``converged.md``."""
    systems = {name: summarize(rs, a.patience) for name, rs in runs.items()}
    result = {"cpu": cpu_line(), "workload": a.workload, "train_rows": a.rows, "files": files,
              "max_epochs": a.max_epochs,
              "patience": a.patience, "seeds": a.seeds,
              "oracle_auc": oracle_aucs(os.path.join(data, files[1])),
              "systems": systems, "runs": runs}  # fmt: skip
    done = [p for p in peers if p in systems]
    for name in (n for n in options if n in systems and done):
        best_peer = {t: max(systems[p]["auc"][t] for p in done) for t in TASKS}
        seeds = min(systems[n]["seeds"] for n in [name, *done])
        result.setdefault("leads", {})[f"{name} vs the best peer"] = leads(
            systems[name], {"auc": best_peer}, seeds
        )
    table = markdown(result)
    Path(a.out, "converged.md").write_text(table)
    Path(a.out, "converged.json").write_text(json.dumps(result, indent=2))
    print(table, flush=True)
    return result


if __name__ == "__main__":
    main()
