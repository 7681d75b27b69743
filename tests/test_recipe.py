"""The standard recipe knobs: learning-rate schedules (dense and embedding apart), gradient
clipping, best-model selection and early stopping — by hand, and on 2 ranks under torchrun,
where a run interrupted and resumed ends exactly like the uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_dist.config import TrainConfig
from mtl_dist.loop.schedule import lr_factor
from mtl_dist.loop.selection import BestTracker
from tests.conftest import torchrun


def test_schedules_by_hand():
    assert [lr_factor("constant", s, warmup=4) for s in (1, 2, 4, 5, 100)] == [
        0.25, 0.5, 1.0, 1.0, 1.0,
    ]  # fmt: skip
    # cosine from 1 to min 0.1 over steps 10..110 (after 10 warm-up steps)
    cos = lambda s: lr_factor("cosine", s, warmup=10, total=110, min_ratio=0.1)  # noqa: E731
    assert cos(10) == 1.0 and cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    assert cos(500) == pytest.approx(0.1)  # held at the floor past the end
    assert [lr_factor("step", s, gamma=0.5, step_size=10) for s in (1, 9, 10, 25)] == [
        1.0, 1.0, 0.5, 0.25,
    ]  # fmt: skip
    assert lr_factor("exponential", 15, gamma=0.5, step_size=10) == pytest.approx(0.5**1.5)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor("linear", 3)


def test_best_tracker_direction_patience_and_undefined():
    auc = BestTracker(TrainConfig(best_metric="click/auc", early_stop_patience=2))
    assert auc.update(1, {"click": {"auc": 0.70}})
    assert not auc.update(2, {"click": {"auc": 0.69}}) and not auc.stop
    assert not auc.update(3, {"click": {}}) and auc.stop  # undefined: no improvement
    assert (auc.value, auc.step, auc.since) == (0.70, 1, 2)
    again = BestTracker(TrainConfig(best_metric="click/auc", early_stop_patience=2))
    again.load(auc.state())
    assert again.state() == auc.state()
    loss = BestTracker(TrainConfig(best_metric="watch/mse"))
    assert loss.update(1, {"watch": {"mse": 0.5}}) and loss.update(2, {"watch": {"mse": 0.4}})
    assert not loss.update(3, {"watch": {"mse": 0.45}}) and not loss.stop  # no patience: never


def test_config_names_a_bad_best_metric():
    from mtl_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.best_metric: 'click/mse'.*did you mean"):
        load_config(["--config", "configs/default.toml", "--train.best_metric", "click/mse"])
    with pytest.raises(ConfigError, match="early_stop_patience needs train.best_metric"):
        load_config(["--config", "configs/default.toml", "--train.early_stop_patience", "2"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("recipe-data")
    generate(out, train_rows=24_000, val_rows=4_000, files=2, verbose=False)
    return out


RECIPE = [
    "--optim.dense_schedule", "cosine", "--optim.dense_warmup_steps", "5",
    "--optim.embedding_schedule", "step", "--optim.embedding_warmup_steps", "3",
    "--optim.schedule_step_size", "10", "--optim.schedule_gamma", "0.7",
    "--optim.clip_grad_norm", "0.5", "--train.best_metric", "click/auc",
    "--train.val_every", "10", "--checkpoint.every", "10", "--checkpoint.keep", "2",
]  # fmt: skip


def train(data, out, *extra, env=None, ok=True):
    args = [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "32,16", "--train.log_every", "1",
        "--monitor.attribution", "false", "--train.epochs", "2", "--train.max_steps", "60",
        *RECIPE, *extra,
    ]  # fmt: skip
    proc = torchrun(args, nproc=2, timeout=600, env=env)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return (json.loads((out / "metrics.json").read_text()) if ok else None), proc


def test_schedules_clipping_and_best_on_two_ranks_resume_exactly(data, tmp_path):
    """60 steps with both schedules, clipping at 0.5 and a best checkpoint by click AUC; then
    the same run killed while saving step 30 and resumed (from step 20, whose validation the
    resumed run runs again): the same metrics, best and parameters. The rates logged are the
    schedules' by hand, the pre-clip gradient norm the same on both ranks, and
    checkpoints/best exports by name."""
    full, _ = train(data, tmp_path / "full")
    train(data, tmp_path / "cut", env={"MTL_CRASH_AT": "before_commit:30"}, ok=False)
    resumed, proc = train(data, tmp_path / "cut")
    assert "step_00000020 at step 20" in proc.stdout
    assert resumed["metrics"] == full["metrics"] and resumed["best"] == full["best"]
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]]
    from mtl_dist.checkpoint.store import latest_target
    from mtl_dist.serve.export import export_checkpoint, load_exported

    def params(run):
        root = run / "checkpoints"
        export_checkpoint(root / latest_target(root), run / "model.pt")
        return load_exported(run / "model.pt")[1].state_dict()

    a, b = params(tmp_path / "full"), params(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical after the resume
    best = full["best"]
    assert best["metric"] == "click/auc" and best["value"] == max(
        h["metrics"]["click"]["auc"] for h in full["history"]
    )
    root = tmp_path / "full" / "checkpoints"
    assert (root / "best").read_text() == best["checkpoint"] == f"step_{best['step']:08d}"
    assert (root / best["checkpoint"]).is_dir()  # kept, whatever checkpoint.keep prunes
    # export takes `best` by name (the pointer file)
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "mtl_dist.serve.export", str(root / "best"),
                          str(tmp_path / "best.pt")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        acc = EventAccumulator(str(tmp_path / "full" / "tb" / f"rank_{rank}"))
        acc.Reload()
        dense = {e.step: e.value for e in acc.Scalars("train/lr/dense")}
        emb = {e.step: e.value for e in acc.Scalars("train/lr/embedding")}
        # logged at step s: the rate step s ran with (the dense base rate 0.002, the
        # embedding base 0.2, from configs/default.toml)
        for s in (1, 4, 5, 6, 30, 60):
            assert dense[s] == pytest.approx(0.002 * lr_factor("cosine", s, 5, 60), rel=1e-5)
            want = 0.2 * lr_factor("step", s, 3, 60, gamma=0.7, step_size=10)
            assert emb[s] == pytest.approx(want, rel=1e-5)
        norms = [e.value for e in acc.Scalars("train/grad_norm")]
        assert len(norms) == 60 and all(math.isfinite(n) and n > 0 for n in norms)
        if rank == 0:
            first = norms
        else:
            assert norms == first  # the same clip on every rank
    assert max(first) > 0.5  # clipping had work to do
