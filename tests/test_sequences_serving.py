"""Sequences in the served program: each sequence as values + offsets (whole lists: the program
keeps the last max_len as the reader does), the export equal to ``mtl_dist.serve.score`` at
B = 1, with empty histories and on lists longer than max_len (float side columns too), and
``examples/serve.py`` building the inputs from Parquet list columns."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtl_dist.config import load_config, to_dict
from mtl_dist.data.synth_sequences import make_rows
from mtl_dist.serve.export import FORMAT, build_unsharded
from mtl_dist.serve.program import build_served, export_program, metadata
from mtl_dist.serve.score import score
from tests.conftest import ROOT, build_serve_aoti


def client():
    spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(n: int, seed: int) -> pa.Table:
    """Lists of 0..30 ids (max_len is 20: some clipped), a few null and empty ones."""
    t = make_rows(n, np.random.default_rng(seed), max_hist=30)
    hist = t.column("hist_item_ids").to_pylist()
    hist[0], hist[min(1, n - 1)] = [], None
    return t.set_column(2, "hist_item_ids", pa.array(hist, pa.list_(pa.int64())))


def recency_rows(n: int, seed: int) -> pa.Table:
    """:func:`rows` with ``hist_age_s`` aligned: its empty and null histories empty / null."""
    t = rows(n, seed)
    ages = t.column("hist_age_s").to_pylist()
    ages[0], ages[min(1, n - 1)] = [], None
    return t.set_column(t.schema.get_field_index("hist_age_s"), "hist_age_s",
                        pa.array(ages, pa.list_(pa.float32())))  # fmt: skip


@pytest.mark.parametrize("pooling", ["din", "mha", "mean"])
def test_program_equals_score_at_b1_empty_histories_and_clipped_lists(tmp_path, pooling):
    cfg = load_config(["--config", "configs/sequences.toml"])
    cfg.features.sequence[0].pooling = pooling
    model = build_unsharded(cfg).eval()
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    table = rows(48, seed=1)
    assert max(len(h or []) for h in table.column("hist_item_ids").to_pylist()) > 20
    pq.write_table(table, tmp_path / "rows.parquet")
    assert score(path, str(tmp_path / "rows.parquet"), tmp_path / "preds.parquet", [], 16) == 48
    scored = pq.read_table(tmp_path / "preds.parquet")
    expected = torch.stack(
        [torch.tensor(scored[f"pred_{t.name}"].to_numpy()) for t in cfg.tasks], 1
    )

    program = export_program(cfg, build_served(cfg, model)).module()
    meta = metadata(cfg, "fp32", "eager")
    assert meta["inputs"][-1] == "offsets/hist" and meta["sequences"][0]["max_len"] == 20
    serve = client()
    batch = table.to_batches()[0]
    whole = serve.inputs(meta, batch)  # whole lists, as a client sends them
    assert int(whole[2][-1][-1]) == sum(len(h or []) for h in batch["hist_item_ids"].to_pylist())
    torch.testing.assert_close(program(*whole), expected, rtol=1e-5, atol=1e-6)
    for i in (0, 1, 5):  # B = 1: an empty, a null and a long history
        one = serve.inputs(meta, batch.slice(i, 1))
        torch.testing.assert_close(program(*one), expected[i : i + 1], rtol=1e-5, atol=1e-6)
    # every history empty
    empty = serve.inputs(meta, batch.slice(0, 1))
    empty_all = batch.set_column(
        2, "hist_item_ids", pa.array([[]] * batch.num_rows, pa.list_(pa.int64()))
    )
    pq.write_table(pa.Table.from_batches([empty_all]), tmp_path / "empty.parquet")
    score(path, str(tmp_path / "empty.parquet"), tmp_path / "empty_preds.parquet", [], 16)
    got = program(*serve.inputs(meta, empty_all))
    want = pq.read_table(tmp_path / "empty_preds.parquet")
    for j, t in enumerate(cfg.tasks):
        np.testing.assert_allclose(got[:, j].numpy(), want[f"pred_{t.name}"].to_numpy(), 1e-5, 1e-6)
    assert empty[2][-1].tolist() == [0, 0]


@pytest.mark.parametrize(
    "config, aoti",
    [("sequences", False), ("sequences_recency", False), ("sequences_recency", True)],
    ids=["ids", "float_side", "float_side_aoti"],
)
def test_examples_serve_scores_a_package_from_list_columns(tmp_path, config, aoti):
    """examples/serve.py, a process where ``import mtl_dist`` fails, scores the package (eager,
    or compiled by AOTInductor) from the list columns (sequences_recency: hist_age_s too) as
    mtl_dist.score does."""
    from mtl_dist.serve.package import write_package

    cfg = load_config(["--config", f"configs/{config}.toml"])
    model = build_unsharded(cfg).eval()
    program = export_program(cfg, build_served(cfg, model))
    with open(tmp_path / "m.pt2", "wb") as fh:
        meta = metadata(cfg, "fp32", "aoti-cpu" if aoti else "eager")
        write_package(fh, program, meta, aoti, {"aot_inductor.compile_wrapper_opt_level": "O0"})
    pq.write_table(recency_rows(40, seed=2), tmp_path / "rows.parquet")
    args = [str(tmp_path / n) for n in ("m.pt2", "rows.parquet", "p.parquet")]
    blocked = (
        "import runpy, sys; sys.modules['mtl_dist'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked, str(ROOT / "examples" / "serve.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    score(path, str(tmp_path / "rows.parquet"), tmp_path / "s.parquet", [], 16)
    a, b = pq.read_table(tmp_path / "p.parquet"), pq.read_table(tmp_path / "s.parquet")
    for t in cfg.tasks:
        np.testing.assert_allclose(
            a[f"pred_{t.name}"].to_numpy(), b[f"pred_{t.name}"].to_numpy(), 1e-5, 1e-6
        )


@pytest.mark.parametrize("pooling", ["din", "mha", "din_per_task"])
def test_program_with_a_side_column_equals_score(tmp_path, pooling):
    """A side column (and, din_per_task, each task its own query): the program equals score."""
    from tests.models.test_sequence import side_cfg

    cfg = side_cfg(pooling.removesuffix("_per_task"))
    cfg.features.sequence[0].per_task = pooling.endswith("_per_task")
    model = build_unsharded(cfg).eval()
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    table = make_rows(40, np.random.default_rng(5), max_hist=30)
    pq.write_table(table, tmp_path / "rows.parquet")
    score(path, str(tmp_path / "rows.parquet"), tmp_path / "preds.parquet", [], 16)
    scored = pq.read_table(tmp_path / "preds.parquet")
    meta = metadata(cfg, "fp32", "eager")
    assert [q["input"] for q in meta["sequences"]] == ["hist", "hist/hist_category_ids"]
    program = export_program(cfg, build_served(cfg, model)).module()
    serve = client()
    got = program(*serve.inputs(meta, table.to_batches()[0]))
    for j, t in enumerate(cfg.tasks):
        np.testing.assert_allclose(
            got[:, j].numpy(), scored[f"pred_{t.name}"].to_numpy(), 1e-5, 1e-6
        )
    one = program(*serve.inputs(meta, table.to_batches()[0].slice(3, 1)))
    torch.testing.assert_close(one, got[3:4], rtol=1e-5, atol=1e-6)
    bad = table.set_column(
        table.schema.get_field_index("hist_category_ids"), "hist_category_ids",
        pa.array([[1]] * 40, pa.list_(pa.int64())),
    )  # fmt: skip
    with pytest.raises(ValueError, match="lists not as long as 'hist_item_ids'"):
        serve.inputs(meta, bad.to_batches()[0])


def test_program_with_float_side_columns_equals_score(tmp_path):
    """configs/sequences_recency.toml: hist_age_s as values + offsets, clipped to the last
    max_len and log1p'd in the program, equals mtl_dist.score and the model in eval (B = 1,
    empty and null histories, lists past max_len, every history empty); the client names a
    float list not as long as its ids and a bad value."""
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.serve.program import inputs_from_batch

    cfg = load_config(["--config", "configs/sequences_recency.toml"])
    model = build_unsharded(cfg).eval()
    with torch.no_grad():  # a FloatSide that matters: the ages move the keys
        model.model.sequences.float_sides["0"].proj.weight.mul_(40)
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    table = recency_rows(40, seed=3)
    assert max(len(h or []) for h in table.column("hist_age_s").to_pylist()) > 20
    pq.write_table(table, tmp_path / "rows.parquet")
    assert score(path, str(tmp_path / "rows.parquet"), tmp_path / "preds.parquet", [], 16) == 40
    scored = pq.read_table(tmp_path / "preds.parquet")
    expected = torch.stack(
        [torch.tensor(scored[f"pred_{t.name}"].to_numpy()) for t in cfg.tasks], 1
    )
    served = build_served(cfg, model)
    program = export_program(cfg, served).module()
    meta = metadata(cfg, "fp32", "eager")
    assert meta["inputs"][-1] == "offsets/hist/hist_age_s"
    assert meta["sequence_floats"][0]["aligned_with"] == "hist_item_ids"
    serve = client()
    batch = table.to_batches()[0]
    got = program(*serve.inputs(meta, batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    no_ages = served(*serve.inputs(meta, batch.drop_columns(["hist_age_s"]).append_column(
        "hist_age_s", pa.array([[0.0] * len(h or []) for h in batch["hist_item_ids"].to_pylist()],
                               pa.list_(pa.float32())))))  # fmt: skip
    assert (no_ages - got).abs().max() > 1e-4  # the ages are read
    conv = ArrowBatchConverter(
        cfg.features.sparse, cfg.features.dense, cfg.tasks, sequences=cfg.features.sequence
    )
    eval_batch = conv(table)
    torch.testing.assert_close(
        served(*inputs_from_batch(eval_batch, cfg.features.sequence)), expected, rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
    for i in (0, 1, 5):  # B = 1: an empty, a null and a long history
        one = program(*serve.inputs(meta, batch.slice(i, 1)))
        torch.testing.assert_close(one, expected[i : i + 1], rtol=1e-5, atol=1e-6)
    empty = pa.array([[]] * batch.num_rows, pa.list_(pa.int64()))
    empty_all = batch.set_column(2, "hist_item_ids", empty).set_column(
        batch.schema.get_field_index("hist_age_s"), "hist_age_s", empty.cast(pa.list_(pa.float32()))
    )
    pq.write_table(pa.Table.from_batches([empty_all]), tmp_path / "empty.parquet")
    score(path, str(tmp_path / "empty.parquet"), tmp_path / "empty_preds.parquet", [], 16)
    want = pq.read_table(tmp_path / "empty_preds.parquet")
    got = program(*serve.inputs(meta, empty_all))
    for j, t in enumerate(cfg.tasks):
        np.testing.assert_allclose(got[:, j].numpy(), want[f"pred_{t.name}"].to_numpy(), 1e-5, 1e-6)

    at = batch.schema.get_field_index("hist_age_s")
    ages = batch["hist_age_s"].to_pylist()
    short = [a[:-1] if a else a for a in ages]
    with pytest.raises(ValueError, match="'hist_age_s': lists not as long as 'hist_item_ids'"):
        serve.inputs(
            meta, batch.set_column(at, "hist_age_s", pa.array(short, pa.list_(pa.float32())))
        )
    for value, shown in ((float("nan"), "nan"), (-1.0, "-1.0"), (1e39, "1e+39"), (None, "None")):
        wrong = [list(a) if a else a for a in ages]
        wrong[5][0] = value  # 1e39: beyond float32
        bad = batch.set_column(at, "hist_age_s", pa.array(wrong, pa.list_(pa.float64())))
        rule = r"a null, NaN, infinite or negative value \(float_transform = 'log1p'\)"
        with pytest.raises(
            ValueError, match=rf"column 'hist_age_s', row 5: {rule}: {re.escape(shown)}$"
        ):
            serve.inputs(meta, bad)


@pytest.mark.parametrize("aoti", [False, True], ids=["eager", "aoti"])
def test_program_checks_its_float_inputs(tmp_path, aoti):
    """The package's program (eager, or compiled by AOTInductor) refuses a NaN / infinite or
    (log1p) negative float value, float offsets other than the ids' and a last offset other
    than the values' count, naming the input; good inputs still equal mtl_dist.score."""
    from mtl_dist.serve.package import load_package, write_package

    cfg = load_config(["--config", "configs/sequences_recency.toml"])
    model = build_unsharded(cfg).eval()
    program = export_program(cfg, build_served(cfg, model))
    meta = metadata(cfg, "fp32", "aoti-cpu" if aoti else "eager")
    with open(tmp_path / "m.pt2", "wb") as fh:
        write_package(fh, program, meta, aoti, {"aot_inductor.compile_wrapper_opt_level": "O0"})
    served = load_package(tmp_path / "m.pt2")
    table = recency_rows(24, seed=4)
    pq.write_table(table, tmp_path / "rows.parquet")
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "config": to_dict(cfg), "state_dict": model.state_dict()}, path)
    score(path, str(tmp_path / "rows.parquet"), tmp_path / "s.parquet", [], 16)
    scored = pq.read_table(tmp_path / "s.parquet")
    expected = torch.stack(
        [torch.tensor(scored[f"pred_{t.name}"].to_numpy()) for t in cfg.tasks], 1
    )
    dense, values, offsets = client().inputs(meta, table.to_batches()[0])
    torch.testing.assert_close(served(dense, values, offsets), expected, rtol=1e-5, atol=1e-6)

    assert meta["inputs"][-1] == "offsets/hist/hist_age_s"  # the one float input: the last
    ids = meta["inputs"].index("offsets/hist") - 1 - len(values)  # the ids' offsets

    def bad(values_, offsets_, message):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            served(dense, [*values[:-1], values_], [*offsets[:-1], offsets_])

    ages, age_offsets = values[-1], offsets[-1]
    for v in (float("nan"), float("inf")):
        bad(ages.clone().index_fill_(0, torch.tensor([3]), v), age_offsets,
            "values/hist/hist_age_s: a NaN or infinite value")  # fmt: skip
    bad(ages.clone().index_fill_(0, torch.tensor([3]), -1.0), age_offsets,
        "values/hist/hist_age_s: a value below 0 (float_transform = 'log1p')")  # fmt: skip
    moved = age_offsets.clone()
    row = int(torch.nonzero(age_offsets[1:] - age_offsets[:-1] > 0)[0]) + 1  # a non-empty row
    moved[row] -= 1  # one value moved to the next row: as many in all, misaligned
    assert torch.equal(offsets[ids], age_offsets)
    bad(ages, moved, "offsets/hist/hist_age_s: not the offsets of its ids' input")
    bad(ages[:-1], age_offsets, "offsets/hist/hist_age_s: its last offset is not the values' count")


