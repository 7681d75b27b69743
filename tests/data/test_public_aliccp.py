"""mtl-prepare aliccp: skeleton and common-feature files in the raw Ali-CCP format (empty
feature lists, fields outside ESMM's, multi-valued behaviour fields, a field in both files,
separate test files), prepared and checked against the join computed here by hand; malformed
lines name file, line and field; the generated config trains 2 ranks under torchrun."""

from __future__ import annotations

import json
import random

import pyarrow.dataset as ds
import pytest

from mtl_dist.data.public import PrepareError
from mtl_dist.data.public.__main__ import run
from mtl_dist.data.public.aliccp import COLUMNS, FIELDS
from tests.conftest import torchrun

USER_FIELDS = ["101", "121", "122", "129", "109_14", "150_14"]
AD_FIELDS = ["205", "206", "216", "508", "301"]


def entries(rng: random.Random, fields: list[str]) -> list[tuple[str, int, str]]:
    out = []
    for f in fields:
        for _ in range(rng.choice((0, 1, 1, 3)) if f.endswith("_14") else 1):
            out.append((f, rng.randrange(1, 400), rng.choice(("1.0", "0.5", "1"))))
    if rng.random() < 0.3:
        out.append(("999", rng.randrange(1, 400), "1.0"))  # a field outside ESMM's: dropped
    rng.shuffle(out)
    return out


def text(es) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in es)


def write_split(d, split, rng, users, samples):
    common = {f"u{split}{k:04x}": entries(rng, USER_FIELDS) for k in range(users)}
    common[f"u{split}empty"] = []  # a user without any feature
    keys = list(common)
    lines = [f"{k},{len(es)},{text(es)}" for k, es in common.items()]
    (d / f"common_features_{split}.csv").write_text("\n".join(lines) + "\n")
    rows, lines = [], []
    for i in range(samples):
        own = [] if i % 17 == 0 else entries(rng, AD_FIELDS)
        if i % 5 == 0:
            own.append(("109_14", 7, "1.0"))  # a behaviour field in the sample too
        click = int(rng.random() < 0.4)
        conv = int(click and rng.random() < 0.5)
        key = rng.choice(keys)
        lines.append(f"{i},{click},{conv},{key},{len(own)},{text(own)}")
        rows.append((own, common[key], click, conv))
    (d / f"sample_skeleton_{split}.csv").write_text("\n".join(lines) + "\n")
    return rows


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("aliccp_raw")
    rng = random.Random(1)
    return d, write_split(d, "train", rng, 40, 300), write_split(d, "test", rng, 20, 101)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("aliccp_out")
    return out, run("aliccp", raw[0], out)


def expected(rows):
    out = []
    for own, user, click, conv in rows:
        e = {
            f"f{f}": [i for g, i, _ in own if g == f] + [i for g, i, _ in user if g == f]
            for f in FIELDS
        }
        out.append({**e, "click": click, "conversion": conv})
    return out


def test_rows_match_the_join_by_hand(raw, prepared):
    _, train, test = raw
    out, info = prepared
    for split, rows in {"train": train, "val": test[0::2], "test": test[1::2]}.items():
        # test line k + 1: odd lines (k even) → val
        got = ds.dataset(out / split).to_table().to_pylist()
        assert got == expected(rows), split
        assert info["splits"][split]["rows"] == len(rows)
        clicks = sum(r[2] for r in rows) / len(rows)
        assert info["splits"][split]["positive_rate"]["click"] == pytest.approx(clicks)
    train_rows = expected(train)
    for c in COLUMNS:
        ids = {i for r in train_rows for i in r[c]}
        assert info["vocab_sizes"][c] == len(ids), c
    assert any(r["f205"] == [] for r in train_rows)  # the empty sample lists
    assert any(len(r["f109_14"]) > 1 for r in train_rows)
    assert info["other_field_entries"] > 0
    assert len(info["sources"]) == 4
    assert json.loads((out / "dataset.json").read_text())["vocab_sizes"] == info["vocab_sizes"]


