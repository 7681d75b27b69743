"""The embedding regularisers on the fused table optimizers: ``model.embedding.l2`` (any
device) and ``optim.embedding_weight_decay`` (fbgemm's row-wise Adagrad, CUDA only)."""

import json
from collections import Counter

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from tests.conftest import torchrun


def test_embedding_l2_shrinks_exactly_the_looked_up_rows_through_dmp(tmp_path):
    """One fused-SGD step with λ = 10 against λ = 0 from the same weights and batch: each row
    the batch looked up n times moves by −lr·λ·n/B·w (the penalty's gradient), every other row
    stays; and fbgemm's row-wise Adagrad receives optim.embedding_weight_decay and its mode."""
    proc = torchrun(["-m", "tests.distributed.weight_decay_worker", str(tmp_path)], nproc=1)
    assert proc.returncode == 0
    r = json.loads((tmp_path / "weight_decay.json").read_text())
    before = torch.tensor(r["l2_0"]["before"])
    assert torch.equal(before, torch.tensor(r["l2_10"]["before"]))
    plain, decayed = torch.tensor(r["l2_0"]["after"]), torch.tensor(r["l2_10"]["after"])
    ids, batch = r["ids"], len(r["ids"])  # single-hot: one id per sample
    counts = torch.zeros(before.shape[0])
    for i, n in Counter(ids).items():
        counts[i] = n
    expected = -r["lr"] * r["l2"] * (counts / batch).unsqueeze(1) * before
    torch.testing.assert_close(decayed - plain, expected, rtol=1e-4, atol=1e-7)
    untouched = counts == 0
    assert torch.equal(decayed[untouched], before[untouched])
    touched = ~untouched
    assert (decayed[touched].norm(dim=1) < plain[touched].norm(dim=1)).float().mean() > 0.9
    assert r["l2_10"]["penalty"] > 0
    assert r["fused"] and all(
        f == ["EXACT_ROWWISE_ADAGRAD", 0.25, int(WeightDecayMode.DECOUPLE)] for f in r["fused"]
    ), r["fused"]


def rowwise_adagrad_step(device: str, mode: WeightDecayMode) -> list[float]:
    """One fbgemm row-wise Adagrad step (lr 0.1, weight decay 0.5) on the row [1, 2, 3, 4]
    with gradient 1 per element."""
    where = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        if device == "cuda"
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(4, 4, *where)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1,
        eps=1e-8, weight_decay=0.5 if mode != WeightDecayMode.NONE else 0.0,
        weight_decay_mode=mode,
    )  # fmt: skip
    emb.split_embedding_weights()[0].data.copy_(torch.arange(1.0, 5.0).repeat(4, 1))
    ids = torch.tensor([1], device=device)
    out = emb(ids, torch.tensor([0, 1], device=device))
    out.backward(torch.ones_like(out))
    return emb.split_embedding_weights()[0][1].cpu().tolist()


def test_fbgemm_cpu_kernels_ignore_weight_decay():
    """Why train.py refuses optim.embedding_weight_decay on CPU: fbgemm's CPU row-wise Adagrad
    steps the same with L2 or decoupled decay as without (lr · g / |g|_rms = 0.1)."""
    for mode in (WeightDecayMode.NONE, WeightDecayMode.L2, WeightDecayMode.DECOUPLE):
        assert rowwise_adagrad_step("cpu", mode) == pytest.approx([0.9, 1.9, 2.9, 3.9])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fbgemm_cuda_rowwise_adagrad_applies_weight_decay():
    """By hand: L2 adds wd·w to the gradient, g' = [1.5, 2, 2.5, 3], m = 0.1 / rms(g'); the row
    becomes w − m·g'. Decoupled: (1 − lr·wd)·w − 0.1·g = 0.95·w − 0.1."""
    g = torch.tensor([1.5, 2.0, 2.5, 3.0])
    l2 = torch.arange(1.0, 5.0) - 0.1 / g.square().mean().sqrt() * g
    assert rowwise_adagrad_step("cuda", WeightDecayMode.L2) == pytest.approx(l2.tolist(), 1e-5)
    assert rowwise_adagrad_step("cuda", WeightDecayMode.DECOUPLE) == pytest.approx(
        [0.85, 1.8, 2.75, 3.7], 1e-5
    )


def test_training_on_cpu_refuses_fused_weight_decay(synth_data, tmp_path):
    """A silent no-op would mislead: the CPU run stops at start-up, naming model.embedding.l2."""
    proc = torchrun(
        ["-m", "mtl_dist.train", "--config", "configs/default.toml",
         "--data.train_path", str(synth_data / "train"), "--data.val_path",
         str(synth_data / "val"), "--train.output_dir", str(tmp_path), "--train.max_steps", "1",
         "--optim.embedding_weight_decay", "0.01"],
        nproc=1,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "fbgemm's CPU kernels ignore weight decay" in proc.stderr
    assert "model.embedding.l2" in proc.stderr
