"""Heads against straightforward per-expert / per-gate references on the same weights."""

import math

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from mtl_dist.loop.losses import ctcvr_weights, esmm_ctcvr_loss
from mtl_dist.models.gates import GateConfig, Gates, expert_dropout
from mtl_dist.models.heads import PLE, MoE, SharedBottom
from mtl_dist.models.outputs import Probes
from mtl_dist.models.ple import MixedExperts
from tests.models.test_experts import loop_mlp

TASKS = ["a", "b", "c"]


def gate_logits(gates: Gates, x_per_gate: list[torch.Tensor]) -> torch.Tensor:
    """Reference gate logits, one gate at a time: ``[B, G, E]``."""
    return loop_mlp(gates.logits, x_per_gate).transpose(0, 1)


def towers(head, mixed_per_task: list[torch.Tensor]) -> torch.Tensor:
    return loop_mlp(head.towers.mlp, mixed_per_task)[:, :, 0].t()


def loop_moe(head: MoE, x: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Reference MMoE/OMoE: loop over experts, then over tasks (gate, mix, tower)."""
    E = head.experts.groups
    experts = loop_mlp(head.experts, [x] * E)
    G = head.gates.num_gates
    logits = gate_logits(head.gates, [x] * G) / head.gates.cfg.temperature
    mixed = []
    for t in range(len(head.task_names)):
        lg = logits[:, 0 if head.shared_gate else t]
        if top_k:
            kth = lg.topk(top_k, -1).values[:, -1:]
            lg = lg.masked_fill(lg < kth, float("-inf"))
        gate = torch.softmax(lg, -1)
        mixed.append(sum(gate[:, e : e + 1] * experts[e] for e in range(E)))
    return towers(head, mixed)


@pytest.mark.parametrize("shared_gate", [False, True])
def test_moe_matches_loop_reference_with_gradients(shared_gate):
    torch.manual_seed(0)
    head = MoE(10, TASKS, 4, [16, 8], [6], GateConfig(temperature=2.0), shared_gate=shared_gate)
    x = torch.randn(11, 10, requires_grad=True)
    out, aux, gates, *_ = head(x, Probes(gates=True))
    ref = loop_moe(head, x)
    assert out.shape == (11, 3) and aux.numel() == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(out.square().sum(), [x, *head.parameters()])
    g2 = torch.autograd.grad(ref.square().sum(), [x, *head.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for t in TASKS:
        assert gates[t].shape == (11, 4) and not gates[t].requires_grad
        torch.testing.assert_close(gates[t].sum(-1), torch.ones(11))
        # what the head mixed with: its gates' weights on the same input
        w, _ = head.gates(x)
        torch.testing.assert_close(gates[t], w[:, 0 if shared_gate else TASKS.index(t)])


def test_omoe_equals_mmoe_with_tied_gates():
    torch.manual_seed(1)
    omoe = MoE(10, TASKS, 4, [8], [4], shared_gate=True)
    mmoe = MoE(10, TASKS, 4, [8], [4])
    mmoe.load_state_dict(
        {k: v for k, v in omoe.state_dict().items() if not k.startswith("gates.")}, strict=False
    )
    with torch.no_grad():
        for wm, wo in zip(mmoe.gates.logits.weights, omoe.gates.logits.weights):
            wm.copy_(wo.expand_as(wm))
        for bm, bo in zip(mmoe.gates.logits.biases, omoe.gates.logits.biases):
            bm.copy_(bo.expand_as(bm))
    x = torch.randn(6, 10)
    torch.testing.assert_close(omoe(x)[0], mmoe(x)[0])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("in_dim,kernel", [(16, "grouped_mm"), (10, "loop")])
def test_top_k_sparse_dispatch_equals_masked_dense(k, in_dim, kernel):
    """Grouped GEMM where widths are 16-byte aligned, else the loop over row blocks."""
    torch.manual_seed(2)
    head = MoE(in_dim, TASKS, 6, [16, 8], [4], GateConfig(top_k=k), sparse_max_fraction=1.0)
    x = torch.randn(32, in_dim, requires_grad=True)
    sparse, _, gates, *_ = head(x, Probes(gates=True))
    assert head.dispatch(x) == f"sparse/{kernel}"
    ref = loop_moe(head, x, top_k=k)
    torch.testing.assert_close(sparse, ref, rtol=1e-5, atol=1e-5)
    gs = torch.autograd.grad(sparse.sum(), [x, *head.parameters()])
    head.sparse_max_fraction = 0.0  # force the masked dense combine
    dense, _, *_ = head(x)
    assert head.dispatch(x) == "dense"
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    gd = torch.autograd.grad(dense.sum(), [x, *head.parameters()])
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(((w > 0).sum(-1) == k).all() for w in gates.values())


def test_top_k_equal_to_e_is_plain_softmax():
    torch.manual_seed(3)
    full = MoE(10, TASKS, 4, [8], [4], GateConfig(top_k=4))
    x = torch.randn(9, 10)
    torch.testing.assert_close(full(x)[0], loop_moe(full, x))


def loop_ple(head: PLE, x: torch.Tensor) -> torch.Tensor:
    """Reference PLE: every expert and gate on its own, level by level."""
    T, Es, Et = head.num_tasks, head.shared_experts, head.task_experts
    task_in, shared_in = [x] * T, x
    for mods in head.levels:
        inputs = [shared_in] * Es + [task_in[t] for t in range(T) for _ in range(Et)]
        out = loop_mlp(mods["experts"], inputs)  # [G, B, H]
        gates = torch.softmax(gate_logits(mods["task_gates"], task_in), -1)
        new_task = []
        for t in range(T):
            own = list(range(Es)) + [Es + t * Et + j for j in range(Et)]
            new_task.append(sum(gates[:, t, i : i + 1] * out[e] for i, e in enumerate(own)))
        if "shared_gate" in mods:
            sg = torch.softmax(gate_logits(mods["shared_gate"], [shared_in]), -1)[:, 0]
            shared_in = sum(sg[:, e : e + 1] * out[e] for e in range(out.shape[0]))
        task_in = new_task
    return towers(head, task_in)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_matches_loop_reference(levels):
    torch.manual_seed(4)
    mix = MixedExperts(shared_experts=2, task_experts=2, expert_hidden=[12, 8], tower_hidden=[4])
    head = PLE(10, TASKS, levels, mix)
    x = torch.randn(7, 10, requires_grad=True)
    out, _, *_ = head(x)
    ref = loop_ple(head, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(out.sum(), [x, *head.parameters()])
    g2 = torch.autograd.grad(ref.sum(), [x, *head.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    gates = head(x, Probes(gates=True)).gates
    assert set(gates) >= {f"{t}/level0" for t in TASKS}
    assert ("shared/level0" in gates) == (levels > 1)
    assert all(torch.allclose(w.sum(-1), torch.ones(7)) for w in gates.values())


def test_shared_bottom_matches_reference():
    torch.manual_seed(5)
    head = SharedBottom(10, 3, [16, 8], [4])
    x = torch.randn(5, 10)
    bottom = loop_mlp(head.bottom, [x])[0]
    torch.testing.assert_close(head(x)[0], towers(head, [bottom] * 3), rtol=1e-5, atol=1e-6)


def test_cures_dropout_entropy_uniform_init():
    torch.manual_seed(6)
    w = torch.softmax(torch.randn(1000, 2, 4) * 3, -1)
    d = expert_dropout(w, 0.5)
    torch.testing.assert_close(d.sum(-1), torch.ones(1000, 2))
    assert (d == 0).float().mean() > 0.3  # experts really dropped
    gates = Gates(8, 2, 4, GateConfig(entropy_coef=0.01, uniform_init=True))
    weights, aux = gates(torch.randn(64, 8))
    assert (weights - 0.25).abs().max() < 0.01  # near-uniform at init
    # the regulariser is -coef * entropy: lowest (best) for uniform gates
    assert aux["gate_entropy"].item() == pytest.approx(
        -0.01 * torch.log(torch.tensor(4.0)).item(), rel=1e-3
    )
    noisy = Gates(8, 2, 4, GateConfig(top_k=1, noisy=True, load_balance_coef=0.1))
    weights, aux = noisy(torch.randn(64, 8))
    assert ((weights > 0).sum(-1) == 1).all() and aux["load_balance"] > 0


def test_gumbel_gate_is_one_hot_and_differentiable():
    torch.manual_seed(7)
    head = MoE(10, TASKS, 4, [8], [4], GateConfig(gumbel=True), sparse_max_fraction=1.0)
    x = torch.randn(16, 10)
    out, _, gates, *_ = head(x, Probes(gates=True))
    for w in gates.values():
        assert ((w > 0).sum(-1) == 1).all()
    out.sum().backward()
    assert head.gates.logits.weights[0].grad.abs().sum() > 0  # straight-through gradient


def test_esmm_ctcvr_is_product_and_uses_every_exposure():
    torch.manual_seed(8)
    a, b = torch.randn(50, requires_grad=True), torch.randn(50, requires_grad=True)
    click = (torch.rand(50) < 0.3).float()
    conv = click * (torch.rand(50) < 0.5).float()  # 0 where no click (a null label filled with 0)
    mask = torch.ones(50)
    loss = esmm_ctcvr_loss(a, b, click * conv, mask)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(loss, F.binary_cross_entropy(p, click * conv))
    loss.backward()
    unclicked = click == 0
    # non-clicked exposures still train both towers (entire space), not only clicked rows
    assert a.grad[unclicked].abs().sum() > 0 and b.grad[unclicked].abs().sum() > 0


def test_mmoe_experts_and_gates_share_one_first_matmul():
    """Dense MMoE: the experts' first layers and every gate's logits come from ONE addmm."""
    from torch.profiler import profile

    head = MoE(16, TASKS, 4, [8, 8], [4])
    with profile() as prof:
        head(torch.randn(5, 16))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::addmm") == 1 and "aten::mm" not in counts, counts


def test_esmm_clicked_row_with_unknown_conversion_has_no_ctcvr_weight():
    """A clicked row whose conversion is null (not attributed yet) is not a CTCVR negative:
    its weight in the CTCVR term is 0, so its logits get no gradient from it; an unclicked row
    is a known negative whatever its conversion column says."""
    from mtl_dist.config import TaskSpec
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.loop.losses import ModelWithLoss
    from mtl_dist.loop.step import TrainStep

    tasks = [TaskSpec(name="click", label="click"),
             TaskSpec(name="conversion", label="conversion", condition="click")]  # fmt: skip
    # rows: clicked+converted, clicked+not converted, clicked+UNKNOWN, unclicked (null conv)
    batch = ArrowBatchConverter([], ["x"], tasks)(
        pa.table({"x": [0.0, 0.0, 0.0, 0.0],
                  "click": pa.array([1, 1, 1, 0], pa.int8()),
                  "conversion": pa.array([1, 0, None, None], pa.int8())})
    )  # fmt: skip
    outputs = torch.zeros(4, 2, requires_grad=True)

    class Fixed(torch.nn.Module):  # the head's outputs, as given
        def forward(self, batch):
            return outputs, outputs.new_zeros(0)

    model = ModelWithLoss(Fixed(), tasks, esmm=(0, 1))
    assert ctcvr_weights(batch.labels[:, 0], batch.mask[:, 0], batch.mask[:, 1]).tolist() == [
        1.5, 1.5, 0.0, 1.0,  # the 2 known clicked rows stand for the 3 clicked (1/q̂ = 1.5)
    ]  # fmt: skip
    loss, out = TrainStep(model).loss(model(batch))
    (grad,) = torch.autograd.grad(loss, outputs)  # click BCE + CTCVR, weights 1
    assert grad[2, 1] == 0  # the unknown row: no CTCVR gradient on pCVR ...
    assert grad[2, 0].item() == pytest.approx((0.5 - 1) / 4)  # ... and pCTR's is click BCE's alone
    assert grad[1, 1] > 0 and grad[3, 1] > 0 and grad[0, 1] < 0  # negatives push pCVR down
    # the CTCVR loss: the 3 known rows weighted 1.5, 1.5, 1 (Σ = 4): p = 0.25 each (sigmoid(0)^2)
    expect = -(1.5 * math.log(0.25) + 2.5 * math.log(0.75)) / 4
    assert out.losses[1].item() == pytest.approx(expect, rel=1e-6)


def test_esmm_refuses_negative_downsampling_of_its_cvr_task():
    from mtl_dist.config import ConfigError, load_config, validate

    cfg = load_config(["--config", "configs/default.toml", "--model.esmm.enabled", "true"])
    cfg.tasks[0].negative_rate = 0.2  # the CTR task may be downsampled (consistent under ESMM)
    validate(cfg)
    cfg.tasks[1].negative_rate = 0.2
    with pytest.raises(
        ConfigError, match=r"tasks\[1\] \(conversion\).negative_rate = 0.2 with model.esmm.enabled"
    ):
        validate(cfg)
