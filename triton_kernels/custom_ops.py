"""The Triton path as a ``torch.library`` custom op, so torch.compile treats it as one opaque call and CUDA graphs
capture it (the implementation never synchronises with the host).

``torch.ops.genknowsub_fast.routed_linear(x, prototypes, p_route, inv_scale, a, b_t, weight, bias, scores, top_k,
temperature, mix_weights, regime="auto", split=0, fuse_base=-1) -> y``

The tensors are a prepared layer's (``genknowsub_fast.backends.triton_ops.TritonLayer``): prototypes (E, d_in)
float32, p_route (their pieces, or the prototypes), a (E·r, d_in), b_t (E, r, d_out). ``regime="auto"``, ``split=0``
and ``fuse_base=-1`` use the dispatch table; other values force a path (tests reach every kernel this way). Nothing
is checked here: this runs per call, and the layer was validated once when prepared.
"""

from __future__ import annotations

import torch

from . import linear

NAMESPACE = "genknowsub_fast"


def overrides(regime: str, split: int, fuse_base: int) -> tuple[str | None, int | None, bool | None]:
    """The op's sentinel arguments as ``plan_for`` overrides (None: the table decides)."""
    fuse = None if fuse_base < 0 else bool(fuse_base)
    return (None if regime == "auto" else regime), (None if split == 0 else split), fuse


@torch.library.custom_op(f"{NAMESPACE}::routed_linear", mutates_args=())
def routed_linear(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    p_route: torch.Tensor,
    inv_scale: float,
    a: torch.Tensor,
    b_t: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scores: torch.Tensor | None,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    regime: str = "auto",
    split: int = 0,
    fuse_base: int = -1,
) -> torch.Tensor:
    """``x Wᵀ + bias + routed delta`` (T, d_out), or the delta alone when ``weight`` is None."""
    plan = linear.plan_for(x, b_t, top_k, scores is not None, *overrides(regime, split, fuse_base))
    return linear.routed_linear(
        x, prototypes, p_route, inv_scale, a, b_t, weight, bias, top_k, temperature, mix_weights, plan, scores
    )


@routed_linear.register_fake
def _routed_linear_fake(x, prototypes, p_route, inv_scale, a, b_t, weight, bias, scores, top_k, temperature,
                        mix_weights, regime="auto", split=0, fuse_base=-1):  # fmt: skip
    return x.new_empty(x.shape[0], b_t.shape[-1])


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 before their import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .decode import _decode_shrink_kernel

    return isinstance(_decode_shrink_kernel, InterpretedFunction)
