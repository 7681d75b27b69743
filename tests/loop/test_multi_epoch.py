"""``train.multi_epoch`` (``mtl_dist/loop/multi_epoch.py``): when the tables are drawn anew,
and the config keys' checks."""

import pytest

from mtl_dist.config import ConfigError, load_config
from mtl_dist.loop import multi_epoch
from mtl_dist.loop.selection import BestTracker
from mtl_dist.loop.state import LoopState


class _Opt:
    optimizers = [("embedding", "fused"), ("dense", None)]


def test_begin_epoch_draws_once_per_later_epoch(monkeypatch):
    calls = []
    monkeypatch.setattr(multi_epoch, "reinit_tables", lambda m, seed, epoch: calls.append(
        (seed, epoch)) or ["t"])  # fmt: skip
    monkeypatch.setattr(multi_epoch, "reset_optimizer_state", lambda *a: 0)
    monkeypatch.setattr(multi_epoch, "dense_optimizer", lambda o: None)
    cfg = load_config(["--config", "configs/default.toml", "--train.multi_epoch", "meda",
                       "--train.seed", "5"])  # fmt: skip
    state = LoopState(0, 0, "run", BestTracker(cfg.train))
    assert not multi_epoch.begin_epoch(cfg, None, _Opt(), state, 0)  # the first epoch: as built
    assert multi_epoch.begin_epoch(cfg, None, _Opt(), state, 1)
    assert not multi_epoch.begin_epoch(cfg, None, _Opt(), state, 1)  # resumed mid-epoch 2
    assert multi_epoch.begin_epoch(cfg, None, _Opt(), state, 2)
    assert calls == [(5, 1), (5, 2)] and state.reinit_epoch == 2
    cfg.train.multi_epoch = "none"
    assert not multi_epoch.begin_epoch(cfg, None, _Opt(), LoopState(0, 0, "r", state.tracker), 1)


def test_keys_are_checked_with_the_close_match():
    with pytest.raises(
        ConfigError, match=r"expected none \| meda, got 'meta' \(did you mean 'meda'"
    ):
        load_config(["--config", "configs/default.toml", "--train.multi_epoch", "meta"])
    with pytest.raises(ConfigError, match="l2_frequency needs model.embedding.l2 > 0, got 0.0"):
        load_config(["--config", "configs/default.toml", "--model.embedding.l2_frequency", "true"])
