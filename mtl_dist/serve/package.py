"""The ``.pt2`` serving package: its metadata contract (:func:`metadata`: what a client needs to
build the inputs and read the output), writing it (:func:`write_package`, eager or AOTInductor),
verifying and reading it back (:func:`check_package`, :func:`read_metadata`,
:func:`load_package`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mtl_dist.config import JobConfig, SparseFeature, TaskSpec
from mtl_dist.config.sequence import sequence_parts
from mtl_dist.data.ids import RAW_ID_SPACE
from mtl_dist.data.sequence import float_rule
from mtl_dist.files import check_archive
from mtl_dist.serve.lookups import id_rule
from mtl_dist.serve.sequences import served_floats

FORMAT = "mtl-dist-serving/1"
METADATA = "mtl_dist.json"  # stored as extra/mtl_dist.json in the .pt2 archive


def metadata(cfg: JobConfig, embedding_dtype: str, compiled: str) -> dict[str, Any]:
    """What a client needs to build the program's inputs and read its output, as plain JSON.

    ``compiled``: ``eager`` (a ``torch.export`` program) or ``aoti-cpu`` / ``aoti-cuda``.
    """
    names = [f.name for f in cfg.features.sparse] + [
        p.key for q in cfg.features.sequence for p in sequence_parts(q, cfg.features.sparse)
    ]
    names += [key for key, _, _ in served_floats(cfg.features.sequence)]
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "program": compiled,
        "embedding_dtype": embedding_dtype,
        "head": cfg.model.head + (" + esmm" if cfg.model.esmm.enabled else ""),
        "inputs": ["dense", *[f"values/{n}" for n in names], *[f"offsets/{n}" for n in names]],
        "output": "[B, T] float32, one column per task in tasks order",
        "tasks": [
            {
                "name": t.name,
                "kind": t.kind,
                "value": _served_value(t),
            }
            for t in cfg.tasks
        ],
        "dense": {
            "columns": list(cfg.features.dense),
            "dtype": "float32",
            "null": 0.0,
            "nonfinite": cfg.data.dense_nan,  # error: refuse the row; zero: read as 0
        },
        "hashing": {
            "function": "xxh3_64",
            "seed": cfg.data.hash_seed,
            "encoding": "utf-8",
            "applies_to": "string and binary ids (binary: its own bytes)",
            "row": "xxh3_64(bytes, seed) mod the feature's string_id_mod, by the client",
        },
        "sparse": [
            {
                "name": f.name,
                "multi_hot": f.multi_hot,
                "pooling": f.pooling,
                "hash_buckets": f.hash_buckets,
                "vocab_size": f.vocab_size,
                "invalid_ids": f.invalid_ids,
                "client": _client_rule(f),
                "string_id_mod": RAW_ID_SPACE if f.collision == "managed" else f.hash_buckets,
                "program": {
                    "managed": "raw id mod {n}, then the trained managed-collision remapping",
                    "mod": "id mod {n}",
                    "clip": "clamp(id, 0, {n} - 1)",
                    "drop": "ids outside [0, {n}) dropped",
                }[id_rule(f)[0]].format(n=id_rule(f)[1]),
            }  # fmt: skip
            for f in cfg.features.sparse
        ],
        "sequences": sequence_metadata(cfg),
        "sequence_floats": float_metadata(cfg),
    }


def sequence_metadata(cfg: JobConfig) -> list[dict[str, Any]]:
    """Per id list of each ``[[features.sequence]]`` (inputs after the sparse features, a
    sequence's ids then its side columns): its list column, read by the client as a multi-hot
    feature of its table (the keys of a ``sparse`` entry, ``name`` the column), the input it
    feeds (``input``), the column it aligns with (``aligned_with``: as many ids, row by row;
    "" for the ids list) and the ``max_len`` the program keeps of each list (the last ids)."""
    tables = {f.table_name: f for f in cfg.features.sparse}
    out = []
    for q in cfg.features.sequence:
        for p in sequence_parts(q, cfg.features.sparse):
            f = tables[p.table]
            out.append({
                "name": p.column, "input": p.key, "sequence": q.name, "max_len": q.max_len,
                "table": p.table, "aligned_with": "" if p.key == q.name else q.source,
                "multi_hot": True, "hash_buckets": f.hash_buckets, "vocab_size": f.vocab_size,
                "invalid_ids": q.invalid_ids, "on_null": q.on_null,
                "string_id_mod": f.hash_buckets,
                "client": "a list, oldest first; a null list is "
                + ("refused" if q.on_null == "error" else "an empty history")
                + ("; refuse nulls inside lists and ids outside [0, "
                   f"{f.vocab_size})" if q.invalid_ids == "error" and not f.hash_buckets
                   else "; drop nulls inside lists"),
            })  # fmt: skip
    return out


def float_metadata(cfg: JobConfig) -> list[dict[str, Any]]:
    """Per float side column of each ``[[features.sequence]]`` (inputs after every id list, in
    this order): its list column (``name``), the input it feeds (``input``: values float32,
    offsets int64, as an id list's), the ids column it aligns with (``aligned_with``: as many
    values, row by row), the ``max_len`` the program keeps (the last values), the
    ``float_transform`` the program applies, and the reader's value rule: ``min`` (the lowest
    value allowed, None for none) and ``bad`` (what a refused value is: null, not finite in
    float32, or below ``min``)."""
    out = []
    for key, column, q in served_floats(cfg.features.sequence):
        low, bad = float_rule(q)
        out.append({
            "name": column, "input": key, "sequence": q.name, "max_len": q.max_len,
            "aligned_with": q.source, "dtype": "float32", "transform": q.float_transform,
            "min": low, "bad": bad, "on_null": q.on_null,
            "client": "a list, oldest first, as long as its ids' list; a null list only where "
            "the ids' list is null" + (" (an empty history)" if q.on_null == "empty" else "")
            + f"; refuse {bad}",
        })  # fmt: skip
    return out


def _served_value(t: TaskSpec) -> str:
    """What task ``t``'s output column holds."""
    if t.kind == "binary":
        return "probability (true scale)"
    return "value in the label's unit" + (
        " (expm1 of the log1p model)" if t.transform == "log1p" else ""
    )


