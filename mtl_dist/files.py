"""Files written whole or not at all: a reader never finds half of one.

Every artifact the toolkit writes (metrics.json, profiles, attribution.csv, exported models,
scores) goes through :func:`written_whole`: the content is written to ``<name>.partial`` beside
the target, flushed to disk, then renamed over it (``os.replace``: atomic on POSIX); on an error
the partial file is removed and the previous version, if any, stays. Checkpoints have their own
protocol (:mod:`mtl_dist.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; it becomes ``path`` when the
    block ends without an error (and leaves ``path`` as it was when nothing was written).

    Example::

        with written_whole("runs/x/metrics.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        if tmp.exists():  # (nothing written: nothing replaced)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
