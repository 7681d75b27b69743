"""``python examples/serve.py model.pt2 DATA_FILE_OR_DIR preds.parquet [KEEP_COLUMN ...]``: an
mtl-dist package's predictions, its inputs built from its metadata with torch, pyarrow, xxhash."""

import json
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import xxhash

T = torch.from_dlpack  # an Arrow array without nulls → a tensor, no copy
INT64_MAX = 2**63 - 1
MADE_BY = "python -m mtl_dist.serve.export CHECKPOINT model.pt2 --format pt2 writes one"


def verified(path: str) -> list[str]:
    """The package's member names, after every member's bytes matched their zip CRC-32."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise ValueError(f"{path}: {'empty (0 bytes)' if p.is_file() else 'no such file'}; "
                         f"not an mtl-dist serving package: {MADE_BY}")  # fmt: skip
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{path}: truncated or not a zip archive ({p.stat().st_size} bytes); "
                         f"not an mtl-dist serving package: {MADE_BY}")  # fmt: skip
    try:
        with zipfile.ZipFile(p) as z:
            bad, names = z.testzip(), z.namelist()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path}: damaged archive ({e}): {MADE_BY}") from None
    if bad is not None:
        raise ValueError(f"{path}: member {bad} does not match its CRC-32 (damaged after it "
                         f"was written): {MADE_BY}")  # fmt: skip
    if not any(n.endswith("/mtl_dist.json") for n in names):
        raise ValueError(f"{path}: no extra/mtl_dist.json; not an mtl-dist serving package")
    return names


def load(path: str):  # the metadata, and the program: AOTInductor's when compiled
    names = verified(path)
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read(next(n for n in names if n.endswith("/mtl_dist.json"))))
    if any("/aotinductor/" in n for n in names):
        return meta, torch._inductor.aoti_load_package(path)
    return meta, torch.export.load(path).module()


def sparse(f: dict, t: pa.RecordBatch, seed: int):
    """Feature f's column → (ids [N] int64, offsets [B + 1] int64) by the feature's rules."""
    col = t[f["name"]]
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        flat, rows = col.flatten(), pc.list_parent_indices(col)
    else:  # a null single-hot id is an empty bag
        flat, rows = col.drop_null(), pc.indices_nonzero(col.is_valid())
    strings, bad = not pa.types.is_integer(flat.type), flat.is_null()
    if strings:
        bad = pc.or_kleene(bad, pc.equal(pc.binary_length(flat), 0))
    elif not f["hash_buckets"] and f["invalid_ids"] == "error":  # the program would drop them
        out = pc.or_kleene(pc.less(flat, 0), pc.greater_equal(flat, f["vocab_size"]))
        bad = pc.or_kleene(bad, out)
    if strings and not f["hash_buckets"] or f["invalid_ids"] == "error" and pc.any(bad).as_py():
        raise ValueError(f"column '{f['name']}' ({flat.type}) breaks its rule: {f['client']}")
    flat, rows = flat.filter(pc.invert(bad)), rows.filter(pc.invert(bad))
    if strings:  # row = xxh3_64(UTF-8 bytes, seed) mod hash_buckets, once per distinct value
        d, n_rows = pc.dictionary_encode(flat.cast(pa.large_binary())), f["string_id_mod"]
        hashed = [xxhash.xxh3_64_intdigest(v, seed) % n_rows for v in d.dictionary.to_pylist()]
        ids = torch.tensor(hashed, dtype=torch.int64)[T(d.indices.cast(pa.int64()))]
    elif pa.types.is_uint64(flat.type):
        ids = unsigned(f, flat)
    else:
        ids = T(flat.cast(pa.int64()))
    lengths = torch.bincount(T(rows.cast(pa.int64())), minlength=t.num_rows)
    return ids, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def unsigned(f: dict, flat: pa.Array) -> torch.Tensor:
    """uint64 ids (they may exceed int64) → int64 ids [N], as training reduces them in unsigned
    arithmetic: an id past int64 is taken mod the feature's bound where the program takes ids
    mod it, else it becomes INT64_MAX, which the program's clip / drop treats as too large."""
    over = pc.greater(flat, pa.scalar(INT64_MAX, pa.uint64()))
    ids = T(pc.if_else(over, pa.scalar(0, pa.uint64()), flat).cast(pa.int64())).clone()
    if pc.any(over).as_py():
        mod = f["string_id_mod"] or (f["vocab_size"] if f["invalid_ids"] == "hash" else 0)
        big = [v % mod if mod else INT64_MAX for v in flat.filter(over).to_pylist()]
        ids[T(pc.indices_nonzero(over).cast(pa.int64()))] = torch.tensor(big, dtype=torch.int64)
    return ids


