"""Files written by mtl-dist before the packages-by-stage move (commit 3208fca) still load and
give the numbers they gave then: a training checkpoint (DCP, 2 ranks), an exported model
(``.pt``) and a serving package (``.pt2``), kept in tests/fixtures/compat/ with the scores and
the program outputs that version computed on 64 rows (config: tests/fixtures/compat/config.toml).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.serve.export import load_exported
from mtl_dist.serve.program import inputs_from_batch, load_package

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "compat"


def scores_of(model: Path, out: Path, module: str = "mtl_dist.serve.score") -> dict[str, list]:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--model", str(model),
         "--data", str(FIXTURE / "rows.parquet"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pq.read_table(out).to_pydict()


def assert_same_scores(got: dict[str, list], want: dict[str, list]) -> None:
    assert got.keys() == want.keys()
    for column in want:
        torch.testing.assert_close(
            torch.tensor(got[column]), torch.tensor(want[column]), rtol=1e-6, atol=1e-7
        )


def test_an_old_exported_model_scores_as_it_did(tmp_path):
    """Through the old command path too (an alias of mtl_dist.serve.score)."""
    want = pq.read_table(FIXTURE / "scores.parquet").to_pydict()
    assert_same_scores(scores_of(FIXTURE / "model.pt", tmp_path / "a.parquet"), want)
    assert_same_scores(
        scores_of(FIXTURE / "model.pt", tmp_path / "b.parquet", "mtl_dist.score"), want
    )


def test_an_old_checkpoint_exports_to_the_same_model(tmp_path):
    """The 2-rank checkpoint verifies, loads into today's model and exports to a model that
    scores the rows as the old export did."""
    out = tmp_path / "model.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_dist.serve.export", str(FIXTURE / "step_00000008"), str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = pq.read_table(FIXTURE / "scores.parquet").to_pydict()
    assert_same_scores(scores_of(out, tmp_path / "scores.parquet"), want)


def test_an_old_serving_package_runs_as_it_did():
    cfg, _ = load_exported(FIXTURE / "model.pt")
    conv = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, [],
                               hash_seed=cfg.data.hash_seed)  # fmt: skip
    batch = conv(pq.read_table(FIXTURE / "rows.parquet"))
    program = load_package(FIXTURE / "model.pt2")
    want = torch.load(FIXTURE / "program_out.pt")
    torch.testing.assert_close(program(*inputs_from_batch(batch)), want, rtol=1e-6, atol=1e-7)