def _client_rule(f: SparseFeature) -> str:
    """What the client must do with feature ``f``'s ids before the program."""
    nulls = (
        "refuse nulls inside lists and empty strings"
        if f.invalid_ids == "error"
        else "drop nulls inside lists and empty strings"
    )
    rule = f"a null row is an empty bag; {nulls}"
    if f.collision == "managed":
        rule += f"; strings: xxh3_64 mod {RAW_ID_SPACE} (the program maps it to a row)"
    elif f.hash_buckets:
        rule += f"; strings: xxh3_64 mod {f.hash_buckets}"
    elif f.invalid_ids == "error":
        rule += f"; refuse integer ids outside [0, {f.vocab_size})"
    return rule


def write_package(
    out: Path | BinaryIO,
    program: torch.export.ExportedProgram,
    meta: dict[str, Any],
    aoti: bool = False,
    inductor_configs: dict[str, Any] | None = None,
) -> None:
    """Write ``program`` (or, with ``aoti``, its AOTInductor compilation for the program's
    device, with ``inductor_configs``) and ``meta`` (as ``extra/mtl_dist.json``) into the
    ``.pt2`` archive ``out`` (a path ending in .pt2, or a binary file open for writing).

    The eager package loads with ``torch.export.load(out).module()``, the compiled one with
    ``torch._inductor.aoti_load_package(out)``; both take ``(dense, values, offsets)``.
    """
    from torch.export.pt2_archive._package import package_pt2  # what torch.export.save calls

    extra = {METADATA: json.dumps(meta, indent=1)}
    if not aoti:
        package_pt2(out, exported_programs={"model": program}, extra_files=extra)
        return
    files = torch._inductor.aot_compile(
        program.module(),
        *program.example_inputs,
        options={**(inductor_configs or {}), "aot_inductor.package": True},
    )
    package_pt2(out, aoti_files={"model": files}, extra_files=extra)


def check_package(path: Path) -> None:
    """Verify a ``.pt2`` package before use: every member against its zip CRC-32
    (:func:`mtl_dist.files.check_archive`, whose errors it raises)."""
    check_archive(path, "mtl-dist serving package",
                  "python -m mtl_dist.serve.export CHECKPOINT model.pt2 --format pt2")  # fmt: skip


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a package from :func:`write_package` (``ValueError`` naming the file
    when it has none)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    check_package(path)
    with PT2ArchiveReader(str(path)) as archive:
        names = archive.get_file_names()
        name = next((n for n in names if n.endswith(f"extra/{METADATA}")), None)
        if name is None:
            raise ValueError(f"{path}: not an mtl-dist serving package (no extra/{METADATA})")
        return json.loads(archive.read_string(name))


def load_package(path: Path) -> Any:
    """The runnable program of a package: the AOTInductor model when it has one, else the
    exported program's module. Called as ``model(dense, values, offsets)`` → ``[B, T]``.

    Raises ``ValueError`` naming the file (and member) when it does not verify
    (:func:`check_package`)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    check_package(path)
    with PT2ArchiveReader(str(path)) as archive:
        compiled = any("aotinductor/" in n for n in archive.get_file_names())
    if compiled:
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(str(path)).module()
