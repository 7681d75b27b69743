"""Behaviour sequences priced: quality of mean pooling vs DIN vs multi-head attention on the
``sequences`` workload, their training speed at several ``max_len``, and the reader's rows/s
with the list column against without it.

``python -m mtl_dist.tools.bench.sequences --out runs/bench_sequences`` (defaults: 200k train /
40k validation rows, seeds 0 1 2, max_len 20 50 200, 2 processes):

1. quality: ``configs/sequences.toml`` one epoch under torchrun per pooling and seed; each
   task's validation AUC (mean ± std over seeds) and samples/s;
2. speed: the workload regenerated with histories of up to ``max_len`` items, one epoch per
   pooling (seed 0), samples/s and its ratio to mean pooling at the same ``max_len``;
3. reader: the training files read in-process through :class:`ParquetBatchReader` at batch
   2048, rows/s with and without the sequence column (best of 3);
4. ops (``--ops-only`` alone): each pooling's forward + backward in-process at each
   ``max_len``, best of 7 — the attention's own cost, less exposed to a shared machine's load.

Prints the tables with the CPU model and writes them to ``--out/sequences.md`` and ``.json``.
Speed figures come from this run only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mtl_dist.config import load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader, list_parquet_files
from mtl_dist.data.synth_sequences import generate_sequences
from mtl_dist.tools.bench.training import cpu_line

POOLINGS = ("mean", "din", "mha")
CONFIG = str(Path(__file__).resolve().parents[3] / "configs" / "sequences.toml")
TASKS = ("click", "like")  # configs/sequences.toml's tasks


def job_toml(pooling: str, max_len: int) -> str:
    """``configs/sequences.toml`` with its sequence's ``pooling`` and ``max_len`` replaced;
    ``pooling = "none"``: without its ``[[features.sequence]]`` block (the same model on the same
    rows, no history: the baseline that prices the sequence whole — reader, lookups, pooling)."""
    text = Path(CONFIG).read_text()
    if pooling == "none":
        text, n = re.subn(r"\[\[features\.sequence\]\].*?(?=\[\[tasks\]\])", "", text, flags=re.S)
        if n != 1:
            raise RuntimeError(f"{CONFIG}: expected one [[features.sequence]] block, found {n}")
        return text
    for line in ('pooling = "din"', "max_len = 20"):
        if text.count(line) != 1:
            raise RuntimeError(f"{CONFIG}: expected one '{line}' line to replace")
    return text.replace('pooling = "din"', f'pooling = "{pooling}"').replace(
        "max_len = 20", f"max_len = {max_len}"
    )


def sequence_data(path: Path, train_rows: int, val_rows: int, max_len: int, seed: int = 0) -> Path:
    """The ``sequences`` workload with histories of up to ``max_len`` items under ``path``
    (4 training files, generated once and reused when its ``meta.json`` is there); ``path``."""
    if not (path / "meta.json").exists():
        generate_sequences(path, train_rows, val_rows, files=4, seed=seed, max_hist=max_len)
    return path


def train(data: Path, out: Path, pooling: str, seed: int, max_len: int, nproc: int) -> dict:
    """One epoch of :func:`job_toml` under torchrun; its metrics.json. Raises
    ``RuntimeError`` when the training fails."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.toml").write_text(job_toml(pooling, max_len))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "mtl_dist.train", "--config", str(out / "job.toml"),
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out / "run"), "--train.progress_bar", "false",
        "--train.seed", str(seed), "--train.precision", "fp32", "--monitor.attribution", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{pooling} seed {seed}: training failed\n{proc.stderr[-3000:]}")
    return json.loads((out / "run" / "metrics.json").read_text())


def reader_rows_per_s(data: Path, with_sequence: bool, rounds: int = 3) -> float:
    """Rows/s of one pass over the training files (batch 2048), best of ``rounds``."""
    cfg = load_config(["--config", CONFIG])
    seqs = cfg.features.sequence if with_sequence else []
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks, sequences=seqs)
    best = 0.0
    for _ in range(rounds):
        reader = ParquetBatchReader(list_parquet_files(str(data / "train")), conv, 2048)
        t0, rows = time.perf_counter(), 0
        for batch in reader:
            rows += batch.batch_size
        best = max(best, rows / (time.perf_counter() - t0))
    return best


