"""Serve what you train, checked by a client that has no mtl-dist.

Tiny runs of every head — MMoE, PLE, STEM and MMoE + ESMM on a CTCVR
label, clicks downsampled — over a hashed integer id, a hashed string key, multi-hot lists (one sharing a table,
one dropping out-of-range ids, one clipping them) and a ``log1p`` regression task are exported
as ``.pt2`` packages (the MMoE one compiled with AOTInductor too) and scored by
``examples/serve.py`` in a fresh virtual environment that holds torch, pyarrow and xxhash only:
its predictions equal ``mtl_dist.serve.score``'s, and so do a behaviour sequence's with a float
side column (eager and AOTInductor). Row-wise int8 and fp16 tables keep the AUC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, build_serve_aoti

CONFIG = """
[data]
train_path = "{data}/train"
val_path = "{data}/val"
hash_seed = 7
[model]
head = "mmoe"
experts = {{num = 2, hidden = [16]}}
tower = {{hidden = [8]}}
ple = {{levels = 2, shared_experts = 1, task_experts = 1}}
stem = {{dim = 4, features = ["user_id", "item_key", "hist_category_ids"]}}
[train]
batch_size = 256
max_steps = 6
progress_bar = false
threads = 1
[monitor]
attribution = false
gate_every = 0
heatmap_every = 0
[features]
dense = ["dense_0", "dense_1", "dense_2", "dense_3"]
[[features.sparse]]
name = "user_id"
hash_buckets = 1000
embedding_dim = 8
[[features.sparse]]
name = "item_key"          # "i<item_id>": hashed with xxh3_64
hash_buckets = 2048
embedding_dim = 8
[[features.sparse]]
name = "user_key"          # "u<user_id>": its full xxh3_64 through managed collision
hash_buckets = 256
collision = "managed"
eviction_interval = 2
embedding_dim = 8
[[features.sparse]]
name = "category_id"
vocab_size = 1000
embedding_dim = 8
pooling = "mean"
[[features.sparse]]
name = "hist_category_ids"
vocab_size = 1000
table = "category_id"
multi_hot = true
pooling = "mean"
embedding_dim = 8
[[features.sparse]]
name = "user_tags"         # ids up to 1000: half are dropped
vocab_size = 500
multi_hot = true
pooling = "mean"
invalid_ids = "drop"
embedding_dim = 8
[[features.sparse]]
name = "item_tags"
vocab_size = 500
multi_hot = true
invalid_ids = "clip"
embedding_dim = 8
[[features.sparse]]
name = "city_id"
vocab_size = 1000
invalid_ids = "hash"
embedding_dim = 8
[[tasks]]
name = "click"
label = "click"
negative_rate = 0.5        # predictions corrected back to the true scale
[[tasks]]
name = "conversion"
label = "conversion"
condition = "click"
[[tasks]]
name = "watch_time"
kind = "regression"
label = "watch_time"
transform = "log1p"
"""

RUNS = {
    "mmoe": "",
    "ple": "--model.head ple",
    "stem": "--model.head stem",
    "esmm": "--model.esmm.enabled true --model.esmm.cvr_label ctcvr",
}


@pytest.fixture(scope="module")
def client_python(tmp_path_factory):
    """A fresh virtual environment with torch (this one's version, from the local wheels),
    pyarrow and xxhash — nothing else; built in the background while the models train.
    Yields a function that waits for it and returns its python."""
    root = tmp_path_factory.mktemp("client_venv")
    py = root / "v" / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-input",
           "--no-compile", f"torch=={torch.__version__}", "pyarrow", "xxhash"]  # fmt: skip
    t0 = time.perf_counter()
    job = subprocess.Popen(
        f"{sys.executable} -m venv --without-pip {root / 'v'} && {' '.join(pip)}",
        shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def ready() -> Path:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:]
        print(f"client venv ready after {time.perf_counter() - t0:.0f}s")
        return py

    yield ready
    if job.poll() is None:
        job.kill()


@pytest.fixture(scope="module")
def runs(client_python, tmp_path_factory):
    """The four tiny runs (one process: one import of torch and TorchRec) and their data."""
    from mtl_dist.data.synth import generate

    root = tmp_path_factory.mktemp("serving")
    generate(root / "data", train_rows=4096, val_rows=2048, files=1, val_files=1, verbose=False)
    for split in ("train", "val"):
        for path in (root / "data" / split).glob("*.parquet"):
            t = pq.read_table(path)
            for key, prefix, ids in (("item_key", "i", "item_id"), ("user_key", "u", "user_id")):
                keys = pc.binary_join_element_wise(prefix, pc.cast(t[ids], pa.string()), "")
                t = t.append_column(key, keys)
            pq.write_table(t, path)
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(data=root / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.serving_worker", str(root), str(config),
         *[f"{name}={args}" for name, args in RUNS.items()]],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_client_without_mtl_dist_reproduces_score(runs, client_python, tmp_path):
    from mtl_dist.serve.export import export_checkpoint, export_package
    from mtl_dist.serve.program import build_served, example_inputs, load_package
    from mtl_dist.serve.score import score

    val = runs / "data" / "val"
    jobs = []
    for name in RUNS:
        ckpt = runs / name / "checkpoints" / "step_00000006"
        report = export_package(ckpt, tmp_path / f"{name}.pt2")
        assert report["bytes"] == (tmp_path / f"{name}.pt2").stat().st_size
        export_checkpoint(ckpt, tmp_path / f"{name}.pt")
        assert score(
            tmp_path / f"{name}.pt", str(val), tmp_path / f"{name}.score.parquet", [], 1000
        )
        jobs.append((name, name))
    # AOTInductor: once, on MMoE (its compile is the slow step: ~20-40 s here)
    mmoe = runs / "mmoe" / "checkpoints" / "step_00000006"
    report = export_package(mmoe, tmp_path / "aoti.pt2", aoti=True, wrapper_opt="O0")
    print(f"AOTInductor compile {report['compile_s']:.0f}s")
    jobs.append(("aoti", "mmoe"))

    # the programs take B = 1 and empty bags (no batch size is special), eager and compiled
    from mtl_dist.serve.export import load_checkpoint_model

    cfg, model = load_checkpoint_model(mmoe)
    served = build_served(cfg, model)
    one = example_inputs(cfg, batch=1, seed=1)
    empty = example_inputs(cfg, batch=3, seed=2)
    empty[1][1], empty[2][1] = empty[1][1][:0], torch.zeros(4, dtype=torch.long)
    for package in ("mmoe.pt2", "aoti.pt2"):
        program = load_package(tmp_path / package)
        for inputs in (one, empty):
            torch.testing.assert_close(program(*inputs), served(*inputs), rtol=1e-6, atol=1e-6)

    # the AOTInductor package from C++, libtorch alone (examples/serve_aoti.cpp)
    exe = build_serve_aoti(tmp_path)
    n_dense, n_sparse = len(cfg.features.dense), len(cfg.features.sparse)
    cpp = subprocess.run([str(exe), str(tmp_path / "aoti.pt2"), "3", str(n_dense), str(n_sparse)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    probe = (torch.full((3, n_dense), 0.5), [torch.zeros(3, dtype=torch.long)] * n_sparse,
             [torch.arange(4)] * n_sparse)  # fmt: skip
    got = torch.tensor([[float(v) for v in line.split()] for line in cpp.stdout.splitlines()])
    torch.testing.assert_close(got, served(*probe), rtol=1e-5, atol=1e-6)
    # ... and verifies the package first: a damaged, empty or truncated one is named, exit 3
    for how, says in (("zeros", "does not match its CRC-32"), ("empty", "empty (0 bytes)"),
                      ("half", "truncated")):  # fmt: skip
        bad = _damaged(tmp_path / "aoti.pt2", tmp_path / f"aoti-{how}.pt2", how)
        cpp = subprocess.run([str(exe), str(bad), "3", str(n_dense), str(n_sparse)],
                             capture_output=True, text=True)  # fmt: skip
        assert cpp.returncode == 3 and f"{bad}: " in cpp.stderr and says in cpp.stderr, cpp.stderr

    # the client, in the environment without mtl_dist: every package in one process
    script = f"""
import importlib.util, sys
absent = [m for m in ("mtl_dist", "torchrec", "fbgemm_gpu", "numpy") if importlib.util.find_spec(m)]
assert not absent, absent
sys.path.insert(0, {str(ROOT / "examples")!r})
import serve
for name in {[j[0] for j in jobs]!r}:
    serve.main({str(tmp_path)!r} + f"/{{name}}.pt2", {str(val)!r}, {str(tmp_path)!r} + f"/{{name}}.client.parquet", "click")
"""
    python = client_python()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={"PATH": os.environ["PATH"], "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"client: {len(jobs)} packages in {time.perf_counter() - t0:.0f}s")
    for package, run in jobs:
        ours = pq.read_table(tmp_path / f"{package}.client.parquet")
        ref = pq.read_table(tmp_path / f"{run}.score.parquet")
        assert ours.num_rows == ref.num_rows == 2048
        assert ours.column_names == ["click", "pred_click", "pred_conversion", "pred_watch_time"]
        for c in ref.column_names:
            gap = np.abs(ours[c].to_numpy() - ref[c].to_numpy()).max()
            assert gap <= 1e-5, (package, c, gap)
    meta = json.loads(
        next(v for k, v in _archive(tmp_path / "stem.pt2").items() if k.endswith("mtl_dist.json"))
    )
    assert [t["name"] for t in meta["tasks"]] == ["click", "conversion", "watch_time"]
    assert meta["hashing"] == {
        "function": "xxh3_64", "seed": 7, "encoding": "utf-8",
        "applies_to": "string and binary ids (binary: its own bytes)",
        "row": "xxh3_64(bytes, seed) mod the feature's string_id_mod, by the client",
    }  # fmt: skip
    user_tags = next(f for f in meta["sparse"] if f["name"] == "user_tags")
    assert user_tags["program"] == "ids outside [0, 500) dropped"
    user_key = next(f for f in meta["sparse"] if f["name"] == "user_key")
    assert user_key["string_id_mod"] == 2**63 - 1 and user_key["program"].startswith("raw id mod")


def _archive(path: Path) -> dict[str, str]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {n: z.read(n).decode() for n in z.namelist() if n.endswith(".json")}


def test_int8_and_fp16_tables_keep_the_auc(runs, tmp_path):
    """Row-wise int8 tables (a scale and bias per row) and fp16 ones: the AUC moves by at most
    0.003 and 0.001 on the validation set, and the tables shrink."""
    from mtl_dist.serve.export import (
        export_package,
        load_checkpoint_model,
        table_bytes,
        table_check,
    )
    from mtl_dist.serve.program import build_served

    report = export_package(
        runs / "mmoe" / "checkpoints" / "step_00000006",
        tmp_path / "int8.pt2",
        embedding_dtype="int8",
    )
    check = report["check"]
    assert set(check) == {"click", "conversion", "watch_time"}
    assert check["click"]["rows"] == 2048 and check["click"]["metric"] == "auc"
    assert abs(check["click"]["delta"]) <= 0.003 and abs(check["conversion"]["delta"]) <= 0.003
    # 8-wide rows: 8 bytes of int8 + a 4-byte scale and bias against 32 bytes of fp32
    assert report["table_bytes"] / report["table_bytes_fp32"] == pytest.approx(16 / 32, rel=0.01)
    cfg, model = load_checkpoint_model(runs / "stem" / "checkpoints" / "step_00000006")
    fp32, fp16 = build_served(cfg, model), build_served(cfg, model, "fp16")  # STEM: task tables too
    check = table_check(cfg, fp32, fp16, str(runs / "data" / "val"), 10_000)
    assert abs(check["click"]["delta"]) <= 0.001 and abs(check["conversion"]["delta"]) <= 0.001
    assert table_bytes(fp16) * 2 == table_bytes(fp32)


def _damaged(src: Path, dst: Path, how: str) -> Path:
    """A copy of ``src``: 64 KiB of zeros in the middle (a bad block), empty, or cut in half."""
    data = bytearray(src.read_bytes())
    if how == "zeros":
        mid = len(data) // 2
        data[mid : mid + 65536] = bytes(min(65536, len(data) - mid))
    elif how == "empty":
        data = bytearray()
    else:
        data = data[: len(data) // 2]
    dst.write_bytes(bytes(data))
    return dst


def test_damaged_models_and_bad_client_inputs_stop_with_the_file_named(
    runs, client_python, tmp_path
):
    """Issue 24/25: a damaged, empty or truncated ``.pt`` / ``.pt2`` never scores — ``score``,
    ``load_package`` and the client without mtl-dist each name the file (and the damaged
    member); the client names the file and column a feature is missing from, and serves uint64
    ids beyond int64 as training hashes them (equal to ``score``)."""
    from mtl_dist.serve.export import export_checkpoint, export_package, load_exported
    from mtl_dist.serve.program import load_package, read_metadata
    from mtl_dist.serve.score import score

    ckpt = runs / "mmoe" / "checkpoints" / "step_00000006"
    export_checkpoint(ckpt, tmp_path / "model.pt")
    export_package(ckpt, tmp_path / "model.pt2")
    val = runs / "data" / "val"
    for how, says in (
        ("zeros", "does not match its CRC-32"),
        ("empty", "empty (0 bytes)"),
        ("half", "truncated or not a zip archive"),
    ):
        bad = _damaged(tmp_path / "model.pt", tmp_path / f"{how}.pt", how)
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: .*{re.escape(says)}") as e:
            score(bad, str(val), tmp_path / f"{how}.scores.parquet", [], 1000)
        assert "mtl_dist.serve.export" in str(e.value)  # what writes a good one
        assert not (tmp_path / f"{how}.scores.parquet").exists()
        bad2 = _damaged(tmp_path / "model.pt2", tmp_path / f"{how}.pt2", how)
        for reader in (load_package, read_metadata):
            with pytest.raises(ValueError, match=f"{re.escape(str(bad2))}: .*{re.escape(says)}"):
                reader(bad2)
    with pytest.raises(ValueError, match="not an mtl-dist model file"):  # a package, not a .pt
        load_exported(tmp_path / "model.pt2")
    # the CLI: a non-zero exit with the message, no traceback
    cli = subprocess.run(
        [sys.executable, "-m", "mtl_dist.serve.score", "--model", str(tmp_path / "zeros.pt"),
         "--data", str(val), "--out", str(tmp_path / "cli.parquet")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2 and "does not match its CRC-32" in cli.stderr, cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr

    # inputs: one file without city_id; one whose user_id is uint64 with ids past 2**63
    t = pq.read_table(next(val.glob("*.parquet")))
    pq.write_table(t.drop_columns(["city_id"]), tmp_path / "no_city.parquet")
    big = pc.add(t["user_id"].cast(pa.uint64()), pa.scalar(2**63 + 12345, pa.uint64()))
    user_id = pc.if_else(pc.equal(pc.bit_wise_and(t["user_id"], 1), 1), big,
                         t["user_id"].cast(pa.uint64()))  # fmt: skip
    wide = t.set_column(t.schema.get_field_index("user_id"), "user_id", user_id)
    pq.write_table(wide, tmp_path / "wide.parquet")
    assert score(tmp_path / "model.pt", str(tmp_path / "wide.parquet"),
                 tmp_path / "wide.score.parquet", [], 1000) == t.num_rows  # fmt: skip
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "examples")!r})
import serve
d = {str(tmp_path)!r}
for name, data in [("zeros.pt2", "wide.parquet"), ("empty.pt2", "wide.parquet"),
                   ("half.pt2", "wide.parquet"), ("model.pt2", "no_city.parquet")]:
    try:
        serve.main(f"{{d}}/{{name}}", f"{{d}}/{{data}}", f"{{d}}/out.parquet")
    except ValueError as e:
        print("ERROR", e)
serve.main(f"{{d}}/model.pt2", f"{{d}}/wide.parquet", f"{{d}}/wide.client.parquet")
"""
    proc = subprocess.run(
        [str(client_python()), "-c", script], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={"PATH": os.environ["PATH"], "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 4, proc.stdout
    assert f"{tmp_path}/zeros.pt2: member" in errors[0] and "CRC-32" in errors[0]
    assert f"{tmp_path}/empty.pt2: empty (0 bytes)" in errors[1]
    assert f"{tmp_path}/half.pt2: truncated" in errors[2]
    assert f"{tmp_path}/no_city.parquet: missing column(s) city_id" in errors[3]
    ours = pq.read_table(tmp_path / "wide.client.parquet", page_checksum_verification=True)
    ref = pq.read_table(tmp_path / "wide.score.parquet", page_checksum_verification=True)
    for c in ref.column_names:
        assert np.abs(ours[c].to_numpy() - ref[c].to_numpy()).max() <= 1e-5, c


def test_client_without_mtl_dist_scores_float_side_columns(client_python, tmp_path):
    """A sequence with a float side column (configs/sequences_recency.toml: hist_item_ids and
    hist_age_s, lists past max_len, empty and null histories): its eager and AOTInductor
    packages scored by examples/serve.py in the environment without mtl-dist equal
    ``mtl_dist.serve.score``."""
    from mtl_dist.config import load_config, to_dict
    from mtl_dist.data.synth_sequences import make_rows
    from mtl_dist.serve.export import FORMAT, build_unsharded
    from mtl_dist.serve.package import write_package
    from mtl_dist.serve.program import build_served, export_program, metadata
    from mtl_dist.serve.score import score

    cfg = load_config(["--config", str(ROOT / "configs" / "sequences_recency.toml")])
    model = build_unsharded(cfg).eval()
    program = export_program(cfg, build_served(cfg, model))
    for name, aoti in (("eager", False), ("aoti", True)):
        with open(tmp_path / f"{name}.pt2", "wb") as fh:
            meta = metadata(cfg, "fp32", "aoti-cpu" if aoti else "eager")
            write_package(fh, program, meta, aoti, {"aot_inductor.compile_wrapper_opt_level": "O0"})
    t = make_rows(64, np.random.default_rng(5), max_hist=30)  # some lists past max_len 20
    hist, ages = t["hist_item_ids"].to_pylist(), t["hist_age_s"].to_pylist()
    hist[0], ages[0], hist[1], ages[1] = [], [], None, None
    t = t.set_column(t.schema.get_field_index("hist_item_ids"), "hist_item_ids",
                     pa.array(hist, pa.list_(pa.int64())))  # fmt: skip
    t = t.set_column(t.schema.get_field_index("hist_age_s"), "hist_age_s",
                     pa.array(ages, pa.list_(pa.float32())))  # fmt: skip
    pq.write_table(t, tmp_path / "rows.parquet")
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    assert score(path, str(tmp_path / "rows.parquet"), tmp_path / "s.parquet", [], 16) == 64
    script = f"""
import importlib.util, sys
absent = [m for m in ("mtl_dist", "torchrec", "fbgemm_gpu", "numpy") if importlib.util.find_spec(m)]
assert not absent, absent
sys.path.insert(0, {str(ROOT / "examples")!r})
import serve
for name in ("eager", "aoti"):
    serve.main({str(tmp_path)!r} + f"/{{name}}.pt2", {str(tmp_path / "rows.parquet")!r},
               {str(tmp_path)!r} + f"/{{name}}.client.parquet")
"""
    proc = subprocess.run(
        [str(client_python()), "-c", script], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={"PATH": os.environ["PATH"], "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = pq.read_table(tmp_path / "s.parquet")
    for name in ("eager", "aoti"):
        ours = pq.read_table(tmp_path / f"{name}.client.parquet")
        assert ours.num_rows == 64
        for task in cfg.tasks:
            c = f"pred_{task.name}"
            np.testing.assert_allclose(ours[c].to_numpy(), ref[c].to_numpy(), 1e-5, 1e-6)
