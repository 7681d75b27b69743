"""Reduced precision: the auto decision from given hardware, the head under bf16 autocast against
fp32 on the same weights, the loss scaler's arithmetic, and bf16 / fp16-table training on 2
ranks under torchrun against fp32 on the same seed."""

from __future__ import annotations

import json

import pytest
import torch

from mtl_dist.loop.precision import LossScaler, Precision, resolve_precision, set_head_precision
from mtl_dist.models.heads import PLE, MoE
from mtl_dist.models.outputs import Probes
from mtl_dist.models.ple import MixedExperts
from tests.conftest import torchrun


@pytest.mark.parametrize(
    "requested,device,cap,flags,name,why",
    [
        ("auto", "cpu", None, {"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bf16", "amx_bf16"),
        ("auto", "cpu", None, {"avx2", "avx512f", "avx512_bf16"}, "bf16", "avx512_bf16"),
        ("auto", "cpu", None, {"avx2", "fma"}, "fp32", "neither amx_bf16 nor avx512_bf16"),
        ("auto", "cuda", (8, 0), set(), "bf16", "sm_80 has bf16 tensor cores"),
        ("auto", "cuda", (9, 0), set(), "bf16", "sm_90"),
        ("auto", "cuda", (7, 0), set(), "fp32", "sm_70 is below 8.0"),
        ("bf16", "cpu", None, {"avx2"}, "bf16", "emulated, slower"),
        ("fp32", "cuda", (9, 0), set(), "fp32", "train.precision = fp32"),
        ("fp16", "cuda", (7, 0), set(), "fp16", "train.precision = fp16"),
    ],
)
def test_auto_resolves_as_documented(requested, device, cap, flags, name, why):
    p = resolve_precision(requested, device, cap, flags)
    assert p.name == name and why in p.reason, p
    assert p.loss_scaling == (name == "fp16")


def test_fp16_without_cuda_and_bf16_on_old_gpus_are_refused():
    with pytest.raises(ValueError, match="fp16 is CUDA only"):
        resolve_precision("fp16", "cpu", flags={"amx_bf16"})
    with pytest.raises(ValueError, match="compute capability >= 8.0, not sm_75"):
        resolve_precision("bf16", "cuda", (7, 5))


@pytest.mark.parametrize("make", [
    lambda: MoE(32, ["a", "b", "c"], 4, [64, 32], [16]),
    lambda: PLE(32, ["a", "b"], 2, MixedExperts(2, 1, [64, 32], [16])),
])  # fmt: skip
def test_head_in_bf16_matches_fp32_within_bf16_tolerance(make):
    """Same weights: outputs and gradients of the head under bf16 autocast against fp32; the
    outputs come back as float32 and the parameters (the master copy) stay float32."""
    torch.manual_seed(0)
    head = make()
    x = torch.randn(256, 32)
    out32 = head(x).logits
    (g32,) = torch.autograd.grad(out32.square().mean(), head.towers.mlp.weights[0])
    set_head_precision(head, Precision("bf16", "test"))
    out16, aux, gates, _, _ = head(x, Probes(gates=True))
    assert out16.dtype == torch.float32 and aux.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in head.parameters())
    # bf16 keeps 8 bits of mantissa: relative error ~ 2^-8 per op, a few ops deep
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.02)
    (g16,) = torch.autograd.grad(out16.square().mean(), head.towers.mlp.weights[0])
    assert g16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.99, cos
    assert any(w.dtype == torch.bfloat16 for w in gates.values())  # computed in bf16


def test_loss_scaler_unscales_skips_overflow_and_adapts_the_scale():
    s = LossScaler(torch.device("cpu"), init_scale=1024.0, growth_interval=2)
    grads = [torch.full((3,), 2048.0), torch.full((2,), -512.0)]
    found = s.unscale_(grads)
    assert (
        found.item() == 0.0 and grads[0].tolist() == [2.0] * 3 and grads[1].tolist() == [-0.5] * 2
    )
    s.update(found)
    s.update(found)  # two good steps: the scale doubles
    assert s.scale.item() == 2048.0
    bad = [torch.tensor([1.0, float("inf")])]
    found = s.unscale_(bad)
    assert found.item() == 1.0
    s.update(found)  # an overflow halves it and restarts the count
    assert s.scale.item() == 1024.0 and s.good_steps.item() == 0


def test_tables_load_across_storage_types(tmp_path):
    """A checkpoint of fp32 tables loads into fp16 tables (rounded) and back (exactly the fp16
    values), through torch.distributed.checkpoint as resume does."""
    import torch.distributed.checkpoint as dcp

    from mtl_dist.config import load_config
    from mtl_dist.models.build import build_ranker

    def ranker(dtype: str):
        cfg = load_config(["--config", "configs/default.toml", "--embedding.data_type", dtype])
        torch.manual_seed(0)
        return build_ranker(cfg, device="cpu")

    full, half = ranker("fp32"), ranker("fp16")
    table = "ebc.embedding_bags.item_id.weight"
    assert half.state_dict()[table].dtype == torch.float16
    dcp.save({"model": full.state_dict()}, checkpoint_id=tmp_path / "fp32")
    state = {"model": half.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "fp32")
    half.load_state_dict(state["model"])
    torch.testing.assert_close(half.state_dict()[table], full.state_dict()[table].half())
    dcp.save({"model": half.state_dict()}, checkpoint_id=tmp_path / "fp16")
    back = ranker("fp32")
    state = {"model": back.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "fp16")
    back.load_state_dict(state["model"])
    assert torch.equal(back.state_dict()[table], half.state_dict()[table].float())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from mtl_dist.data.synth import generate

    out = tmp_path_factory.mktemp("precision-data")
    generate(out, train_rows=24_000, val_rows=8_000, files=2, verbose=False)
    return out