def op_cost(max_lens: list[int], batch: int = 256, rounds: int = 7) -> dict:
    """Milliseconds of one forward + backward of each pooling over a batch of full histories
    ``[B, L, 16]`` (in-process, one thread, best of ``rounds`` after a warm-up): the attention's
    own cost, less exposed to a shared machine's load than whole training runs."""
    import torch

    from mtl_dist.config import SequenceFeature
    from mtl_dist.models.sequence import build_pooling

    torch.set_num_threads(1)
    out: dict = {}
    for max_len in max_lens:
        out[max_len] = {}
        for p in POOLINGS:
            torch.manual_seed(0)
            pool = build_pooling(SequenceFeature(name="s", pooling=p, din_hidden=[32]), 16)
            q = torch.randn(batch, 16, requires_grad=True)
            keys = torch.randn(batch, max_len, 16, requires_grad=True)
            mask = torch.ones(batch, max_len, dtype=torch.bool)
            best = float("inf")
            for i in range(rounds + 1):
                t0 = time.perf_counter()
                pool(q, keys, mask)[0].sum().backward()
                if i:  # the first is the warm-up
                    best = min(best, time.perf_counter() - t0)
            out[max_len][p] = best * 1e3
        print(f"[ops] max_len {max_len}: {out[max_len]}", flush=True)
    return out


def measure(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    base = sequence_data(out / "data_20", a.train_rows, a.val_rows, 20)
    quality = {}
    for pooling in POOLINGS:
        runs = [train(base, out / f"q_{pooling}_{s}", pooling, s, 20, a.nproc) for s in a.seeds]
        quality[pooling] = {
            "auc": {t: [r["metrics"][t]["auc"] for r in runs] for t in TASKS},
            "oracle_auc": {t: runs[0]["metrics"][t]["oracle_auc"] for t in TASKS},
            "samples_per_s": [r["samples_per_s"] for r in runs],
        }
        print(f"[quality] {pooling}: {quality[pooling]}", flush=True)
    speed = {}
    for max_len in a.max_lens:
        data = sequence_data(out / f"data_{max_len}", a.train_rows, a.val_rows, max_len)
        speed[max_len] = {
            p: train(data, out / f"s_{p}_{max_len}", p, 0, max_len, a.nproc)["samples_per_s"]
            for p in POOLINGS
        }
        print(f"[speed] max_len {max_len}: {speed[max_len]}", flush=True)
    reader = {"without": reader_rows_per_s(base, False), "with": reader_rows_per_s(base, True)}
    return {"cpu": cpu_line(), "nproc": a.nproc, "train_rows": a.train_rows,
            "quality": quality, "speed": speed, "reader_rows_per_s": reader,
            "ops_ms": op_cost(a.max_lens)}  # fmt: skip


def markdown(r: dict) -> str:
    """The three tables of :func:`measure`'s result."""
    ms = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"  # noqa: E731
    q = r["quality"]
    lines = [
        f"CPU: {r['cpu']}; {r['nproc']} processes; {r['train_rows']} training rows, one epoch",
        "",
        "| pooling | click AUC | like AUC | samples/s |",
        "|---|---|---|---|",
        *[
            f"| {p} | {ms(q[p]['auc']['click'])} | {ms(q[p]['auc']['like'])} | "
            f"{statistics.mean(q[p]['samples_per_s']):.0f} |"
            for p in q
        ],
        f"| oracle | {q['mean']['oracle_auc']['click']:.4f} | "
        f"{q['mean']['oracle_auc']['like']:.4f} | |",
        "",
        "| max_len | "
        + " | ".join(f"{p} samples/s" for p in POOLINGS)
        + " | din / mean | mha / mean |",
        "|---|" + "---|" * (len(POOLINGS) + 2),
    ]
    for max_len, s in r["speed"].items():
        lines.append(
            f"| {max_len} | " + " | ".join(f"{s[p]:.0f}" for p in POOLINGS)
            + f" | {s['din'] / s['mean']:.2f} | {s['mha'] / s['mean']:.2f} |"
        )  # fmt: skip
    lines += [
        "",
        "| max_len | "
        + " | ".join(f"{p} fwd+bwd ms (B=256, D=16, 1 thread)" for p in POOLINGS)
        + " |",
        "|---|" + "---|" * len(POOLINGS),
        *[
            f"| {L} | " + " | ".join(f"{ms[p]:.2f}" for p in POOLINGS) + " |"
            for L, ms in r.get("ops_ms", {}).items()
        ],
    ]
    rd = r["reader_rows_per_s"]
    lines += [
        "",
        "| reader (batch 2048, in-process) | rows/s |",
        "|---|---|",
        f"| without the sequence column | {rd['without']:.0f} |",
        f"| with hist_item_ids (<= 20 ids) | {rd['with']:.0f} ({rd['with'] / rd['without']:.2f}x) |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_sequences")
    p.add_argument("--train-rows", type=int, default=200_000)
    p.add_argument("--val-rows", type=int, default=40_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-lens", type=int, nargs="+", default=[20, 50, 200])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ops-only", action="store_true", help="only the in-process attention costs")
    a = p.parse_args(argv)
    if a.ops_only:
        print(json.dumps({"cpu": cpu_line(), "ops_ms": op_cost(a.max_lens)}, indent=1))
        return
    r = measure(a)
    text = markdown(r)
    print(text)
    Path(a.out, "sequences.md").write_text(text + "\n")
    Path(a.out, "sequences.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
