"""Thin wrapper over the compiled CPU op ``genknowsub_fast_C::routed_lora_delta_`` (csrc/routed_lora_cpu.cpp).

The op adds the Arrow-routed LoRA delta to y in place for float32, bfloat16 and float16 CPU tensors x (..., d_in) and
y (..., d_out) (any leading shape, the same for both; each row is a token): routing scores in float32 against float32
prototypes, top-k with ties to the lower index, softmax in float64, shrink and expand of the k selected experts only,
the delta summed in float32 and added to y with one rounding. Its vector kernels are chosen at run time (scalar, AVX2,
AVX-512) from what the CPU supports; ``GENKNOWSUB_FAST_CPU_ISA`` or :func:`isa` force one.

Screened routing: with at least ``SCREEN_MIN_EXPERTS`` experts on AVX-512-BF16, a bfloat16 copy of the prototypes
(:func:`screen_prototypes`) lets the op score every expert with vdpbf16ps at half the bytes; those scores select each
token's top-k, and the float32 scores of the k selected give their softmax weights. Every bfloat16 score lies within
:func:`screen_error_bound` of the float32 one, so wherever a token's k-th and next float32 logits differ by more than
twice that bound, the experts (and so the output) are exactly those of float32 routing; closer ties may go either way.
"""

from __future__ import annotations

import os

import torch

from . import build_rule, extension
from .packing import PackedExperts

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The op screens only in its scores pass, which it runs above 32 experts (fewer are scored inside the route pass).
SCREEN_MIN_EXPERTS = 33
# The op's error bound holds for prototype rows of norm at most this (Arrow's prototypes are unit vectors).
SCREEN_MAX_NORM = 1.001
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


def screen_prototypes(prototypes: torch.Tensor) -> torch.Tensor | None:
    """The bfloat16 copy of float32 CPU ``prototypes`` (E, d_in) that the op screens with, or None where screening does
    not run: fewer than ``SCREEN_MIN_EXPERTS`` experts, kernels other than AVX-512 (with BF16), or a prototype row of
    norm above ``SCREEN_MAX_NORM`` (the op's error bound assumes unit rows). Costs E·d_in·2 bytes, made once per
    prepared layer."""
    if prototypes.shape[0] < SCREEN_MIN_EXPERTS or not prototypes.is_cpu or prototypes.dtype != torch.float32:
        return None
    if not available() or isa() != "avx512":
        return None
    if float(torch.linalg.vector_norm(prototypes.double(), dim=1).max()) > SCREEN_MAX_NORM:
        return None
    return prototypes.to(torch.bfloat16).contiguous()


def screen_error_bound(d_in: int, x_dtype: torch.dtype) -> float:
    """The factor c such that a screened score differs from the float32 score by at most c·‖x‖₂ (for prototype rows of
    norm at most ``SCREEN_MAX_NORM``): the rounding of the prototypes, and of x unless it is bfloat16, to bfloat16
    (2⁻⁸ each), and the d_in + 64 float32 roundings of each of the two sums (a bfloat16 product, and an FMA's, is exact
    before its rounding). Values below the float32 normal range, which vdpbf16ps flushes, add at most
    4·(d_in + 64)·2⁻¹²⁶·(1 + ‖x‖₂) more."""
    u = 2.0**-8
    ux = 0.0 if x_dtype == torch.bfloat16 else u
    n = d_in + 64
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    return SCREEN_MAX_NORM * (u + ux + u * ux + gamma * (1 + u) * (1 + ux) + gamma)


def add_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    scores: torch.Tensor | None = None,
    screen: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y += routed LoRA delta`` in place for x (..., d_in) and y (..., d_out) with the same leading shape; returns y.

    ``scores``: optional (T, E) float32 signed routing scores x·p computed by the caller (e.g. summed over
    tensor-parallel shards); the op then routes on their absolute values instead of computing them.
    ``screen``: :func:`screen_prototypes` of ``packed.prototypes`` (screened routing, see the module docstring), or
    None.
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
        float(temperature), packed.mixing == "weights", scores, screen,
    )  # fmt: skip
    return y


__all__ = ["available", "takes", "add_delta_", "isa", "op", "screen_prototypes", "screen_error_bound", "KERNEL_DTYPES",
           "SCREEN_MIN_EXPERTS"]
