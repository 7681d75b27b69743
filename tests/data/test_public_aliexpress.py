"""mtl-prepare aliexpress: train.csv / test.csv in the MTReclib country-split format (a header,
a quoted value, a test-only code), prepared and checked against values computed here by hand;
malformed lines name file, line and field."""

from __future__ import annotations

import random

import pyarrow.dataset as ds
import pytest

from mtl_dist.data.public import PrepareError
from mtl_dist.data.public.__main__ import run
from mtl_dist.data.public.aliexpress import CATEGORICAL, NAMES, NUMERIC
from tests.conftest import ROOT


def rows(rng: random.Random, n: int, test: bool) -> list[list[str]]:
    out = []
    for i in range(n):
        cat = [str(rng.randrange(5)) for _ in CATEGORICAL]
        if test and i % 9 == 0:
            cat[3] = "777"  # a code unseen in training
        num = [f"{rng.random():.4f}" for _ in NUMERIC]
        click = int(rng.random() < 0.3)
        out.append([str(1000 + i), *cat, *num, str(click), str(int(click and rng.random() < 0.4))])
    return out


def write(path, data, quote_row=None):
    lines = [",".join(NAMES)]
    for k, r in enumerate(data):
        r = list(r)
        if k == quote_row:
            r[1] = f'"{r[1]}"'
        lines.append(",".join(r))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("aliexpress_raw")
    (d / "AliExpress_NL").mkdir()
    rng = random.Random(2)
    train, test = rows(rng, 200, False), rows(rng, 61, True)
    write(d / "AliExpress_NL" / "train.csv", train, quote_row=3)
    write(d / "AliExpress_NL" / "test.csv", test)
    return d, train, test


def expected(data, vocab):
    out = []
    for r in data:
        e = {n: vocab[n].get(r[1 + j], 0) for j, n in enumerate(CATEGORICAL)}
        e |= {n: pytest.approx(float(r[17 + j]), rel=1e-6) for j, n in enumerate(NUMERIC)}
        out.append({**e, "click": int(r[-2]), "conversion": int(r[-1])})
    return out


def test_rows_match_the_raw_values(raw, tmp_path):
    d, train, test = raw
    info = run("aliexpress", d, tmp_path, country="NL")
    vocab = {
        n: {v: i + 1 for i, v in enumerate(sorted({r[1 + j] for r in train}))}
        for j, n in enumerate(CATEGORICAL)
    }
    assert info["vocab_sizes"] == {n: len(v) + 1 for n, v in vocab.items()}
    # the header is line 1: test record k is on line k + 2, odd lines (k odd) → val
    for split, data in {"train": train, "val": test[1::2], "test": test[0::2]}.items():
        got = ds.dataset(tmp_path / split).to_table().to_pylist()
        assert got == expected(data, vocab), split
    assert 0 in ds.dataset(tmp_path / "test").to_table()["categorical_4"].to_pylist()
    text = (tmp_path / "aliexpress.toml").read_text()
    assert 'head = "aitm"' in text and f'val_path = "{tmp_path}/val"' in text


@pytest.mark.parametrize(
    "col,value,field",
    [(None, None, "(after conversion)"), (20, "x1", "numerical_4"), (-1, "3", "conversion")],
    ids=["column_count", "non_numeric", "bad_label"],
)
def test_malformed_line_names_file_line_and_field(raw, tmp_path, col, value, field):
    d = raw[0]
    bad = tmp_path / "raw"
    bad.mkdir()
    lines = (d / "AliExpress_NL" / "train.csv").read_text().splitlines()
    cols = lines[9].split(",")
    if col is None:
        cols.append("1")
    else:
        cols[col] = value
    lines[9] = ",".join(cols)
    (bad / "train.csv").write_text("\n".join(lines) + "\n")
    (bad / "test.csv").write_text((d / "AliExpress_NL" / "test.csv").read_text())
    with pytest.raises(PrepareError) as e:
        run("aliexpress", bad, tmp_path / "out")
    assert f"train.csv:10: field {field}:" in str(e.value), str(e.value)


def test_committed_config_loads():
    from mtl_dist.config import load_config

    cfg = load_config(["--config", str(ROOT / "configs" / "aliexpress.toml")])
    assert len(cfg.features.sparse) == 16 and len(cfg.features.dense) == 63


def test_generated_config_trains_two_ranks(raw, tmp_path):
    import json

    from tests.conftest import torchrun

    run("aliexpress", raw[0], tmp_path / "data", country="NL")
    proc = torchrun(
        [
            "-m", "mtl_dist.train", "--config", str(tmp_path / "data" / "aliexpress.toml"),
            "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false",
            "--train.batch_size", "32", "--train.max_steps", "2", "--train.precision", "fp32",
        ]
    )  # fmt: skip
    assert proc.returncode == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
