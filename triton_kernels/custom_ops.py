"""The Triton path as ``torch.library`` custom ops, so torch.compile treats it as one opaque call and CUDA graphs
capture it (the implementations never synchronise with the host).

- ``torch.ops.genknowsub_fast.routed_linear(x, route_shrink, b_t, weight, bias, num_experts, rank, top_k,
  temperature, mix_weights, regime="auto", split_k=0) -> y``
- ``torch.ops.genknowsub_fast.route_shrink(x, route_shrink, num_experts, rank, top_k, temperature, mix_weights,
  regime="auto", split_k=0) -> (g, idx, w)``

``regime="auto"`` and ``split_k=0`` use the dispatch table; other values force a path (tests reach every kernel
this way). Arguments are checked by the caller (``genknowsub_fast.backends.triton_ops``), not here: these run per call.
"""

from __future__ import annotations

import torch

from . import linear
from .dispatch import MODE_ROUTE
from .route_shrink import route_shrink as _route_shrink_launch

NAMESPACE = "genknowsub_fast"


def _overrides(regime: str, split_k: int) -> tuple[str | None, int | None]:
    return (None if regime == "auto" else regime), (None if split_k == 0 else split_k)


@torch.library.custom_op(f"{NAMESPACE}::routed_linear", mutates_args=())
def routed_linear(
    x: torch.Tensor,
    route_shrink: torch.Tensor,
    b_t: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    regime: str = "auto",
    split_k: int = 0,
) -> torch.Tensor:
    """``x Wᵀ + bias + routed delta`` (T, d_out), or the delta alone when ``weight`` is None."""
    reg, sk = _overrides(regime, split_k)
    return linear.routed_linear(
        x, route_shrink, b_t, weight, bias, num_experts, rank, top_k, temperature, mix_weights, reg, sk
    )


@routed_linear.register_fake
def _routed_linear_fake(x, route_shrink, b_t, weight, bias, num_experts, rank, top_k, temperature, mix_weights,
                        regime="auto", split_k=0):  # fmt: skip
    return x.new_empty(x.shape[0], b_t.shape[-1])


@torch.library.custom_op(f"{NAMESPACE}::route_shrink", mutates_args=())
def route_shrink(
    x: torch.Tensor,
    route_shrink: torch.Tensor,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    regime: str = "auto",
    split_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing and shrink: ``(g (T, k·r) float32, idx (T, k) int32, w (T, k) float32)``.

    g holds the mixed expand coefficients; it is (T, 0) in the grouped regime, whose shrink runs per expert later.
    """
    reg, sk = _overrides(regime, split_k)
    # d_out only sizes the expand, which this op does not run.
    plan = linear.plan_for(x, 1, num_experts, rank, top_k, reg, sk)
    return _route_shrink_launch(x, route_shrink, num_experts, rank, top_k, temperature, mix_weights, plan.route)


@route_shrink.register_fake
def _route_shrink_fake(x, route_shrink, num_experts, rank, top_k, temperature, mix_weights, regime="auto",
                       split_k=0):  # fmt: skip
    t = x.shape[0]
    reg, sk = _overrides(regime, split_k)
    # Only the regime (a function of the static shapes) decides g's width; no kernel runs here.
    plan = linear.plan_for(x, 1, num_experts, rank, top_k, reg, sk)
    kr = 0 if plan.route.mode == MODE_ROUTE else top_k * rank
    return (
        x.new_empty(t, kr, dtype=torch.float32),
        x.new_empty(t, top_k, dtype=torch.int32),
        x.new_empty(t, top_k, dtype=torch.float32),
    )


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 before their import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .route_shrink import _route_shrink_kernel

    return isinstance(_route_shrink_kernel, InterpretedFunction)