@pytest.mark.skipif(
    shutil.which("g++") is None, reason="needs g++ to build examples/serve_aoti.cpp"
)
def test_serve_aoti_cpp_feeds_float_inputs_and_reports_a_refused_one(tmp_path):
    """examples/serve_aoti.cpp (libtorch alone) runs the AOTInductor package of a model with a
    float side column: its probe's output equals the served module's; a NaN or negative value
    stops with the program's own message naming the input, exit code 4."""
    from mtl_dist.serve.package import write_package
    from mtl_dist.serve.sequences import served_features

    cfg = load_config(["--config", "configs/sequences_recency.toml"])
    model = build_unsharded(cfg).eval()
    served = build_served(cfg, model)
    with open(tmp_path / "m.pt2", "wb") as fh:
        write_package(fh, export_program(cfg, served), metadata(cfg, "fp32", "aoti-cpu"), True,
                      {"aot_inductor.compile_wrapper_opt_level": "O0"})  # fmt: skip
    exe = build_serve_aoti(tmp_path)
    ids = len(served_features(cfg.features.sparse, cfg.features.sequence))
    dense = len(cfg.features.dense)

    def cpp(*value: str) -> subprocess.CompletedProcess:
        argv = [str(exe), str(tmp_path / "m.pt2"), "3", str(dense), str(ids), "1", *value]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    ok = cpp("5")
    assert ok.returncode == 0, ok.stderr[-3000:]
    got = torch.tensor([[float(v) for v in line.split()] for line in ok.stdout.splitlines()])
    probe = (torch.full((3, dense), 0.5), [torch.zeros(3, dtype=torch.long)] * ids
             + [torch.full((3,), 5.0)], [torch.arange(4)] * (ids + 1))  # fmt: skip
    torch.testing.assert_close(got, served(*probe), rtol=1e-5, atol=1e-6)
    for value, says in (("nan", "values/hist/hist_age_s: a NaN or infinite value"),
                        ("-1", "values/hist/hist_age_s: a value below 0")):  # fmt: skip
        bad = cpp(value)
        assert bad.returncode == 4 and "the program refused its inputs" in bad.stderr, bad.stderr
        assert says in bad.stderr, bad.stderr
