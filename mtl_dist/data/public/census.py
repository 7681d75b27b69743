"""Census-Income (KDD), UCI: ``census-income.data`` / ``census-income.test`` → Parquet.

Raw format (UCI ``census-income.names``): comma-separated, no header, 42 fields per line, values
after the first with a leading space, ``?`` where unknown (kept as a category of its own), field
25 the instance weight, field 42 the label `` - 50000.`` / `` 50000+.`` (read with or without
the final dot). A first line beginning ``|`` (a comment, as in the UCI Adult test file) is
skipped if present.

Output: ``train/`` (the .data file), ``val/`` (the .test file's odd lines 1, 3, 5, ...) and
``test/`` (its even lines): the MMoE paper halves the test set into validation and test, and
the odd / even rule makes the halves reproducible. Columns: the 33 categorical fields as int64
ids (a vocabulary per field built on the training file, values sorted, ids from 1; 0 for a
value never seen in training), the 7 numeric ones as float32, ``instance_weight`` (float32,
usable as ``sample_weight``) and three labels (int8): ``income_50k`` (label ``50000+``),
``never_married`` (marital status ``Never married``), ``college`` (education at least
college: :data:`COLLEGE`). The MMoE paper's task groups (Ma et al., KDD 2018, Section 6.3):
income + never married, and education + never married.

Errors: :class:`~mtl_dist.data.public.common.PrepareError` naming file, line and field for a
wrong column count, a non-numeric numeric field or an unknown label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl_dist.data.public.common import (
    PrepareError,
    SplitWriter,
    Vocab,
    binary_tasks,
    csv_batches,
    job_config,
    numbers,
    require,
    sha256,
    vocab_then_split,
)

# The 42 fields of census-income.names, in file order: (column, the names file's description).
FIELDS = [
    ("age", "age"),
    ("class_worker", "class of worker"),
    ("det_ind_code", "detailed industry recode"),
    ("det_occ_code", "detailed occupation recode"),
    ("education", "education"),
    ("wage_per_hour", "wage per hour"),
    ("hs_college", "enroll in edu inst last wk"),
    ("marital_stat", "marital stat"),
    ("major_ind_code", "major industry code"),
    ("major_occ_code", "major occupation code"),
    ("race", "race"),
    ("hisp_origin", "hispanic origin"),
    ("sex", "sex"),
    ("union_member", "member of a labor union"),
    ("unemp_reason", "reason for unemployment"),
    ("full_or_part_emp", "full or part time employment stat"),
    ("capital_gains", "capital gains"),
    ("capital_losses", "capital losses"),
    ("stock_dividends", "dividends from stocks"),
    ("tax_filer_stat", "tax filer stat"),
    ("region_prev_res", "region of previous residence"),
    ("state_prev_res", "state of previous residence"),
    ("det_hh_fam_stat", "detailed household and family stat"),
    ("det_hh_summ", "detailed household summary in household"),
    ("instance_weight", "instance weight (not to be used as a feature)"),
    ("mig_chg_msa", "migration code-change in msa"),
    ("mig_chg_reg", "migration code-change in reg"),
    ("mig_move_reg", "migration code-move within reg"),
    ("mig_same", "live in this house 1 year ago"),
    ("mig_prev_sunbelt", "migration prev res in sunbelt"),
    ("num_emp", "num persons worked for employer"),
    ("fam_under_18", "family members under 18"),
    ("country_father", "country of birth father"),
    ("country_mother", "country of birth mother"),
    ("country_self", "country of birth self"),
    ("citizenship", "citizenship"),
    ("own_or_self", "own business or self employed"),
    ("vet_question", "fill inc questionnaire for veteran's admin"),
    ("vet_benefits", "veterans benefits"),
    ("weeks_worked", "weeks worked in year"),
    ("year", "year"),
    ("income", "income label: - 50000. / 50000+."),
]
NAMES = [n for n, _ in FIELDS]
# continuous in census-income.names; the coded fields (industry, occupation, year, ...) are nominal
NUMERIC = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "num_emp",
    "weeks_worked",
]
CATEGORICAL = [n for n in NAMES if n not in (*NUMERIC, "instance_weight", "income")]
LABELS = ["income_50k", "never_married", "college"]
# "at least college" (the paper does not list the values): some college and every degree above
COLLEGE = [
    "Some college but no degree",
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
]
RAW_FILES = {"train": "census-income.data", "test": "census-income.test"}
SCHEMA = pa.schema(
    [pa.field(n, pa.int64()) for n in CATEGORICAL]
    + [pa.field(n, pa.float32()) for n in (*NUMERIC, "instance_weight")]
    + [pa.field(n, pa.int8()) for n in LABELS]
)


def _batches(path: Path):
    """(first line, batch of whitespace-trimmed string columns) of one raw file."""
    with open(path, "rb") as fh:
        comment = fh.read(1) == b"|"
    for line, batch in csv_batches(path, NAMES, header=comment):
        cols = {n: pc.utf8_trim_whitespace(batch[n]) for n in NAMES}
        yield line, cols


def _labels(cols: dict[str, pa.Array], path: Path, line: int) -> dict[str, pa.Array]:
    income = pc.utf8_rtrim(cols["income"], characters=".")
    rich, poor = pc.equal(income, "50000+"), pc.equal(income, "- 50000")
    bad = np.flatnonzero(~np.asarray(pc.or_(rich, poor)))
    if len(bad):
        value = cols["income"][int(bad[0])].as_py()
        raise PrepareError(path, line + int(bad[0]), "income", f"not a census label: {value!r}")
    college = pc.is_in(cols["education"], value_set=pa.array(COLLEGE))
    return {
        "income_50k": rich.cast(pa.int8()),
        "never_married": pc.equal(cols["marital_stat"], "Never married").cast(pa.int8()),
        "college": college.cast(pa.int8()),
    }


def _table(cols: dict[str, pa.Array], vocab: Vocab, path: Path, line: int) -> pa.Table:
    out: dict[str, pa.Array] = {n: vocab.encode(n, cols[n]) for n in CATEGORICAL}
    for n in (*NUMERIC, "instance_weight"):
        out[n] = numbers(cols[n], pa.float32(), path, line, n)
    out.update(_labels(cols, path, line))
    return pa.table(out)


def prepare(raw: Path, out: Path) -> dict[str, Any]:
    """Write the Census-Income splits under ``out``; returns ``dataset.json``'s content.

    Two passes over the training file (vocabulary, then rows) and one over the test file.

    Raises:
        FileNotFoundError: a raw file missing from ``raw``.
        PrepareError: a malformed line (file, line and field named).
    """
    train, test = (require(raw / RAW_FILES[s]) for s in ("train", "test"))
    writers = {s: SplitWriter(out, s, SCHEMA, LABELS) for s in ("train", "val", "test")}
    vocab = vocab_then_split(train, test, _batches, CATEGORICAL, _table, writers)
    return {
        "dataset": "census",
        "splits": {s: w.close() for s, w in writers.items()},
        "split_rule": "train: census-income.data; val / test: census-income.test's odd / even lines",
        "sources": {f.name: sha256(f) for f in (train, test)},
        "vocab_sizes": vocab.sizes(),
        "columns": {"sparse": CATEGORICAL, "dense": NUMERIC, "labels": LABELS},
    }


# upper bounds on the vocabulary sizes (census-income.names lists at most 52 values per field)
# for configs/census.toml; mtl-prepare writes OUT_DIR/config.toml with the exact sizes
SIZE_BOUND = 64

GROUPS = {
    "income": ("income_50k", "never_married"),  # the MMoE paper's group 1
    "education": ("college", "never_married"),  # its group 2
    "income_education": ("income_50k", "college"),  # the pair issue 31 names "group 2"
}
CONFIG_NAMES = {"income": "census", "education": "census_education"}
GROUP_NOTES = {
    "income": "the MMoE paper's task group 1",
    "education": "the MMoE paper's task group 2",
    "income_education": "issue 31's pairing (not one of the MMoE paper's groups)",
}


def config(sizes: dict[str, int], data_dir: str, group: str = "income") -> str:
    """The training config of task group ``group`` (TOML text) over the splits in ``data_dir``;
    the features a group's labels are computed from are left out."""
    tasks = GROUPS[group]
    drop = {"marital_stat"} if "never_married" in tasks else set()
    drop |= {"education"} if "college" in tasks else set()
    sparse = "".join(
        f'[[features.sparse]]\nname = "{n}"\nvocab_size = {sizes[n]}\n'
        for n in CATEGORICAL
        if n not in drop
    )
    dense = ", ".join(f'"{n}"' for n in NUMERIC)
    header = f"""# Census-Income (KDD), {GROUP_NOTES[group]}: {" + ".join(tasks)}.
# Prepared by `mtl-prepare census RAW_DIR {data_dir}` (docs/public-datasets.md).
# Model: MMoE at the size of drawbridge/keras-mmoe's census demo (after Ma et al., KDD 2018,
# Section 6.3): 8 experts of 4 units, towers of 8.
"""
    model = """[model]
head = "mmoe"

[model.experts]
num = 8
hidden = [4]

[model.tower]
hidden = [8]
"""
    features = f"[features]\ndense = [{dense}]\n\n{sparse}"
    return job_config(
        header, data_dir, model, 1024, 10, f"runs/census_{group}", features, binary_tasks(tasks)
    )


def configs(info: dict[str, Any], data_dir: str) -> dict[str, str]:
    """The config files of a prepared copy, one per task group of :data:`GROUPS` (exact
    vocabulary sizes): ``census.toml``, ``census_education.toml``,
    ``census_income_education.toml``."""
    sizes = info["vocab_sizes"]
    return {
        f"{CONFIG_NAMES.get(g, 'census_' + g)}.toml": config(sizes, data_dir, g) for g in GROUPS
    }
