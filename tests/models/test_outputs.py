"""What a forward computes comes back in its output (issue 27): the extras :class:`Probes` asks
for are in the :class:`HeadOutput` / :class:`RankerOutput` / ``StepOutput``, and a forward
leaves no tensor behind on the modules."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import LossConfig
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.loop.losses import ModelWithLoss
from mtl_dist.models.build import build_ranker
from mtl_dist.models.heads import MoE, SharedBottom
from mtl_dist.models.outputs import NO_PROBES, HeadOutput, Probes, RankerOutput
from mtl_dist.models.ple import PLE, STEM, MixedExperts
from tests.models.test_ranker import random_table, small_cfg

ALL = Probes(gates=True, dead_units=True, shared=True, head_input=True)
HEADS = {
    "mmoe": lambda: MoE(8, ["a", "b"], 3, [8, 6], [4]),
    "shared_bottom": lambda: SharedBottom(8, 2, [8, 6], [4]),
    "ple": lambda: PLE(8, ["a", "b"], 2, MixedExperts(1, 1, [8], [4])),
}


def _tensors(module: torch.nn.Module) -> dict[str, int]:
    """Every plain tensor attribute (not a parameter or buffer) of ``module`` and its children."""
    return {
        f"{name}.{k}": id(v)
        for name, m in module.named_modules()
        for k, v in vars(m).items()
        if isinstance(v, torch.Tensor)
    }


@pytest.mark.parametrize("name", list(HEADS))
def test_a_head_returns_its_extras_and_keeps_none(name):
    torch.manual_seed(0)
    head = HEADS[name]().train()
    x = torch.randn(16, 8)
    before = _tensors(head)
    out = head(x, ALL)
    assert isinstance(out, HeadOutput) and out.logits.shape == (16, 2)
    assert _tensors(head) == before  # nothing of the forward stays on the head
    assert out.shared is not None and out.shared.requires_grad
    assert out.dead is not None and all(d.dim() == 1 for d in out.dead.values())
    assert bool(out.dead) == bool(head.gate_experts)  # the bottom has no expert set
    if head.gate_experts:
        assert set(out.gates) == set(head.gate_experts)
        for w in out.gates.values():
            torch.testing.assert_close(w.sum(-1), torch.ones(16))
    plain = head(x)
    assert (plain.gates, plain.dead, plain.shared) == (None, None, None)  # not asked for
    torch.testing.assert_close(plain.logits, out.logits)  # probing changes no number
    head.eval()
    evaluated = head(x, ALL)
    assert evaluated.dead is None and evaluated.shared is None  # training forwards only


def test_stem_returns_the_experts_output_as_its_shared_representation():
    torch.manual_seed(0)
    head = STEM(6, 2, ["a", "b"], MixedExperts(1, 2, [4], [3])).train()
    out = head(torch.randn(5, 6), torch.randn(2, 5, 2), Probes(shared=True, gates=True))
    assert out.shared.shape == (1 + 2 * 2, 5, 4) and set(out.gates) == {"a", "b"}


def test_the_ranker_returns_the_probed_extras_and_the_step_output_carries_them():
    cfg = small_cfg()
    torch.manual_seed(0)
    ranker = build_ranker(cfg, device="cpu").train()
    batch = ArrowBatchConverter(cfg.features.sparse, cfg.features.dense, cfg.tasks)(
        random_table(cfg, 32)
    )
    assert ranker.probes == NO_PROBES
    plain = ranker(batch)
    assert isinstance(plain, RankerOutput) and plain.gates is None and plain.head_input is None
    ranker.probes = ALL
    out = ranker(batch)
    torch.testing.assert_close(out.logits, plain.logits)
    names, widths = ranker.input_blocks()
    assert out.head_input.shape == (32, sum(widths)) and len(names) == len(widths)
    # the head input is what the head ran on: the head alone on it gives the same logits
    torch.testing.assert_close(ranker.head(ranker.interaction(out.head_input)).logits, out.logits)
    for w in out.gates.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(32))

    # a representation balancer: ModelWithLoss asks for the shared representation, which the
    # step's output carries with its graph (the task losses differentiate on it)
    ranker.probes = NO_PROBES
    model = ModelWithLoss(ranker, cfg.tasks, loss=LossConfig(balancer="mgda"))
    assert ranker.probes == Probes(shared=True)
    tl, step_out = model(batch)
    assert step_out.gates is None and step_out.shared is not None
    (g,) = torch.autograd.grad(tl.losses[0], step_out.shared, retain_graph=True)
    assert g.abs().sum() > 0
    loss, w = model.balancer(tl.losses)
    assert torch.isfinite(loss) and w.shape == (3,)
