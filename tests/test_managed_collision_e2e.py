"""Managed collision end to end, 2 ranks under torchrun: user_id (LFU) and item_id (LRU) in
tables a tenth of their id space. A run stopped at a step between two admissions and resumed at
world 2 ends exactly as the uninterrupted run (same remapping, same AUC); resumed at world 1 it
keeps every admitted id's row; export and scoring map ids the way training did (the scored AUC
equals the live one, unknown ids reading the miss row of the rank that trained them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mtl_dist.checkpoint.store import resolve_checkpoint
from mtl_dist.serve.export import export_checkpoint
from mtl_dist.tools.bench.hashing import sized_config
from tests.conftest import ROOT, torchrun

EMPTY = torch.iinfo(torch.int64).max


def _managed_config(path) -> None:
    s = (ROOT / "configs" / "strings.toml").read_text()
    s = sized_config(s, {"user_id": 4000}, collision="managed", eviction_interval=4)
    s = sized_config(s, {"item_id": 2000}, collision="managed", eviction="lru", eviction_interval=4)
    path.write_text(s)


def _tables(model_file):
    """(raw ids kept, their rows) per managed table of an exported model; world size trained at."""
    blob = torch.load(model_file, weights_only=True)
    out = {}
    for k, v in blob["state_dict"].items():
        if k.endswith("_mch_sorted_raw_ids"):
            table = k.split(".")[-2]
            rows = blob["state_dict"][k.replace("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping")]
            kept = v != EMPTY
            out[table] = dict(zip(v[kept].tolist(), rows[kept].tolist()))
    return out, blob["managed_buckets"]


def _export(ckpt, out):
    export_checkpoint(resolve_checkpoint(ckpt), out)  # in this process: one torchrec import
    return _tables(out)


def test_managed_collision_resume_reshard_export_score(tmp_path):
    logs = tmp_path / "logs"
    gen = subprocess.run(
        [sys.executable, "-m", "mtl_dist.data.synth", "--out", str(logs), "--workload", "strings",
         "--train-rows", "16384", "--val-rows", "4000", "--files", "4"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    cfg = tmp_path / "managed.toml"
    _managed_config(cfg)

    def job(out, *more):
        return ["-m", "mtl_dist.train", "--config", str(cfg),
                "--data.train_path", str(logs / "train"), "--data.val_path", str(logs / "val"),
                "--train.output_dir", str(out), "--train.progress_bar", "false",
                "--train.batch_size", "512", "--model.experts.hidden", "32",
                "--model.tower.hidden", "16", *more]  # fmt: skip

    whole, part, one = tmp_path / "whole", tmp_path / "part", tmp_path / "one"
    proc = torchrun(job(whole))  # 16 steps: admissions at 4, 8, 12, 16
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(job(part, "--train.max_steps", "10"))  # stops with 2 steps of ids unadmitted
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(part, one)
    proc = torchrun(job(part))
    assert proc.returncode == 0, proc.stderr[-3000:]

    m_whole = json.loads((whole / "metrics.json").read_text())
    m_part = json.loads((part / "metrics.json").read_text())
    assert m_part["steps"] == m_whole["steps"] == 16
    for task in ("click", "purchase"):
        assert m_part["metrics"][task]["auc"] == m_whole["metrics"][task]["auc"]
    t_whole, w = _export(whole / "checkpoints" / "latest", tmp_path / "whole.pt")
    t_part, _ = _export(part / "checkpoints" / "latest", tmp_path / "part.pt")
    assert w == 2 and t_part == t_whole  # the same ids on the same rows
    assert 1000 < len(t_whole["user_id"]) < 4000 and len(t_whole["item_id"]) > 500
    assert len(set(t_whole["user_id"].values())) == len(t_whole["user_id"])  # no collision

    # world 2 -> world 1: every id admitted by step 10 still reads its row at the next step
    t_10, _ = _export(one / "checkpoints" / "latest", tmp_path / "ten.pt")
    proc = torchrun(job(one, "--train.max_steps", "11"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t_11, w = _export(one / "checkpoints" / "latest", tmp_path / "eleven.pt")
    assert w == 1
    for table, kept in t_10.items():  # no admission at step 11 (interval 4): nothing moved
        assert t_11[table] == kept
    proc = torchrun(job(one, "--train.max_steps", "12"), nproc=2)  # world 1 -> 2: refused
    assert proc.returncode != 0
    assert "saved by 1 rank(s) and holds managed-collision tables (user_id, item_id)" in proc.stderr

    # scoring maps ids as training did: the scored AUC is the live validation AUC
    preds = tmp_path / "preds.parquet"
    subprocess.run([sys.executable, "-m", "mtl_dist.serve.score", "--model", str(tmp_path / "part.pt"),
                    "--data", str(logs / "val"), "--out", str(preds), "--keep", "click,purchase"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    t = pq.read_table(preds)
    for task in ("click", "purchase"):
        auc = roc_auc_score(t[task].to_numpy(), t[f"pred_{task}"].to_numpy())
        assert auc == pytest.approx(m_whole["metrics"][task]["auc"], abs=1e-6), task
