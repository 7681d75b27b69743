"""Feature admission through torchrun with 2 ranks: a run killed mid-epoch resumes to the
uninterrupted run's metrics and parameters, and the exported model carries the training
split's id counts."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, torchrun


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("admission-data")
    generate(out, train_rows=24_000, val_rows=4_000, files=2, verbose=False)
    return out


def _config(path):
    s = (ROOT / "configs" / "default.toml").read_text()
    for name, vocab in (("user_id", 200000), ("author_id", 50000)):
        head = f'name = "{name}"\nvocab_size = {vocab}\n'
        assert head in s
        s = s.replace(head, head + "admit_min_count = 3\n")
    path.write_text(s)
    return path


def train(data, cfg, out, env=None, ok=True, extra=()):
    args = [
        "-m", "mtl_dist.train", "--config", str(cfg),
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "32,16",
        "--monitor.attribution", "false", "--checkpoint.every", "20", *extra,
    ]  # fmt: skip
    proc = torchrun(args, nproc=2, timeout=600, env=env)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return (json.loads((out / "metrics.json").read_text()) if ok else None), proc


def exported(run):
    """The run's latest checkpoint exported and loaded back (the model with its id counts)."""
    from mtl_dist.checkpoint.store import latest_target
    from mtl_dist.serve.export import export_checkpoint, load_exported

    root = run / "checkpoints"
    export_checkpoint(root / latest_target(root), run / "model.pt")
    return load_exported(run / "model.pt")[1]


def test_admission_resumes_exactly_and_exports_its_counts(data, tmp_path):
    from mtl_dist.config import load_config
    from mtl_dist.data.admission import count_training_ids

    cfg = _config(tmp_path / "admit.toml")
    full, _ = train(data, cfg, tmp_path / "full")
    cut = tmp_path / "cut"
    train(data, cfg, cut, env={"MTL_CRASH_AT": "before_commit:40"}, ok=False)
    resumed, proc = train(data, cfg, cut)
    assert "step_00000020 at step 20" in proc.stdout
    assert resumed["metrics"] == full["metrics"]

    a, b = exported(tmp_path / "full"), exported(cut)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical after the resume
    job = load_config(["--config", str(cfg), "--data.train_path", str(data / "train")])
    counts = count_training_ids(job)
    assert a.model.id_counts.names == ["user_id", "author_id"]
    for i, name in enumerate(a.model.id_counts.names):
        assert np.array_equal(getattr(a.model.id_counts, f"counts_{i}").numpy(), counts[name])
        assert counts[name].sum() == 24_000  # single-hot: one id per row
    user = counts["user_id"]
    assert (user[user > 0] < 3).sum() > 0  # some seen ids are rare: they share the row
    assert sb["model.ebc.embedding_bags.user_id.weight"].shape[0] == 200_001  # + the OOV row


def test_l2_frequency_resumes_exactly_and_carries_its_counts(data, tmp_path):
    """``model.embedding.l2_frequency`` on 2 ranks (through the sparse-dist pipeline): a run
    killed mid-epoch resumes to the uninterrupted run's metrics and parameters; the exported
    model holds every feature's counts and its mean count; the run differs from plain L2."""

    cfg = ROOT / "configs" / "default.toml"
    extra = ["--model.embedding.l2", "1e-3", "--model.embedding.l2_frequency", "true"]
    full, _ = train(data, cfg, tmp_path / "full", extra=extra)
    cut = tmp_path / "cut"
    train(data, cfg, cut, env={"MTL_CRASH_AT": "before_commit:40"}, ok=False, extra=extra)
    resumed, proc = train(data, cfg, cut, extra=extra)
    assert "step_00000020 at step 20" in proc.stdout
    assert resumed["metrics"] == full["metrics"]
    plain, _ = train(data, cfg, tmp_path / "plain", extra=extra[:2])
    assert plain["metrics"] != full["metrics"]

    a, b = exported(tmp_path / "full"), exported(cut)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = a.model.id_counts
    assert len(ids.names) == 21 and int(ids.counts_0.sum()) == 24_000  # user_id: one a row
    seen = int((ids.counts_0 > 0).sum())
    assert ids.scale_0.item() == pytest.approx(24_000 / seen)
