"""Files written whole or not at all: a reader never finds half of one.

Every artifact the toolkit writes (metrics.json, profiles, attribution.csv, exported models,
scores) goes through :func:`written_whole`: the content is written to ``<name>.partial`` beside
the target, flushed to disk, then renamed over it (``os.replace``: atomic on POSIX); on an error
the partial file is removed and the previous version, if any, stays. Checkpoints have their own
protocol (:mod:`mtl_dist.checkpoint.store`).

Every such file is verifiable by its reader. Exported models (``.pt``) and serving packages
(``.pt2``) are zip archives whose members each carry a CRC-32 (written by torch's archive
writer); ``torch.load`` and ``torch.export.load`` never check it, so every reader of ours calls
:func:`check_archive` first. Parquet outputs are written with page checksums
(:data:`PARQUET_CHECKSUMS`), which pyarrow verifies on read with ``page_checksum_verification``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
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


PARQUET_CHECKSUMS = {"write_page_checksum": True}  # ParquetWriter options of every output


def check_archive(path: str | Path, what: str, producer: str) -> None:
    """Verify a zip archive we wrote (an exported model, a serving package) before it is read.

    ``what`` names the artifact ("mtl-dist model file"), ``producer`` the command that writes
    it; both go into the error. Every member's bytes are read and checked against the CRC-32
    its zip entry records (:meth:`zipfile.ZipFile.testzip`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path`` when it is empty, truncated or not an archive at all, or
            naming the member whose bytes do not match their CRC-32 (the file was damaged
            after it was written).
    """
    path = Path(path)
    hint = f"not a complete {what}; {producer} writes one"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file ({producer} writes a {what})")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes): {hint}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: truncated or not a zip archive ({size} bytes, no zip directory at its end): "
            f"{hint}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ValueError(f"{path}: damaged archive ({e}): {hint}") from None
    if bad is not None:
        raise ValueError(
            f"{path}: member {bad} does not match its CRC-32 (the file was damaged after it was "
            f"written): {hint}"
        )


def read_json(path: str | Path, what: str, producer: str) -> dict:
    """The JSON object another process of ours wrote (``metrics.json``, a dataset's
    ``meta.json``, a benchmark's record), read and checked before use.

    ``what`` names the record ("run metrics"), ``producer`` the command that writes it; both go
    into the error. Written whole (:func:`written_whole`), such a file is complete or absent,
    so a file that does not parse was damaged or truncated after it was written, or was never
    ours.

    Raises:
        FileNotFoundError: ``path`` does not exist (naming ``producer``).
        ValueError: naming ``path`` when it is empty, not valid JSON (with the line and column)
            or not a JSON object.
    """
    import json

    path = Path(path)
    hint = f"not a complete {what}; {producer} writes one"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file ({producer} writes the {what})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text ({e.reason} at byte {e.start}): {hint}") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty: {hint}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {hint}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not an object: {hint}")
    return data