def _edit(line: str, what: str) -> str:
    cols = line.split(",")
    if what == "columns":
        return ",".join(cols[:5])
    if what == "count":
        return ",".join([*cols[:4], str(int(cols[4]) + 1), cols[5]])
    if what == "index":
        return ",".join([*cols[:3], "nobody", *cols[4:]])
    if what == "label":
        return ",".join([cols[0], "2", *cols[2:]])
    if what == "id":
        return ",".join([*cols[:4], "1", "205\x02x9\x031.0"])
    if what == "negative":
        return ",".join([*cols[:4], "1", "205\x02-9\x031.0"])
    return ",".join([*cols[:4], "1", "205\x029"])  # no value


@pytest.mark.parametrize(
    "what,field",
    [
        ("columns", "features"),
        ("count", "feature_num"),
        ("index", "common_feature_index"),
        ("label", "click"),
        ("id", "feature_list (feature id)"),
        ("negative", "feature_list (feature id)"),
        ("entry", "feature_list"),
    ],
)
@pytest.mark.parametrize("buckets", [1, 2])
def test_malformed_line_names_file_line_and_field(raw, tmp_path, what, field, buckets):
    d = raw[0]
    bad = tmp_path / "raw"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    path = bad / "sample_skeleton_train.csv"
    lines = path.read_text().split("\n")
    lines[6] = _edit(lines[6], what)
    path.write_text("\n".join(lines))
    with pytest.raises(PrepareError) as e:
        run("aliccp", bad, tmp_path / "out", buckets=buckets)
    assert f"sample_skeleton_train.csv:7: field {field}:" in str(e.value), str(e.value)


def test_generated_config_trains_two_ranks(prepared, tmp_path):
    out, _ = prepared
    proc = torchrun(
        [
            "-m", "mtl_dist.train", "--config", str(out / "aliccp.toml"),
            "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false",
            "--train.batch_size", "32", "--train.max_steps", "3", "--train.precision", "fp32",
        ]
    )  # fmt: skip
    assert proc.returncode == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


def test_bucketed_join_writes_the_same_rows(raw, prepared, tmp_path):
    """--buckets 3: both files spilled by index hash and joined bucket by bucket; the same rows
    (grouped by bucket), the same counts, no spill files left."""
    out, info = prepared
    info3 = run("aliccp", raw[0], tmp_path, buckets=3)
    for split in ("train", "val", "test"):
        a = ds.dataset(out / split).to_table().to_pylist()
        b = ds.dataset(tmp_path / split).to_table().to_pylist()
        assert a != b or split != "train"  # (the order differs)
        assert sorted(map(repr, a)) == sorted(map(repr, b)), split
    assert info3["vocab_sizes"] == info["vocab_sizes"] and info3["splits"] == info["splits"]
    assert not (tmp_path / ".spill").exists() or not any((tmp_path / ".spill").iterdir())


def test_small_blocks_give_the_same_rows(raw, prepared, tmp_path, monkeypatch):
    """Read in 2 KiB blocks (many batches: the common table built from several): same rows."""
    from mtl_dist.data.public import common

    monkeypatch.setattr(common, "BLOCK_BYTES", 2048)
    out, info = prepared
    small = run("aliccp", raw[0], tmp_path)
    assert small["splits"] == info["splits"] and small["vocab_sizes"] == info["vocab_sizes"]
    for split in ("train", "val", "test"):
        a = ds.dataset(out / split).to_table()
        assert a.equals(ds.dataset(tmp_path / split).to_table()), split


def test_committed_config_loads():
    from mtl_dist.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(["--config", str(ROOT / "configs" / "aliccp.toml")])
    assert [t.condition for t in cfg.tasks] == ["", "click"] and len(cfg.features.sparse) == 23
