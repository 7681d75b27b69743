"""The dense head's fast paths (issue 28) compute what the plain formulation computes: forward
and gradients, within the stated tolerances."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.models import experts
from mtl_dist.models.experts import StackedMLP
from mtl_dist.models.head_parts import mix_selected, task_expert_index


def test_mix_selected_equals_the_gathered_einsum_forward_and_gradients():
    torch.manual_seed(0)
    B, T, Es, Et, H = 7, 3, 2, 2, 5
    index = task_expert_index(T, Es, Et)  # [T, Es + Et]
    weights = torch.softmax(torch.randn(B, T, Es + Et), -1).requires_grad_()
    experts = torch.randn(Es + T * Et, B, H, requires_grad=True)
    fast = mix_selected(weights, experts, index)
    plain = torch.einsum("bte,tebh->tbh", weights, experts[index])
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(plain)
    fast_grads = torch.autograd.grad(fast, (weights, experts), g)
    plain_grads = torch.autograd.grad(plain, (weights, experts), g)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # scoring / export take the gather: the same values
        torch.testing.assert_close(
            mix_selected(weights, experts, index), fast, rtol=1e-6, atol=1e-6
        )
    # an expert no task of this batch reads gets exactly zero gradient
    only_shared = torch.zeros_like(weights)
    only_shared[..., 0] = 1
    (grad,) = torch.autograd.grad(mix_selected(only_shared, experts, index).sum(), experts)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def _reference(mlp: StackedMLP, x: torch.Tensor) -> torch.Tensor:
    """Group by group with plain matmuls: ``[G, B, H]``."""
    outs = []
    for g in range(mlp.groups):
        h = x
        for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
            h = h @ w[g] + b[g]
            if i < len(mlp.weights) - 1 or mlp.activate_last:
                h = torch.relu(h)
        outs.append(h)
    return torch.stack(outs)


def _run(mlp: StackedMLP, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = mlp(x)
    return out.float(), torch.autograd.grad(out.float(), [x, *mlp.parameters()], g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.15)])
def test_stacked_mlp_on_a_shared_input_matches_group_by_group(dtype, tol):
    """The shared first layer is one matmul whose ``[B, G·H]`` output is viewed as ``[G, B, H]``;
    the result and every gradient match the group-by-group fp32 computation (relative error
    in norm: bf16 rounds every matmul input and the incoming gradient; the group-by-group
    computation under the same autocast is 0.4% off in the output and 8% in the gradients of
    this small net, as is ours)."""
    torch.manual_seed(1)
    mlp = StackedMLP(4, 24, [32, 16])
    x = torch.randn(64, 24, requires_grad=True)
    ref = _reference(mlp, x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *mlp.parameters()], g)
    out, grads = _run(mlp, x, g, dtype)
    assert _rel(out, ref) <= tol / 10
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) <= tol


def test_the_contiguous_copy_for_reduced_precision_changes_no_value(monkeypatch):
    """bf16 makes the first layer's ``[G, B, H]`` view contiguous (the CPU bf16 and cuBLAS
    batched kernels copy a non-standard batch stride slowly in the backward): the forward and
    the gradients are those of the strided view, to bf16's rounding of the same products."""
    torch.manual_seed(2)
    mlp = StackedMLP(4, 24, [32, 16])
    x = torch.randn(64, 24, requires_grad=True)
    g = torch.randn(4, 64, 16)
    assert experts._needs_standard_batch_strides(torch.zeros(1, dtype=torch.bfloat16))
    assert not experts._needs_standard_batch_strides(torch.zeros(1))
    out, grads = _run(mlp, x, g, torch.bfloat16)
    monkeypatch.setattr(experts, "_needs_standard_batch_strides", lambda t: False)
    strided, strided_grads = _run(mlp, x, g, torch.bfloat16)
    assert _rel(out, strided) <= 1e-2
    for a, b in zip(grads, strided_grads):
        assert _rel(a, b) <= 1e-2
