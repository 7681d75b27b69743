"""Serving latency, measured: ``python -m mtl_dist.tools.bench.serve [--checkpoint DIR]
[--batches 1,64,512]``.

Exports the model (a checkpoint's, or ``--config``'s freshly initialised one: latency does not
depend on the weights) as the two packages ``mtl_dist.serve.export --format pt2`` writes — the
``torch.export`` program, run eagerly, and its AOTInductor compilation — loads each as a client
does (:func:`mtl_dist.serve.program.load_package`) and times one call per batch on the CPU: p50 / p99
latency and rows/s at each batch size, the two packages taking turns, after warm-up. Inputs are
validation rows (``--data``, default the config's ``data.val_path`` when present) or, without
data, random ids in bags of 1–3. Prints the CPU, threads and torch version; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mtl_dist.checkpoint.store import resolve_checkpoint
from mtl_dist.config import JobConfig, load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader
from mtl_dist.data.source import list_parquet_files
from mtl_dist.serve.export import build_unsharded, load_checkpoint_model
from mtl_dist.serve.program import (
    build_served,
    example_inputs,
    export_program,
    inputs_from_batch,
    load_package,
    metadata,
    write_package,
)
from mtl_dist.tools.bench.training import cpu_line

Inputs = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def batches_of(cfg: JobConfig, data: str | None, size: int, count: int) -> tuple[list[Inputs], str]:
    """``count`` input batches of ``size`` rows: from ``data`` when it has them, else random;
    with what they are."""
    if data:
        try:
            files = list_parquet_files(data)
        except FileNotFoundError:
            files = []
        if files:
            conv = ArrowBatchConverter(
                cfg.features.sparse, cfg.features.dense, [], dense_nan=cfg.data.dense_nan,
                hash_seed=cfg.data.hash_seed,
            )  # fmt: skip
            out = []
            for batch in ParquetBatchReader(files, conv, size, drop_last=True):
                out.append(inputs_from_batch(batch))
                if len(out) == count:
                    return out, f"rows of {data}"
    return [example_inputs(cfg, size, seed=i) for i in range(count)], "random ids, bags of 1-3"


def time_calls(model, inputs: list[Inputs], seconds: float, warmup: int = 5) -> list[float]:
    """Seconds per call, over the inputs in turn, for about ``seconds`` (at least 20 calls)."""
    with torch.no_grad():
        for i in range(warmup):
            model(*inputs[i % len(inputs)])
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 20 or time.perf_counter() - start < seconds:
            x = inputs[len(times) % len(inputs)]
            t = time.perf_counter()
            model(*x)
            times.append(time.perf_counter() - t)
    return times


def percentile(times: list[float], q: float) -> float:
    s = sorted(times)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory")
    p.add_argument("--config", default="configs/default.toml", help="without --checkpoint")
    p.add_argument("--data", default=None, help="Parquet rows as inputs (default: data.val_path)")
    p.add_argument("--batches", default="1,64,512")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per batch size and package")
    p.add_argument("--rounds", type=int, default=2, help="turns each package takes per batch size")
    p.add_argument("--wrapper-opt", default="O1", help="AOTInductor wrapper optimisation level")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.checkpoint:
        cfg, model = load_checkpoint_model(resolve_checkpoint(a.checkpoint))
    else:
        cfg = load_config(["--config", a.config])
        model = build_unsharded(cfg).eval()
    served = build_served(cfg, model)
    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model: {cfg.model.head} over {len(cfg.features.sparse)} sparse features, "
        f"{len(cfg.tasks)} tasks" + (f" ({a.checkpoint})" if a.checkpoint else " (initialised)")
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        program = export_program(cfg, served)
        export_s = time.perf_counter() - t
        eager, aoti = Path(tmp) / "eager.pt2", Path(tmp) / "aoti.pt2"
        write_package(eager, program, metadata(cfg, "fp32", "eager"))
        t = time.perf_counter()
        options = {"aot_inductor.compile_wrapper_opt_level": a.wrapper_opt}
        write_package(aoti, program, metadata(cfg, "fp32", "aoti-cpu"), True, options)
        compile_s = time.perf_counter() - t
        sizes = {"eager": eager.stat().st_size, "aoti": aoti.stat().st_size}
        models = {"eager": load_package(eager), "aoti": load_package(aoti)}
    print(
        f"torch.export {export_s:.1f}s, AOTInductor compile {compile_s:.1f}s "
        f"(wrapper {a.wrapper_opt}); packages {sizes['eager'] / 2**20:.1f} MiB eager, "
        f"{sizes['aoti'] / 2**20:.1f} MiB AOTInductor"
    )
    data = a.data if a.data is not None else cfg.data.val_path
    header = f"{'batch':>6}  {'package':<8}{'p50 ms':>9}{'p99 ms':>9}{'rows/s':>12}"
    printed = False
    for size in [int(b) for b in a.batches.split(",")]:
        inputs, what = batches_of(cfg, data, size, 8)
        if not printed:
            print(f"inputs: {what}\n{header}")
            printed = True
        times: dict[str, list[float]] = {"eager": [], "aoti": []}
        for _ in range(a.rounds):  # taking turns
            for name, m in models.items():
                times[name] += time_calls(m, inputs, a.seconds / a.rounds)
        p50 = {}
        for name, ts in times.items():
            p50[name] = percentile(ts, 0.5)
            rate = size * len(ts) / sum(ts)
            print(
                f"{size:>6}  {name:<8}{p50[name] * 1e3:>9.3f}"
                f"{percentile(ts, 0.99) * 1e3:>9.3f}{rate:>12,.0f}"
            )
        print(f"{'':>6}  AOTInductor / eager p50: {p50['eager'] / p50['aoti']:.2f}x faster")


if __name__ == "__main__":
    main()
