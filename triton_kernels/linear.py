"""One routed LoRA linear: the base GEMM (cuBLAS through F.linear), then the routed delta added into its output.

The launch sequence per regime (see ``dispatch.py`` for how the regime is chosen):

- dense / gather: ``route_shrink`` (1 kernel, 2 with split-K) → ``expand_`` (1 kernel) into y;
- grouped: ``route_shrink`` in routing-only mode → ``align_pairs_by_expert`` (torch ops, no host sync) →
  ``grouped_shrink`` → ``grouped_expand_`` (atomics into y).

Nothing here reads a device value back to the host, so the sequence can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .dispatch import MODE_ROUTE, Plan, choose_plan
from .expand import expand_
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


def plan_for(
    x: torch.Tensor, d_out: int, num_experts: int, rank: int, top_k: int, regime: str | None, split_k: int | None
) -> Plan:
    """The dispatch-table plan for x (T, d_in) and this module's experts on x's device."""
    capability, num_sms = device_info(x.device)
    return choose_plan(
        x.shape[0], num_experts, rank, top_k, x.shape[1], d_out, x.dtype, capability, num_sms, regime, split_k
    )


def add_routed_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    route_shrink_rows: torch.Tensor,
    b_t: torch.Tensor,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    accumulate: bool,
    plan: Plan,
) -> torch.Tensor:
    """``y (+)= routed LoRA delta`` in place for x (T, d_in) and y (T, d_out), all contiguous; returns y.

    Without ``accumulate`` y's contents are ignored and overwritten (delta-only calls).
    """
    if x.shape[0] == 0:
        return y
    g, idx, w = route_shrink(x, route_shrink_rows, num_experts, rank, top_k, temperature, mix_weights, plan.route)
    if plan.route.mode != MODE_ROUTE:
        return expand_(y, g, idx, b_t, num_experts, rank, plan.expand, accumulate)
    gp = plan.expand.grouped
    sorted_pairs, block_expert = align_pairs_by_expert(idx, num_experts, gp.block_m)
    hw = grouped_shrink(x, route_shrink_rows, w, sorted_pairs, block_expert, num_experts, rank, gp)
    if not accumulate:
        y.zero_()  # the grouped expand only adds (atomics)
    return grouped_expand_(y, hw, w, sorted_pairs, block_expert, b_t, rank, mix_weights, gp)


def routed_linear(
    x: torch.Tensor,
    route_shrink_rows: torch.Tensor,
    b_t: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    regime: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x Wᵀ + bias + delta`` for x (T, d_in), or only the delta when ``weight`` is None (inputs already checked)."""
    t = x.shape[0]
    d_out = b_t.shape[-1]
    x, route_shrink_rows, b_t = row_major(x), row_major(route_shrink_rows), row_major(b_t)
    if weight is None:
        if bias is not None:
            raise ValueError("bias given without weight")
        y = torch.empty(t, d_out, device=x.device, dtype=x.dtype)
    else:
        y = F.linear(x, weight, bias)
    if t == 0:
        return y
    plan = plan_for(x, d_out, num_experts, rank, top_k, regime, split_k)
    return add_routed_delta_(
        y, x, route_shrink_rows, b_t, num_experts, rank, top_k, temperature, mix_weights, weight is not None, plan
    )