def floats(f: dict, t: pa.RecordBatch):
    """Float side column f → (values [N] float32, offsets [B + 1] int64), whole lists; a null
    value, one not finite in float32 or one below f["min"] refused (f["bad"]), as training's
    reader refuses them."""
    col, values = t[f["name"]], t[f["name"]].flatten()
    if pc.any(pc.and_(col.is_null(), t[f["aligned_with"]].is_valid())).as_py():
        raise ValueError(f"column '{f['name']}': a null list where '{f['aligned_with']}' has one")
    x = values.cast(pa.float32(), safe=False)
    bad = pc.invert(pc.fill_null(pc.is_finite(x), False))
    if f["min"] is not None:
        bad = pc.or_(bad, pc.fill_null(pc.less(x, f["min"]), False))
    if pc.any(bad).as_py():
        at = pc.indices_nonzero(bad)[0].as_py()
        row = pc.list_parent_indices(col)[at].as_py()
        raise ValueError(f"column '{f['name']}', row {row}: {f['bad']}: {values[at].as_py()!r}")
    lengths = T(pc.fill_null(pc.list_value_length(col), 0).cast(pa.int64()))
    return T(x), torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def inputs(meta: dict, t: pa.RecordBatch):
    """The program's inputs: dense [B, Dd], then ids and offsets per feature (the sparse
    features, then each sequence's list column, whole: the program keeps its last max_len),
    then values and offsets per sequence float side column (whole lists too)."""
    dense = [torch.zeros(t.num_rows, 0)]
    for c in meta["dense"]["columns"]:
        x = pc.fill_null(t[c], 0).cast(pa.float32(), safe=False)
        if meta["dense"]["nonfinite"] == "error" and not pc.all(pc.is_finite(x)).as_py():
            raise ValueError(f"column '{c}': dense values not finite (dense_nan = error)")
        dense.append(T(x)[:, None])
    for q in meta.get("sequences", []) + meta.get("sequence_floats", []):  # side lists aligned
        if q["on_null"] == "error" and t[q["name"]].null_count:
            raise ValueError(f"column '{q['name']}': a null list (on_null = error)")
        n = pc.fill_null(pc.list_value_length(t[q["name"]]), 0)
        if q["aligned_with"] and not pc.all(pc.equal(n, pc.fill_null(
                pc.list_value_length(t[q["aligned_with"]]), 0))).as_py():  # fmt: skip
            raise ValueError(f"column '{q['name']}': lists not as long as '{q['aligned_with']}'")
    features = meta["sparse"] + meta.get("sequences", [])
    ids = [sparse(f, t, meta["hashing"]["seed"]) for f in features]
    values, offsets = zip(*ids, *[floats(f, t) for f in meta.get("sequence_floats", [])])
    return torch.cat(dense, 1), list(values), list(offsets)


def main(package: str, data: str, out: str, *keep: str) -> None:
    meta, model = load(package)
    features = meta["sparse"] + meta.get("sequences", []) + meta.get("sequence_floats", [])
    columns = sorted({*meta["dense"]["columns"], *(f["name"] for f in features), *keep})
    files = sorted(Path(data).glob("**/*.parquet")) if Path(data).is_dir() else [Path(data)]
    if not files:
        raise ValueError(f"{data}: no Parquet file")
    fields = [
        pq.read_schema(files[0]).field(c) for c in keep if c in pq.read_schema(files[0]).names
    ]
    schema = pa.schema(fields + [(f"pred_{t['name']}", pa.float32()) for t in meta["tasks"]])
    with pq.ParquetWriter(out, schema, write_page_checksum=True) as writer:
        for p in files:
            pf = pq.ParquetFile(p, page_checksum_verification=True)
            absent = [c for c in columns if c not in pf.schema_arrow.names]
            if absent:
                raise ValueError(f"{p}: missing column(s) {', '.join(absent)} (the package "
                                 f"reads {', '.join(columns)})")  # fmt: skip
            for t in pf.iter_batches(4096, columns=columns):
                try:
                    preds = model(*inputs(meta, t)).T.tolist()  # [T][B]
                except ValueError as e:
                    raise ValueError(f"{p}: {e}") from None
                cols = [t[c] for c in keep] + [pa.array(y, pa.float32()) for y in preds]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema))


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except ValueError as e:  # a bad package or input: the file, column or member named
        sys.exit(f"serve.py: error: {e}")
