"""Grouped shrink and expand: (token, slot) pairs sorted by expert, padded to blocks of BLOCK_M pairs per expert.

This is the fused-MoE idea (as in vLLM) applied to LoRA: after routing, every pair ``p = t·k + j`` goes to expert
``idx[t, j]``; sorting the pairs by expert and padding each expert's run to a multiple of BLOCK_M makes every block of
BLOCK_M pairs belong to one expert, so both the shrink ``h = x_t A_eᵀ`` and the expand ``y_t += g B_eᵀ`` are small
GEMMs with that expert's factors as the shared operand.

The alignment is done with torch ops on the device and never reads a count back to the host: the grid is sized for
the worst case (``cdiv(T·k, BLOCK_M) + min(E, T·k)`` blocks) and blocks past the last real one carry expert -1 and
return at once.

The expand adds into y with atomics because a token's k slots sit in k different expert blocks. That makes the
order of the k additions, and so the last bits of a float16/bfloat16 y, vary from run to run; the dense and gathered
expands are deterministic. Where the plan says ``fp32_accumulate`` (bfloat16 before sm_90, which has no bfloat16
atomic add) the atomics go to a zeroed float32 buffer that is then added to y in one pass.

Shrink output ``hw`` (T·k, r) float32 holds ``w_j h_j`` (the "output" mixing coefficients). With "weights" mixing
the expand forms ``g_j = w_j Σ_i hw_i`` from the k rows of the token as it loads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import GroupedPlan, cdiv
from .launch import launch


def align_pairs_by_expert(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ``idx`` (T, k) by expert and pad each expert's run to a multiple of block_m.

    Returns ``(sorted_pairs, block_expert)``: sorted_pairs (num_blocks·block_m,) int32 holds pair ids ``t·k + j``
    (padding holds T·k, an invalid id), and block_expert (num_blocks,) int32 the expert of each block (-1 for blocks
    past the end). ``num_blocks`` depends only on the shapes, so nothing here synchronises with the host.
    """
    t, k = idx.shape
    n = t * k
    dev = idx.device
    num_blocks = min(n, cdiv(n, block_m) + min(num_experts, n))
    flat = idx.reshape(-1).to(torch.int64)
    # scatter_add_ rather than bincount: bincount on CUDA reads the max back to size its output (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_m - 1)) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start_padded = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = start_padded[sorted_e] + (torch.arange(n, device=dev) - start[sorted_e])
    sorted_pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=dev, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit(do_not_specialize=["N_PAIRS", "R"])
def _grouped_shrink_kernel(
    x_ptr,
    a_ptr,
    pairs_ptr,
    bexp_ptr,
    wts_ptr,
    hw_ptr,
    N_PAIRS,
    D_IN,
    stride_x,
    stride_a,
    R,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (num_blocks,): ``hw[p] = w[p] · (A_e x_{p // k})`` for the BLOCK_M pairs p of one expert e."""
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid)
    if e < 0:
        return
    pairs = tl.load(pairs_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M))
    p_mask = pairs < N_PAIRS
    tok = (pairs // TOP_K).to(tl.int64)
    s = tl.arange(0, BLOCK_R)
    s_mask = s < R
    x_rows = x_ptr + tok[:, None] * stride_x
    a_cols = a_ptr + (e * R + s).to(tl.int64)[None, :] * stride_a
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < D_IN
        xt = tl.load(x_rows + k_offs[None, :], mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_cols + k_offs[:, None], mask=k_mask[:, None] & s_mask[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision="ieee")
    w = tl.load(wts_ptr + pairs, mask=p_mask, other=0.0)
    p64 = pairs.to(tl.int64)
    tl.store(hw_ptr + p64[:, None] * R + s[None, :], acc * w[:, None], mask=p_mask[:, None] & s_mask[None, :])


@triton.jit(do_not_specialize=["N_PAIRS", "R"])
def _grouped_expand_kernel(
    hw_ptr,
    wts_ptr,
    pairs_ptr,
    bexp_ptr,
    bt_ptr,
    y_ptr,
    N_PAIRS,
    D_OUT,
    stride_b,
    stride_y,
    R,
    TOP_K: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (num_blocks, cdiv(D_OUT, BLOCK_N)): ``y[p // k] += g_p Bᵀ_e`` for the BLOCK_M pairs p of one expert e."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_mask = pairs < N_PAIRS
    p64 = pairs.to(tl.int64)
    tok = p64 // TOP_K
    s = tl.arange(0, BLOCK_R)
    s_mask = s < R
    hmask = p_mask[:, None] & s_mask[None, :]
    if MIX_WEIGHTS:
        hs = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            hs += tl.load(hw_ptr + (tok * TOP_K + i)[:, None] * R + s[None, :], mask=hmask, other=0.0)
        coef = hs * tl.load(wts_ptr + p64, mask=p_mask, other=0.0)[:, None]
    else:
        coef = tl.load(hw_ptr + p64[:, None] * R + s[None, :], mask=hmask, other=0.0)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    b = tl.load(
        bt_ptr + (e * R + s).to(tl.int64)[:, None] * stride_b + n_offs[None, :],
        mask=s_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    acc = tl.dot(coef.to(b.dtype), b, input_precision="ieee")
    tl.atomic_add(
        y_ptr + tok[:, None] * stride_y + n_offs[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=p_mask[:, None] & n_mask[None, :],
        sem="relaxed",
    )


def grouped_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    rank: int,
    plan: GroupedPlan,
) -> torch.Tensor:
    """``hw`` (T·k, r) float32 with ``hw[t·k + j] = w[t, j] · A_{idx[t, j]} x_t``; ``a`` is (E·r, d_in), pairs from
    align_pairs_by_expert."""
    t, d_in = x.shape
    top_k = w.shape[1]
    hw = torch.empty(t * top_k, rank, device=x.device, dtype=torch.float32)
    if t == 0:
        return hw
    launch(
        _grouped_shrink_kernel,
        (block_expert.shape[0],),
        x,
        a,
        sorted_pairs,
        block_expert,
        w,
        hw,
        t * top_k,
        d_in,
        x.stride(0),
        a.stride(0),
        rank,
        TOP_K=top_k,
        BLOCK_M=plan.block_m,
        BLOCK_K=plan.block_k,
        BLOCK_R=plan.block_r,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return hw


def grouped_expand_(
    y: torch.Tensor,
    hw: torch.Tensor,
    w: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    b_t: torch.Tensor,
    rank: int,
    mix_weights: bool,
    plan: GroupedPlan,
) -> torch.Tensor:
    """``y += Σ_j g_j Bᵀ_{idx_j}`` in place (y must hold the base output or zeros), g from ``hw`` and the mixing."""
    t, d_out = y.shape
    if t == 0:
        return y
    top_k = w.shape[1]
    out = torch.zeros(t, d_out, device=y.device, dtype=torch.float32) if plan.fp32_accumulate else y
    grid = (block_expert.shape[0], cdiv(d_out, plan.block_n))
    launch(
        _grouped_expand_kernel,
        grid,
        hw,
        w,
        sorted_pairs,
        block_expert,
        b_t,
        out,
        t * top_k,
        d_out,
        b_t.stride(1),
        out.stride(0),
        rank,
        TOP_K=top_k,
        MIX_WEIGHTS=mix_weights,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_R=plan.block_r,
        num_warps=plan.num_warps,
    )
    if plan.fp32_accumulate:
        y.add_(out)  # computed in float32, rounded to y's dtype once
    return y
