"""mtl-prepare census: a fixture in the raw UCI format (leading spaces, ``?``, a quoted value, a
test-only category, a label without its final dot, a ``|`` comment line in the test file),
prepared and checked against values computed here by hand; malformed lines name file, line and
field; the generated config trains 2 ranks under torchrun."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from mtl_dist.data.public import PrepareError
from mtl_dist.data.public.__main__ import run
from mtl_dist.data.public.census import CATEGORICAL, COLLEGE, NAMES, NUMERIC
from tests.conftest import ROOT, torchrun

EDUCATION = ["Children", "High school graduate", *COLLEGE[:4]]
MARITAL = ["Never married", "Married-civilian spouse present", "Divorced"]


def raw_row(rng: random.Random, i: int, test: bool) -> list[str]:
    """One record's 42 values as stored (before the leading space)."""
    row = {n: f"c{rng.randrange(4)}" for n in CATEGORICAL}
    row["education"] = rng.choice(EDUCATION)
    row["marital_stat"] = rng.choice(MARITAL)
    row["mig_chg_msa"] = "?" if i % 3 == 0 else "Nonmover"
    if test and i % 10 == 0:
        row["class_worker"] = "only-in-test"  # unseen in training: the reserved id 0
    for n in NUMERIC:
        row[n] = str(rng.randrange(0, 100))
    row["wage_per_hour"] = f"{rng.randrange(100)}.5"
    row["instance_weight"] = f"{1000 + i}.25"
    label = "50000+." if rng.random() < 0.3 else "- 50000."
    row["income"] = label.rstrip(".") if test and i % 7 == 0 else label
    return [row[n] for n in NAMES]


def write_raw(path, rows, comment=False, quote_line=None):
    lines = ["|1x3 Cross validator"] if comment else []
    for k, row in enumerate(rows):
        values = [row[0]] + [" " + v for v in row[1:]]
        if k == quote_line:
            values[1] = f'" {row[1]}"'  # a quoted value: read as the unquoted one
        lines.append(",".join(values))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("census_raw")
    train = [raw_row(rng, i, False) for i in range(300)]
    test = [raw_row(rng, i, True) for i in range(101)]
    write_raw(d / "census-income.data", train, quote_line=5)
    write_raw(d / "census-income.test", test, comment=True)
    return d, train, test


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    d, _, _ = raw
    out = tmp_path_factory.mktemp("census_out")
    info = run("census", d, out)
    return out, info


def expected(rows, vocab):
    """The prepared rows computed by hand from the raw values."""
    col = {n: i for i, n in enumerate(NAMES)}
    out = []
    for r in rows:
        e = {n: vocab[n].get(r[col[n]], 0) for n in CATEGORICAL}
        e.update({n: float(r[col[n]]) for n in NUMERIC})
        e["instance_weight"] = float(r[col["instance_weight"]])
        e["income_50k"] = int(r[col["income"]].startswith("50000+"))
        e["never_married"] = int(r[col["marital_stat"]] == "Never married")
        e["college"] = int(r[col["education"]] in COLLEGE)
        out.append(e)
    return out


def test_rows_and_columns_match_the_raw_values(raw, prepared):
    _, train, test = raw
    out, info = prepared
    col = {n: i for i, n in enumerate(NAMES)}
    vocab = {
        n: {v: i + 1 for i, v in enumerate(sorted({r[col[n]] for r in train}))} for n in CATEGORICAL
    }
    assert info["vocab_sizes"] == {n: len(v) + 1 for n, v in vocab.items()}
    assert vocab["mig_chg_msa"]["?"] >= 1  # '?' is a category of its own
    # the comment line is line 1, so test row k is on line k + 2: odd lines (k odd) → val
    splits = {"train": train, "val": test[1::2], "test": test[0::2]}
    for split, rows in splits.items():
        got = ds.dataset(out / split).to_table().to_pylist()
        assert len(got) == len(rows) == info["splits"][split]["rows"], split
        want = expected(rows, vocab)
        assert got == want, split
        rate = sum(r["income_50k"] for r in want) / len(want)
        assert info["splits"][split]["positive_rate"]["income_50k"] == pytest.approx(rate)
    held_out = ds.dataset(out / "test").to_table()  # (test rows 0, 10, ...: the even lines)
    assert 0 in held_out["class_worker"].to_pylist()  # only-in-test → the reserved id
    assert set(info["sources"]) == {"census-income.data", "census-income.test"}
    assert len(info["sources"]["census-income.data"]) == 64
    assert json.loads((out / "dataset.json").read_text())["splits"] == info["splits"]


@pytest.mark.parametrize(
    "edit,line,field",
    [
        (lambda v: v[:-1], 4, "income"),  # 41 columns: the label missing
        (lambda v: ["abc", *v[1:]], 4, "age"),
        (lambda v: [*v[:-1], " 40000."], 4, "income"),
    ],
    ids=["column_count", "non_numeric", "bad_label"],
)
def test_malformed_line_names_file_line_and_field(raw, tmp_path, edit, line, field):
    d, _, _ = raw
    lines = (d / "census-income.data").read_text().splitlines()
    lines[line - 1] = ",".join(edit(lines[line - 1].split(",")))
    bad = tmp_path / "raw"
    bad.mkdir()
    (bad / "census-income.data").write_text("\n".join(lines) + "\n")
    (bad / "census-income.test").write_text((d / "census-income.test").read_text())
    with pytest.raises(PrepareError) as e:
        run("census", bad, tmp_path / "out")
    msg = str(e.value)
    assert f"census-income.data:{line}: field {field}:" in msg, msg
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_dist.data.public", "census", str(bad), str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and f":{line}: field {field}" in proc.stderr, proc.stderr


def test_small_blocks_give_the_same_rows_and_lines(raw, prepared, tmp_path, monkeypatch):
    """Read in 4 KiB blocks (many batches per file): the same rows, and a bad value deep in
    the file still names its line."""
    from mtl_dist.data.public import common

    monkeypatch.setattr(common, "BLOCK_BYTES", 4096)
    out, info = prepared
    small = run("census", raw[0], tmp_path / "small")
    assert small["splits"] == info["splits"]
    for split in ("train", "val", "test"):
        a = ds.dataset(out / split).to_table()
        assert a.equals(ds.dataset(tmp_path / "small" / split).to_table()), split
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (raw[0] / "census-income.data").read_text().splitlines()
    lines[250] = ",".join(["x7", *lines[250].split(",")[1:]])
    (bad / "census-income.data").write_text("\n".join(lines) + "\n")
    (bad / "census-income.test").write_text((raw[0] / "census-income.test").read_text())
    with pytest.raises(PrepareError, match=r"census-income.data:251: field age: not a number"):
        run("census", bad, tmp_path / "o")


def test_committed_config_loads():
    from mtl_dist.config import load_config

    for name in ("census", "census_education", "census_income_education"):
        cfg = load_config(["--config", str(ROOT / "configs" / f"{name}.toml")])
        assert len(cfg.tasks) == 2 and cfg.model.head == "mmoe"


def test_generated_config_trains_two_ranks(prepared, tmp_path):
    out, _ = prepared
    proc = torchrun(
        [
            "-m", "mtl_dist.train", "--config", str(out / "census.toml"),
            "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false",
            "--train.batch_size", "32", "--train.max_steps", "3", "--train.precision", "fp32",
        ]
    )  # fmt: skip
    assert proc.returncode == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["metrics"]) <= {"income_50k", "never_married"}
