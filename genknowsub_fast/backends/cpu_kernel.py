"""The compiled CPU kernel (csrc/routed_lora_cpu.cpp) behind one small interface for the prepared runner.

``available()`` says whether the op is loaded, ``takes(x, y)`` whether it can run a call (dtype, device, no autograd),
``add_delta_`` runs it.
"""

from __future__ import annotations

import torch

from . import torch_ops
from .packing import PackedExperts

KERNEL_DTYPES = (torch.float32,)
_OP: list = []


def _op():
    if not _OP:
        from . import extension

        _OP.append(torch.ops.genknowsub_fast_C.routed_lora_delta_ if extension.has_op("routed_lora_delta_") else None)
    return _OP[0]


def available() -> bool:
    """True when the compiled op is registered (the extension is loaded once per process, on first ask)."""
    return _op() is not None


def takes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the kernel can run a call on x and y: CPU tensors of a kernel dtype, and no autograd through them (the
    kernel has no backward; with gradients on, the torch regimes run)."""
    if x.dtype not in KERNEL_DTYPES or y.dtype != x.dtype or x.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))


def add_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y += routed delta`` with the compiled kernel; x (T, d_in) and y (T, d_out) contiguous. Returns y."""
    if scores is not None:
        return torch_ops.add_routed_delta_(y, x, packed, top_k, temperature, scores=scores)
    op = _op()
    if op is None:
        from . import extension

        raise ValueError(f"the compiled CPU kernel is not available: {extension.status()[1]}")
    stacked = torch.cat([packed.prototypes, packed.a_flat])
    op(y, x, stacked, packed.b_t, top_k, float(temperature), packed.mixing == "weights")
    return y


__all__ = ["available", "takes", "add_delta_", "KERNEL_DTYPES"]
