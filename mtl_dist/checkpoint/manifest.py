"""A checkpoint directory's files: the manifest and the digests it holds, verifying a checkpoint
against it, listing the checkpoints under a root, the ``latest`` / ``best`` pointers and pruning.

What is in a checkpoint and how a save and a load go: :mod:`mtl_dist.checkpoint.store`. Nothing
here is a collective: every function reads or writes files on the process that calls it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import xxhash

from mtl_dist.config import JobConfig

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mtl-dist-checkpoint/1"
_CHUNK = 8 << 20  # bytes read at a time while digesting


def digest_file(path: Path) -> str:
    """xxh3-128 of a file's bytes (xxHash, a non-cryptographic checksum: ~12 GB/s in memory
    here, so verifying costs about what reading the file costs)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and digest."""
    return {"size": path.stat().st_size, "xxh3_128": digest_file(path)}


def verify_checkpoint(path: Path) -> str:
    """'' when ``path`` is a complete checkpoint whose every file matches its manifest (size,
    then digest), else what is wrong — the file named."""
    if not path.is_dir():
        return "not a directory"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (unfinished, or written before checkpoints were verified)"
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    files = manifest.get("files", {})
    if "extra.pt" not in files or ".metadata" not in files:
        return f"{MANIFEST} lists no extra.pt / .metadata"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} when written"
        if digest_file(f) != want["xxh3_128"]:
            return f"{name} does not match its digest (the file changed after it was written)"
    return ""


def write_manifest(path: Path, **fields: Any) -> None:
    """Write checkpoint ``path``'s manifest (this format, then ``fields``), synced to disk."""
    _write_synced(path / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, **fields}, indent=1))


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest (``{}`` when absent or unreadable)."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories under ``root``, ``latest``'s target first, then
    by step, newest first (``*.partial`` and ``previous-*`` left out; none is verified here)."""
    found = [
        p for p in root.glob("step_*")
        if p.is_dir() and not p.name.endswith(".partial") and p.name[5:].isdigit()
    ]  # fmt: skip
    found.sort(key=lambda p: int(p.name[5:]), reverse=True)
    target = latest_target(root)
    return sorted(found, key=lambda p: p.name != target)  # stable: latest's first


def latest_target(root: Path, pointer: str = "latest") -> str:
    """The name ``latest`` (or another pointer: ``best``) points at ('' when absent or empty)."""
    try:
        return (root / pointer).read_text().strip()
    except OSError:
        return ""


def point(root: Path, name: str, pointer: str) -> None:
    """Make ``root/pointer`` (``latest``, ``best``) name checkpoint ``name``, atomically."""
    tmp = root / f"{pointer}.tmp"
    _write_synced(tmp, name)
    os.replace(tmp, root / pointer)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the one a ``latest`` / ``best`` pointer file names."""
    if path.is_file() and path.name in ("latest", "best"):
        return path.parent / path.read_text().strip()
    return path


def checkpoint_dir(cfg: JobConfig) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.train.output_dir, "checkpoints"))


def prune(root: Path, run_id: str, keep: int) -> list[str]:
    """Delete this run's checkpoints beyond the newest ``keep`` (by step); never another run's
    (another run id), nor the target of ``latest`` or ``best``. Returns the names deleted."""
    kept = {latest_target(root), latest_target(root, "best")}
    mine = [p for p in list_checkpoints(root) if read_manifest(p).get("run_id") == run_id]
    mine.sort(key=lambda p: int(p.name[5:]), reverse=True)
    gone = [p.name for p in mine[keep:] if p.name not in kept]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
