"""The public ops on raw tensors, and :func:`prepare`, which builds the prepared per-layer runner.

Shapes: A (E, r, d_in), B (E, d_out, r), scaling (E,), prototypes (E, d_in), x (..., d_in), weight (d_out, d_in).
Dispatch to a backend happens in one place, :class:`genknowsub_fast.runner.RoutedLinear`.
"""

from __future__ import annotations

import warnings

import torch

from .backends import prototype_ext, torch_ops
from .backends.packing import check_factors
from .experts import ModuleExperts, all_finite
from .options import RoutingOptions, resolve_routing
from .runner import BACKENDS, RoutedLinear, resolve_backend, triton_status

PROTOTYPE_METHODS = ("exact", "power", "svd")


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
    NaN or Inf in A or B raise ValueError.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(f"expected A (E, r, d_in) and B (E, d_out, r), got {tuple(a.shape)} and {tuple(b.shape)}")
    if method not in PROTOTYPE_METHODS:
        raise ValueError(f"unknown prototype method {method!r}; expected one of {PROTOTYPE_METHODS}")
    (p,), (zero,) = prototype_ext.prototypes_by_method([a], [b], method, rng_seed)
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

    ``logit_e = |x·p_e|`` with the scores accumulated in float32; the k largest are kept (ties to the lower index)
    and softmaxed with ``temperature``.
    """
    if x.shape[-1] != prototypes.shape[-1]:
        raise ValueError(f"x has d_in={x.shape[-1]} but prototypes have d_in={prototypes.shape[-1]}")
    if not x.is_floating_point() or not prototypes.is_floating_point():
        raise ValueError(f"x and prototypes must be floating-point, got {x.dtype} and {prototypes.dtype}")
    if not all_finite(prototypes):
        raise ValueError("prototypes contain NaN or Inf")
    options = RoutingOptions(top_k, temperature).check_experts(prototypes.shape[0])
    return torch_ops.route(x.reshape(-1, x.shape[-1]), prototypes, options.top_k, options.temperature)


def prepare(
    experts: ModuleExperts,
    top_k: int | None = None,
    temperature: float | None = None,
    mixing: str | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str = "",
) -> RoutedLinear:
    """The prepared runner of one layer's experts: validated now, packed once per (device, dtype).

    ``device``/``dtype`` pack right away; otherwise the first call packs for its input. See
    :class:`~genknowsub_fast.runner.RoutedLinear` for the calls (``runner(x, weight, bias)``,
    ``runner.add_delta_(y, x, scores=None)``, ``runner.route_scores(x)``, ``runner.route(x)``). Routing options
    left as None take the package defaults (:func:`~genknowsub_fast.options.resolve_routing`: top_k = min(3, number
    of experts), temperature 1.0, mixing "output"). NaN or Inf in the experts is a ValueError.
    """
    if not isinstance(experts, ModuleExperts):
        raise ValueError(f"experts must be a ModuleExperts, got {type(experts).__name__}")
    experts.check_finite()
    options = resolve_routing(experts.num_experts, top_k, temperature, mixing)
    return RoutedLinear(experts, options, backend, device, dtype, name)


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

    This functional form checks and packs the experts on every call; for repeated calls use :func:`prepare` once
    instead. NaN or Inf in A, B, scaling or the prototypes is a ValueError.
    """
    check_factors(a, b, scaling, prototypes)
    if x.shape[-1] != a.shape[2]:
        raise ValueError(f"x has d_in={x.shape[-1]} but A has d_in={a.shape[2]}")
    if weight is not None and weight.shape != (b.shape[1], a.shape[2]):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({b.shape[1]}, {a.shape[2]})")
    ranks = torch.full((a.shape[0],), a.shape[1], dtype=torch.int64)
    experts = ModuleExperts(a, b, scaling, prototypes, ranks)
    experts.check_finite()
    options = RoutingOptions(top_k, temperature, mixing).check_experts(experts.num_experts)
    return RoutedLinear(experts, options, backend)(x, weight, bias)


__all__ = [
    "arrow_prototypes",
    "arrow_route",
    "routed_lora",
    "prepare",
    "resolve_backend",
    "triton_status",
    "RoutedLinear",
    "BACKENDS",
    "PROTOTYPE_METHODS",
]
