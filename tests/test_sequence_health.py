"""Attention health: entropy and the recent items' share against hand-computed values."""

import math

import torch

from mtl_dist.observe.sequence_health import attention_health


def test_entropy_and_recent_share_by_hand():
    # row 0: all weight on its last item; row 1: even over 4 (mean pooling); row 2: no history
    w = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    lengths = torch.tensor([3, 4, 0])
    out = attention_health({"hist": (w, lengths)}, {"hist": 2})
    assert math.isclose(out["attention/hist/entropy"], (0 + math.log(4)) / 2, rel_tol=1e-6)
    ratio = math.log(4) / (math.log(3) + math.log(4))
    assert math.isclose(out["attention/hist/entropy_ratio"], ratio, rel_tol=1e-6)
    # row 0: its last 2 true positions are 1, 2 → share 1; row 1: positions 2, 3 → 0.5
    assert math.isclose(out["attention/hist/recent_share"], 0.75, rel_tol=1e-6)


def test_signed_din_weights_count_by_magnitude_and_empty_batches_log_nothing():
    w = torch.tensor([[-1.0, 1.0]])
    out = attention_health({"s": (w, torch.tensor([2]))}, {"s": 1})
    assert math.isclose(out["attention/s/entropy"], math.log(2), rel_tol=1e-6)
    assert math.isclose(out["attention/s/recent_share"], 0.5, rel_tol=1e-6)
    assert attention_health({"s": (torch.zeros(2, 3), torch.tensor([0, 0]))}, {"s": 1}) == {}
