"""What verifying a checkpoint costs: ``python -m mtl_dist.tools.bench.checkpoint [--gib 1] [--dir D]``.

Writes a file of ``--gib`` GiB of random bytes (a checkpoint shard stand-in) and times, taking
turns, a plain read of it and :func:`mtl_dist.checkpoint.store.digest_file` (a read plus xxh3-128) —
once from the page cache and once after dropping the file from it (``posix_fadvise``), so the
table shows the cost per GiB of verification beside the cost of just reading the bytes, which
loading the checkpoint pays anyway. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from mtl_dist.checkpoint.store import _CHUNK, digest_file
from mtl_dist.tools.bench.training import cpu_line


def read_all(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(_CHUNK):
            pass


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache (after a sync), so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="size of the test file, GiB")
    p.add_argument("--dir", default="", help="where to write it (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir or None) as tmp:
        path = Path(tmp) / "shard.bin"
        size = int(a.gib * 2**30)
        with open(path, "wb") as fh:
            for _ in range(0, size, 64 << 20):
                fh.write(os.urandom(64 << 20))
        size = path.stat().st_size / 2**30
        times: dict[str, list[float]] = {}
        for _ in range(a.repeats):
            for cold in (False, True):
                for name, fn in (("read", read_all), ("verify (read + xxh3-128)", digest_file)):
                    if cold:
                        evict(path)
                    t = time.perf_counter()
                    fn(path)
                    key = f"{name}, {'from disk' if cold else 'page cache'}"
                    times.setdefault(key, []).append((time.perf_counter() - t) / size)
    print(f"{cpu_line()}; file {size:.2f} GiB in {a.dir or tempfile.gettempdir()}")
    print(f"{'':<42}{'s per GiB (median)':>20}{'GiB/s':>8}")
    for key, ts in times.items():
        m = statistics.median(ts)
        print(f"{key:<42}{m:>20.3f}{1 / m:>8.2f}")


if __name__ == "__main__":
    main()
