"""Thin wrapper over the compiled CPU op ``genknowsub_fast_C::routed_lora_delta_`` (csrc/routed_lora_cpu.cpp).

The op adds the Arrow-routed LoRA delta to y in place for float32, bfloat16 and float16 CPU tensors x (..., d_in) and
y (..., d_out) (any leading shape, the same for both; each row is a token): routing scores in float32 against float32
prototypes, top-k with ties to the lower index, softmax in float64, shrink and expand of the k selected experts only,
the delta summed in float32 and added to y with one rounding. Its vector kernels are chosen at run time (scalar, AVX2,
AVX-512) from what the CPU supports; ``GENKNOWSUB_FAST_CPU_ISA`` or :func:`isa` force one.
"""

from __future__ import annotations

import os

import torch

from . import build_rule, extension
from .packing import PackedExperts

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP: list = []


def _lookup():
    if extension.has_op("routed_lora_delta_"):
        request = os.environ.get(build_rule.ISA_SWITCH, "").strip().lower()
        if request and request not in build_rule.ISA_CHOICES:
            raise ValueError(f"{build_rule.ISA_SWITCH}={request!r}: expected one of {build_rule.ISA_CHOICES}")
        try:  # reads the variable in C++ and fails there when the CPU cannot run the ISA it names
            torch.ops.genknowsub_fast_C.cpu_isa("")
        except RuntimeError as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
        return torch.ops.genknowsub_fast_C.routed_lora_delta_
    return None


def op():
    """The compiled op, or None when the extension is not loaded (looked up once per process)."""
    if not _OP:
        _OP.append(_lookup())
    return _OP[0]


def available() -> bool:
    """Whether the compiled CPU op is loaded (building the extension on first use if needed)."""
    return op() is not None


def takes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the op can take x and y: CPU tensors of one dtype among float32 / bfloat16 / float16, and no autograd
    through them (the op has no backward; with gradients on, the torch regimes run)."""
    # is_cpu and identity tests of the dtypes: x.device builds a device object per access (docs/design.md, "What a
    # call costs").
    if not (x.is_cpu and y.is_cpu) or y.dtype is not x.dtype or x.dtype not in KERNEL_DTYPES:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))


def isa(request: str = "") -> str:
    """The instruction set the CPU kernels use ("scalar", "avx2" or "avx512"); with a name (or "auto"), force it first.

    Raises ValueError for an unknown name or one this CPU cannot run.
    """
    if not extension.has_op("cpu_isa"):
        raise ValueError(f"the compiled extension is not loaded: {extension.status()[1]}")
    try:
        return torch.ops.genknowsub_fast_C.cpu_isa(request)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def add_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y += routed LoRA delta`` in place for x (..., d_in) and y (..., d_out) with the same leading shape; returns y.

    ``scores``: optional (T, E) float32 signed routing scores x·p computed by the caller (e.g. summed over
    tensor-parallel shards); the op then routes on their absolute values instead of computing them.
    """
    kernel = op()
    if kernel is None:
        raise ValueError(f"the compiled CPU kernel is not available: {extension.status()[1]}")
    if not y.is_contiguous():
        raise ValueError("the CPU kernel writes y in place and needs it contiguous")
    if scores is not None and (scores.dtype != torch.float32 or not scores.is_contiguous()):
        scores = scores.to(torch.float32).contiguous()
    kernel(
        y, x if x.is_contiguous() else x.contiguous(), packed.prototypes, packed.a, packed.b_t, top_k,
        float(temperature), packed.mixing == "weights", scores,
    )  # fmt: skip
    return y


__all__ = ["available", "takes", "add_delta_", "isa", "op", "KERNEL_DTYPES"]