def train(data, out, *extra):
    args = [
        "-m", "mtl_dist.train", "--config", "configs/default.toml",
        "--data.train_path", str(data / "train"), "--data.val_path", str(data / "val"),
        "--train.output_dir", str(out), "--train.progress_bar", "false",
        "--train.batch_size", "256", "--model.experts.hidden", "64,32",
        "--monitor.attribution", "false", "--train.epochs", "4", *extra,
    ]  # fmt: skip
    proc = torchrun(args, nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), proc


def test_each_precision_trains_on_two_ranks_close_to_fp32(small, tmp_path):
    """Same seed, 4 epochs of 46 steps: bf16 dense compute and fp16 tables each end within 0.02
    AUC (click, conversion) of fp32; the fp16-table checkpoint resumes into fp32 tables."""
    ref, _ = train(small, tmp_path / "fp32", "--train.precision", "fp32")
    bf16, proc = train(small, tmp_path / "bf16", "--train.precision", "bf16")
    assert "[precision] dense bf16" in proc.stdout
    half, proc = train(small, tmp_path / "fp16", "--train.precision", "fp32",
                       "--embedding.data_type", "fp16")  # fmt: skip
    assert "tables fp16" in proc.stdout
    for run in (bf16, half):
        assert run["steps"] == ref["steps"] == 184
        assert ref["metrics"]["click"]["auc"] > 0.6  # it learned something to compare
        for task in ("click", "conversion"):
            gap = abs(run["metrics"][task]["auc"] - ref["metrics"][task]["auc"])
            assert gap < 0.02, (task, gap, run["config"]["train"]["precision"])
    from mtl_dist.checkpoint.store import read_manifest

    ckpt = tmp_path / "fp16" / "checkpoints" / "step_00000184"
    assert read_manifest(ckpt)["table_dtype"] == "fp16"
    more, proc = train(small, tmp_path / "fp16", "--train.precision", "fp32",
                       "--train.epochs", "5", "--train.max_steps", "194")  # fmt: skip
    assert "[resume] tables saved as fp16, loaded as fp32" in proc.stdout
    assert more["steps"] == 194


def test_fp16_loss_scaling_trains_like_fp32_and_skips_an_overflowing_step():
    """The fp16 path in one process (autocast fp16 runs on CPU too; the train entry allows
    fp16 on CUDA only): the real loss module, update switch and guarded optimizer. Scaled
    training follows fp32 closely; a scale that overflows the fp16 backward skips the step —
    parameters unchanged, scale halved, the skip counted."""
    from mtl_dist.data.batch import ArrowBatchConverter
    from mtl_dist.loop.losses import ModelWithLoss
    from mtl_dist.loop.optim import GuardedDense
    from mtl_dist.loop.step import TrainStep
    from tests.balancer_worker import TASKS, D, DenseRanker, batch

    conv = ArrowBatchConverter([], [f"x{i}" for i in range(D)], TASKS)

    def setup(fp16: bool):
        torch.manual_seed(0)
        model = ModelWithLoss(DenseRanker(), TASKS)
        model.step = TrainStep(model)  # (the test's handle on the step of this model)
        if fp16:
            set_head_precision(model.model.head, Precision("fp16", "test"))
            model.step.switch.scaler = LossScaler(torch.device("cpu"), init_scale=1024.0)
        params = dict(model.named_parameters())
        adam = lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)  # noqa: E731
        return model, GuardedDense(params, adam, model.step.switch)

    def step(model, opt, i):
        loss, _ = model.step.loss(model(batch(i, 0, conv)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    (m32, o32), (m16, o16) = setup(False), setup(True)
    for i in range(5):
        step(m32, o32, i)
        step(m16, o16, i)
    for (name, a), b in zip(m32.named_parameters(), m16.parameters()):
        torch.testing.assert_close(b, a, rtol=0.05, atol=2e-3, msg=name)
    scaler = m16.step.switch.scaler
    assert scaler.skipped.item() == 0 and scaler.scale.item() == 1024.0
    before = {k: v.detach().clone() for k, v in m16.named_parameters()}
    scaler.scale.fill_(2.0**60)  # the fp16 backward overflows
    step(m16, o16, 5)
    assert scaler.skipped.item() == 1 and scaler.scale.item() == 2.0**59
    assert all(torch.equal(before[k], v) for k, v in m16.named_parameters())
    step(m32, o32, 5)  # (fp32 moves on)
    scaler.scale.fill_(1024.0)
    step(m16, o16, 6)
    assert any(not torch.equal(before[k], v) for k, v in m16.named_parameters())
