"""``IdCounts`` (``mtl_dist/models/admission.py``): admission masks and the inverse-frequency
weights of ``model.embedding.l2_frequency``, and the ranker's weighted L2 term."""

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl_dist.config import SparseFeature, load_config
from mtl_dist.models.admission import IdCounts


def _counts():
    feats = [SparseFeature("a", vocab_size=4, admit_min_count=2),
             SparseFeature("b", vocab_size=3, multi_hot=True)]  # fmt: skip
    ids = IdCounts(feats)
    ids.set({"a": np.array([4, 1, 0, 3]), "b": np.array([2, 2, 2])})
    return ids


def test_masks_only_for_admitted_features_and_scale_is_the_mean_count():
    ids = _counts()
    assert list(ids.masks()) == ["a"] and ids.masks()["a"].tolist() == [True, False, False, True]
    assert ids.scale_0.item() == pytest.approx(8 / 3) and ids.scale_1.item() == 2.0


def test_frequency_weights_by_hand():
    ids = _counts()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"],
        values=torch.tensor([0, 1, 4, 3, 0, 1, 2, 7, 7]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 0, 1, 1, 1, 1, 1, 1]),  # a: 4 rows, b, c
    )
    w = ids.frequency_weights(kjt, ["a", "b", "c"])
    s = 8 / 3
    expected_a = [s / 4, s / 1, 1.0, s / 3]  # id 4: the OOV row (weight 1)
    expected_b = [(1 + 1) / 2, 0.0, 1.0, 1.0]  # scale 2 / count 2 = 1; an empty bag: 0
    torch.testing.assert_close(w[:, 0], torch.tensor(expected_a))
    torch.testing.assert_close(w[:, 1], torch.tensor(expected_b))
    torch.testing.assert_close(w[:, 2], torch.ones(4))  # not counted: weight 1
    # over the training lookups the weights average 1: sum_id count * scale / count / lookups
    c = ids.counts_0.float()
    assert ((c * (ids.scale_0 / c.clamp_min(1))).sum() / c.sum()).item() == pytest.approx(1.0)


def test_ranker_l2_frequency_term_by_hand():
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.loop.losses import build_model_with_loss
    from mtl_dist.models.build import build_ranker
    from tests.models.test_ranker import random_table

    cfg = load_config(["--config", "configs/default.toml", "--model.experts.hidden", "16,8",
                       "--model.embedding.l2", "0.1", "--model.embedding.l2_frequency", "true"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model_with_loss(build_ranker(cfg, "cpu"), cfg).model
    counts = {f.name: np.arange(f.id_rows) % 7 for f in cfg.features.sparse}
    model.id_counts.set(counts)
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 16)
    )
    model.train()
    out = model(batch)
    pooled = torch.cat([model.ebc(batch.sparse)[f] for f in model.feature_order], 1)
    want = 0.0
    for j, f in enumerate(model.feature_order):
        jt = batch.sparse[f]
        scale = counts[f].sum() / (counts[f] > 0).sum()
        c = torch.from_numpy(counts[f]).float().clamp_min(1)[jt.values()]
        per_id = scale / c
        bag = torch.repeat_interleave(torch.arange(16), jt.lengths())
        w = torch.zeros(16).index_add(0, bag, per_id) / jt.lengths().clamp_min(1)
        block = pooled[:, sum(model.feature_widths[:j]) : sum(model.feature_widths[: j + 1])]
        want = want + w * block.square().sum(1)
    torch.testing.assert_close(out.penalty, 0.05 * want.mean(), rtol=1e-5, atol=1e-7)
