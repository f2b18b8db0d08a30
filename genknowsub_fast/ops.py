"""The three public ops and their backend dispatch.

``backend="auto"`` picks Triton for CUDA tensors when the Triton backend can run, and the portable torch backend
otherwise; ``"torch"`` and ``"triton"`` force one. Asking for Triton where it cannot run is an error, never a silent
fallback.
"""

from __future__ import annotations

import math
import warnings

import torch

from .backends import prototype_ext, torch_ops
from .backends.packing import PackedExperts, check_mixing, pack_experts

__all__ = ["arrow_prototypes", "arrow_route", "routed_lora", "resolve_backend", "BACKENDS", "PROTOTYPE_METHODS"]

BACKENDS = ("auto", "torch", "triton")
PROTOTYPE_METHODS = ("exact", "power", "svd")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_routing_args(top_k: int, temperature: float, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not when it cannot."""
    try:
        from .backends import triton_ops
    except ImportError as exc:  # triton missing or the kernels failed to import
        return False, f"Triton backend unavailable: {exc}"
    return triton_ops.status()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto", "torch", "triton") to the backend that runs on ``device``; ValueError if it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    ok, why = triton_status()
    if backend == "triton":
        if not ok:
            raise ValueError(f'backend="triton" cannot run: {why}')
        return "triton"
    return "triton" if (ok and device.type == "cuda") else "torch"


def arrow_prototypes(
    a: torch.Tensor, b: torch.Tensor, method: str = "exact", rng_seed: int | None = None, warn_zero: bool = True
) -> torch.Tensor:
    """Unit prototypes (E, d_in): the top right singular vector of each expert's ``B_e A_e``.

    Args:
        a: (E, r, d_in) LoRA A factors.
        b: (E, d_out, r) LoRA B factors.
        method: "exact" (r×r Gram/QR + eigen solve; the compiled extension when built, else torch.linalg),
            "power" (PEFT's 15-step power iteration, approximate) or "svd" (full SVD of ΔW; slow, for checks).
        rng_seed: start-vector seed of the "power" method.
        warn_zero: warn when an expert's ΔW is zero (it gets a zero prototype and is never preferred).

    The sign of each prototype is canonical (largest-magnitude entry positive) for "exact" and "svd".
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(f"expected A (E, r, d_in) and B (E, d_out, r), got {tuple(a.shape)} and {tuple(b.shape)}")
    if method not in PROTOTYPE_METHODS:
        raise ValueError(f"unknown prototype method {method!r}; expected one of {PROTOTYPE_METHODS}")
    if method != "exact" or not prototype_ext.checks_finite([a], [b]):  # else the extension checks in its own pass
        _check_finite("A", a)
        _check_finite("B", b)
    if method == "power":
        return torch_ops.power_prototypes(a, b, rng_seed=rng_seed)
    if method == "svd":
        from . import reference

        p = reference.prototypes_svd(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)
        zero = ~(p != 0).any(dim=1)
    else:
        (p,), (zero,) = prototype_ext.exact_prototypes_batched([a], [b])
    if warn_zero and bool(zero.any()):
        warnings.warn(
            f"{int(zero.sum())} expert(s) have ΔW = 0 (indices {zero.nonzero().flatten().tolist()}): "
            "they get a zero prototype and are only chosen when every logit is zero",
            stacklevel=2,
        )
    return p


def arrow_route(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow routing of x (..., d_in): weights (T, k) float32 and expert indices (T, k) int64, T = x.numel() / d_in.

    ``logit_e = |x·p_e|``; the k largest are kept and softmaxed with ``temperature``.
    """
    if x.shape[-1] != prototypes.shape[-1]:
        raise ValueError(f"x has d_in={x.shape[-1]} but prototypes have d_in={prototypes.shape[-1]}")
    _check_routing_args(top_k, temperature, prototypes.shape[0])
    return torch_ops.route(x.reshape(-1, x.shape[-1]), prototypes.to(x.dtype), top_k, float(temperature))


def routed_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    prototypes: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    mixing: str = "output",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Arrow-routed LoRA on x (..., d_in): ``x W0ᵀ + bias + delta``, or only the delta when ``weight`` is None.

    This functional form packs the experts on every call; patched models pack once at patch time instead.
    """
    e, r, d_in = a.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} but A has d_in={d_in}")
    if weight is not None and weight.shape != (b.shape[1], d_in):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({b.shape[1]}, {d_in})")
    _check_routing_args(top_k, temperature, e)
    check_mixing(mixing, scaling, None)
    packed = pack_experts(a, b, scaling, prototypes, mixing=mixing, dtype=x.dtype, device=x.device)
    return routed_linear(x, packed, top_k, float(temperature), weight, bias, resolve_backend(backend, x.device))


def routed_linear(
    x: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """The hot path shared by :func:`routed_lora` and patched layers (arguments already checked and packed)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        from .backends import triton_ops

        y = triton_ops.routed_linear(x2, packed, top_k, temperature, weight, bias)
    else:
        if weight is None:
            y = x2.new_zeros(x2.shape[0], packed.d_out)
        else:
            y = torch.nn.functional.linear(x2, weight, bias)
        torch_ops.add_routed_delta_(y, x2, packed, top_k, temperature)
    return y.view(*lead, packed.d_out)
