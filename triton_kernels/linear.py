"""One routed LoRA linear: the launch sequence of each regime (see ``dispatch.py`` for how the regime is chosen).

- decode: base GEMM (cuBLAS through F.linear) → ``decode_delta_`` (2 kernels) adds into its output;
- dense: base GEMM → route pass (1 kernel, 2 with split-K) → dense expand into y; or, with a fused-base plan, route
  pass → one kernel computing ``x Wᵀ + bias + delta`` (no cuBLAS call, y written once);
- grouped: base GEMM → route pass (routing only) → ``align_pairs_by_expert`` (torch ops, no host sync) →
  grouped shrink → grouped expand (atomics into y).

Nothing here reads a device value back to the host, so every sequence can be captured in a CUDA graph. Arguments are
not checked here: ``genknowsub_fast.backends.triton_ops.prepare`` validates a layer once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .decode import decode_delta_
from .dispatch import REGIMES, Plan, choose_plan
from .expand import expand_dense_
from .grouped import align_pairs_by_expert, grouped_expand_, grouped_shrink
from .route_shrink import route_shrink


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_info(device: torch.device) -> tuple[tuple[int, int] | None, int | None]:
    """(compute capability, SM count) of a CUDA device; (None, None) elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None, None
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are unit-stride and equally spaced (what the kernels index), else a contiguous copy.

    The kernels take one row stride per operand, so padded rows (the CPU packing pads ``b_t`` rows to an odd number
    of cache lines) are read in place; a (E, r, d_out) tensor qualifies when ``stride(0) == r·stride(1)``.
    """
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        return t.contiguous()
    return t


__all__ = ["REGIMES", "Plan", "add_delta_", "device_info", "plan_for", "routed_linear", "row_major"]


def plan_for(
    x: torch.Tensor,
    b_t: torch.Tensor,
    top_k: int,
    has_scores: bool = False,
    regime: str | None = None,
    split: int | None = None,
    fuse_base: bool | None = None,
) -> Plan:
    """The (cached) dispatch-table plan for x (T, d_in) and experts ``b_t`` (E, r, d_out) on x's device."""
    capability, num_sms = device_info(x.device)
    e, r, d_out = b_t.shape
    return choose_plan(
        x.shape[0], e, r, top_k, x.shape[1], d_out, x.dtype, capability, num_sms, has_scores, regime, split, fuse_base
    )


def add_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    prototypes: torch.Tensor,
    p_route: torch.Tensor,
    inv_scale: float,
    a: torch.Tensor,
    b_t: torch.Tensor,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    plan: Plan,
    accumulate: bool,
    scores: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y (+)= routed delta`` in place for x (T, d_in), y (T, d_out); returns y.

    ``prototypes`` (E, d_in) float32; ``p_route`` what the route pass dots against (the prototypes, or their pieces
    with ``inv_scale``: ``pieces.split_prototypes``); ``a`` (E·r, d_in); ``b_t`` (E, r, d_out). Without
    ``accumulate`` y's contents are ignored and overwritten. ``weight``/``bias`` are read only by a fused-base plan,
    which then writes ``x Wᵀ + bias + delta``.
    """
    if x.shape[0] == 0:
        return y
    e, r, _ = b_t.shape
    if plan.regime == "decode":
        return decode_delta_(y, x, prototypes, a, b_t, top_k, temperature, mix_weights, plan.decode, accumulate, scores)
    g, idx, w = route_shrink(x, p_route, inv_scale, a, e, r, top_k, temperature, mix_weights, plan.route, scores)
    if plan.regime == "dense":
        return expand_dense_(y, g, idx, b_t, plan.expand, accumulate, x, weight, bias)
    gp = plan.grouped
    sorted_pairs, block_expert = align_pairs_by_expert(idx, e, gp.block_m)
    hw = grouped_shrink(x, a, w, sorted_pairs, block_expert, r, gp)
    if not accumulate:
        y.zero_()  # the grouped expand only adds (atomics)
    return grouped_expand_(y, hw, w, sorted_pairs, block_expert, b_t, r, mix_weights, gp)


def routed_linear(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    p_route: torch.Tensor,
    inv_scale: float,
    a: torch.Tensor,
    b_t: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    plan: Plan,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + bias + delta`` for x (T, d_in), or only the delta when ``weight`` is None (arguments already valid)."""
    fused = weight is not None and plan.expand is not None and plan.expand.fuse_base
    if fused and weight.stride(-1) != 1:
        # The fused-base kernel reads W (d_out, d_in) by rows with unit stride; a transposed weight (GPT-2 Conv1D's
        # Wᵀ, a view) takes the table's plan without fusion: cuBLAS for the base, then the plain expand.
        plan = plan_for(x, b_t, top_k, scores is not None, plan.regime, plan.route.split_k, False)
        fused = False
    if weight is None or fused:
        y = torch.empty(x.shape[0], b_t.shape[-1], device=x.device, dtype=x.dtype)
    else:
        y = F.linear(x, weight, bias)
    if x.shape[0] == 0:
        return y.zero_() if fused else y
    return add_delta_(
        y, x, prototypes, p_route, inv_scale, a, b_t, top_k, temperature, mix_weights, plan, weight is not None,
        scores, weight, bias,
    )  # fmt: skip
