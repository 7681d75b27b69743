"""Reduced precision: the dtype the dense head computes in, chosen where it pays, and why.

``train.precision``:

* ``fp32`` — everything in float32 (TF32 matmuls on CUDA with ``train.allow_tf32``);
* ``bf16`` — the dense head under ``torch.autocast(dtype=bfloat16)``: matmuls / batched matmuls
  in bf16 with fp32 accumulation, master weights, optimizer state, losses, metrics, gate health
  and balancer arithmetic in fp32 (the head's outputs are cast back before the losses). Any
  x86 CPU runs it, fast only with AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16; CUDA
  from compute capability 8.0;
* ``fp16`` — CUDA only, with dynamic loss scaling (:class:`mtl_dist.loop.precision.LossScaler`);
* ``auto`` — bf16 on CUDA with compute capability ≥ 8.0 or a CPU whose flags show
  ``amx_bf16`` / ``avx512_bf16``, fp32 elsewhere. :func:`resolve_precision` returns the choice
  with the reason, which the train entry prints at start-up.

Embedding tables have their own storage type (``embedding.data_type = fp32 | fp16``, TorchRec's
``EmbeddingBagConfig.data_type``): fp16 halves the table memory; pooled embeddings are cast to
the dense precision before the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The resolved dense precision: ``name`` (fp32 | bf16 | fp16) and why it was chosen."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def reduced(self) -> bool:
        return self.name != "fp32"

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs dynamic loss scaling (its range is too narrow for small gradients)."""
        return self.name == "fp16"


def cpu_flags() -> set[str]:
    """This CPU's ISA flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_precision(
    requested: str,
    device: str,
    cuda_capability: tuple[int, int] | None = None,
    flags: set[str] | None = None,
) -> Precision:
    """Resolve ``train.precision`` for ``device`` (``cpu`` | ``cuda``); ``flags``: the CPU's
    ISA flags (default: this machine's), ``cuda_capability``: the GPU's (major, minor).

    Raises ``ValueError`` for fp16 without CUDA, or bf16 on a GPU below compute capability 8.0.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {PRECISIONS}, got {requested!r}")
    if device == "cuda":
        cap = cuda_capability or (0, 0)
        sm = f"sm_{cap[0]}{cap[1]}"
        if requested == "auto":
            if cap >= (8, 0):
                return Precision("bf16", f"auto: CUDA {sm} has bf16 tensor cores")
            return Precision("fp32", f"auto: CUDA {sm} is below 8.0 (no bf16 tensor cores)")
        if requested == "bf16" and cap < (8, 0):
            raise ValueError(
                f"train.precision = bf16 needs CUDA compute capability >= 8.0, not {sm}"
            )
        return Precision(requested, f"train.precision = {requested} (CUDA {sm})")
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if requested == "fp16":
        raise ValueError(
            "train.precision = fp16 is CUDA only (with loss scaling); on CPU use bf16 (fast "
            "with AMX-BF16 / AVX512-BF16) or fp32"
        )
    if requested == "auto":
        if native:
            return Precision("bf16", f"auto: the CPU has {' and '.join(native)}")
        return Precision(
            "fp32", "auto: the CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated)"
        )
    if requested == "bf16" and not native:
        return Precision(
            "bf16",
            "train.precision = bf16 on a CPU without amx_bf16 / avx512_bf16: emulated, slower",
        )
    return Precision(requested, f"train.precision = {requested}")


def set_head_precision(head: torch.nn.Module, precision: Precision) -> None:
    """Make ``head`` compute in ``precision`` (its parameters stay fp32: the master copy)."""
    head.compute_dtype = precision.dtype if precision.reduced else None
