"""Triton backend adapter: what ``genknowsub_fast.ops`` calls for ``backend="triton"`` (and "auto" on CUDA).

The kernels live in ``genknowsub_fast.triton_kernels``; this module checks arguments once per call (clear ValueErrors,
no device reads) and calls the ``torch.ops.genknowsub_fast.routed_linear`` custom op.

Importing this module imports Triton; ``ops.triton_status`` turns an ImportError into a reason string.
"""

from __future__ import annotations

import os

import torch

from genknowsub_fast.triton_kernels import custom_ops

from ..runner import check_routing_args
from .packing import MIXING_MODES, PackedExperts

__all__ = ["status", "routed_linear", "prepare", "TritonLayer", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def status() -> tuple[bool, str]:
    """(True, how) when the Triton kernels can run here, else (False, why not).

    They run on a CUDA device, or on CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 was set before the
    kernels were imported (Triton reads it when the kernels are decorated).
    """
    env = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if custom_ops.interpreted():
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on the host, slowly"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if env:
        return False, (
            "TRITON_INTERPRET=1 was set after genknowsub_fast.triton_kernels was imported; set it before importing "
            "triton or genknowsub_fast"
        )
    return False, "no CUDA device, and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to run on CPU, slowly)"


def _check(
    x2: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    if x2.dim() != 2:
        raise ValueError(f"x must be 2-D (T, d_in), got shape {tuple(x2.shape)}")
    if x2.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton backend takes {SUPPORTED_DTYPES}, got x of dtype {x2.dtype}")
    e, r = packed.num_experts, packed.rank
    if e < 1 or r < 1:
        raise ValueError(f"need at least one expert of rank >= 1, got E={e}, r={r}")
    if packed.route_shrink.shape != (e + e * r, x2.shape[1]):
        raise ValueError(
            f"packed.route_shrink has shape {tuple(packed.route_shrink.shape)}, expected ({e + e * r}, {x2.shape[1]})"
        )
    if packed.b_t.dim() != 3 or packed.b_t.shape[:2] != (e, r):
        raise ValueError(f"packed.b_t has shape {tuple(packed.b_t.shape)}, expected ({e}, {r}, d_out)")
    if packed.mixing not in MIXING_MODES:
        raise ValueError(f"mixing must be one of {MIXING_MODES}, got {packed.mixing!r}")
    named = [("packed.route_shrink", packed.route_shrink), ("packed.b_t", packed.b_t)]
    if weight is not None:
        if weight.shape != (packed.d_out, x2.shape[1]):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({packed.d_out}, {x2.shape[1]})")
        named.append(("weight", weight))
    if bias is not None:
        if weight is None:
            raise ValueError("bias given without weight: a delta-only call takes neither")
        if bias.shape != (packed.d_out,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({packed.d_out},)")
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x2.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x2.dtype}; pack the experts in x's dtype")
        if t.device != x2.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x2.device}")
    check_routing_args(top_k, temperature, e)
    if x2.device.type != "cuda" and not custom_ops.interpreted():
        raise ValueError(
            f"the Triton kernels run on CUDA tensors, or on CPU only under TRITON_INTERPRET=1; x is on {x2.device}"
        )


def routed_linear(
    x2: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2 Wᵀ + bias + routed delta`` (T, d_out), or only the delta when ``weight`` is None.

    x2 is (T, d_in), T may be 0. The base GEMM is cuBLAS (F.linear); the expand kernel adds the delta into its output.
    """
    _check(x2, packed, top_k, temperature, weight, bias)
    return _call(x2, packed.route_shrink, packed, top_k, temperature, weight, bias)


def _call(x2, rows, packed, top_k, temperature, weight, bias):
    return torch.ops.genknowsub_fast.routed_linear(
        x2,
        rows,
        packed.b_t,
        weight,
        bias,
        packed.num_experts,
        packed.rank,
        top_k,
        float(temperature),
        packed.mixing == "weights",
    )


class TritonLayer:
    """One layer's experts prepared for the Triton kernels: the stacked rows are built once."""

    def __init__(self, packed: PackedExperts, top_k: int, temperature: float):
        if packed.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the Triton backend takes {SUPPORTED_DTYPES}, got experts in {packed.dtype}")
        self.packed, self.top_k, self.temperature = packed, top_k, float(temperature)
        self.rows = packed.route_shrink

    def __call__(self, x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return _call(x2, self.rows, self.packed, self.top_k, self.temperature, weight, bias)

    def add_delta_(self, y: torch.Tensor, x2: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if scores is not None:
            from . import torch_ops

            return torch_ops.add_routed_delta_(y, x2, self.packed, self.top_k, self.temperature, scores=scores)
        return y.add_(self(x2, None, None))


def prepare(packed: PackedExperts, top_k: int, temperature: float) -> TritonLayer:
    """The Triton backend's prepared layer for ``packed`` (validated once)."""
    return TritonLayer(packed, top_k, temperature)
