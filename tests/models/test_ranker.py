"""The ranker on one CPU process: shapes, loss masking, and gradients reaching the tables."""

import pyarrow as pa
import torch

from mtl_dist.config import load_config
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.loop.losses import ModelWithLoss, task_losses
from mtl_dist.loop.step import TrainStep
from mtl_dist.models.build import build_ranker
from mtl_dist.models.outputs import Probes


def small_cfg():
    return load_config(
        [
            "--config",
            "configs/default.toml",
            "--model.experts.hidden",
            "16,8",
            "--model.tower.hidden",
            "4",
        ]
    )


def random_table(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = {}
    for f in cfg.features.sparse:
        ids = torch.randint(0, min(f.vocab_size, 5), (n,), generator=g).tolist()
        cols[f.name] = pa.array([[i, i] for i in ids]) if f.multi_hot else pa.array(ids, pa.int64())
    for d in cfg.features.dense:
        cols[d] = pa.array(torch.randn(n, generator=g).tolist(), pa.float32())
    click = torch.randint(0, 2, (n,), generator=g).tolist()
    cols["click"] = pa.array(click, pa.int8())
    cols["conversion"] = pa.array([1 if c else None for c in click], pa.int8())
    cols["watch_time"] = pa.array((torch.rand(n, generator=g) * 100).tolist(), pa.float32())
    for t in cfg.tasks:
        cols[t.truth] = pa.array([0.5] * n, pa.float32())
    return pa.table(cols)


def test_forward_shapes_and_gradients_reach_embedding_tables():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = ModelWithLoss(build_ranker(cfg, device="cpu"), cfg.tasks)
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 32)
    )
    assert model(batch)[1].gates is None  # not asked for
    model.model.probes = Probes(gates=True, dead_units=True)
    loss, out = TrainStep(model).loss(model(batch))
    assert out.preds.shape == (32, 3) and out.aux.numel() == 0 and out.weights.shape == (3,)
    assert out.gates["click"].shape == (32, 4) and out.dead["experts"].shape == (4,)
    torch.testing.assert_close(out.gates["click"].sum(-1), torch.ones(32))
    assert out.shared is None  # no representation balancer
    assert torch.isfinite(loss)
    loss.backward()
    ebc = model.model.ebc
    user = ebc.embedding_bags["user_id"].weight.grad
    assert user is not None
    touched = user.abs().sum(1) > 0
    # only rows 0..4 were looked up: exactly those get gradient
    assert touched[:5].any() and not touched[5:].any()
    shared = ebc.embedding_bags["item_id"].weight.grad  # item_id and hist_item_ids share this table
    assert shared.abs().sum() > 0


def test_missing_labels_are_masked_and_empty_task_gives_zero_not_nan():
    outputs = torch.tensor([[0.3, 5.0], [-0.2, -7.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # task 1 has no label in this batch
    losses = task_losses(outputs, labels, mask, torch.tensor([True, True]))
    assert losses[1].item() == 0.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], labels[:, 0])
    torch.testing.assert_close(losses[0], expected)
    reg = task_losses(outputs, labels, torch.ones(2, 2), torch.tensor([True, False]))
    torch.testing.assert_close(reg[1], (outputs[:, 1] - labels[:, 1]).square().mean())


def test_stem_task_loss_trains_only_its_own_and_the_shared_tables():
    cfg = load_config(
        ["--config", "configs/default.toml", "--model.head", "stem", "--model.stem.features", "user_id,item_id",
         "--model.stem.dim", "4", "--model.experts.hidden", "16,8", "--model.tower.hidden", "4"]
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_ranker(cfg, device="cpu")
    assert list(model.task_ebcs) == ["click", "conversion", "watch_time"]
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 32)
    )
    out = model(batch).logits
    assert out.shape == (32, 3)
    out[:, 0].sum().backward()  # the click task alone

    def grad(ebc, table):
        g = ebc.embedding_bags[table].weight.grad
        return 0.0 if g is None else g.abs().sum().item()

    assert grad(model.task_ebcs["click"], "user_id__click") > 0  # its own table
    assert grad(model.task_ebcs["conversion"], "user_id__conversion") == 0  # others': stopped
    assert grad(model.task_ebcs["watch_time"], "item_id__watch_time") == 0
    assert grad(model.ebc, "user_id") > 0  # the shared table
    model.zero_grad()
    model(batch)[0][:, 2].sum().backward()  # watch time reaches the shared tables too
    assert grad(model.ebc, "user_id") > 0 and grad(model.task_ebcs["click"], "user_id__click") == 0
