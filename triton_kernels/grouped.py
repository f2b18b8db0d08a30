"""Grouped shrink and expand: (token, slot) pairs sorted by expert, padded to blocks of BLOCK_M pairs per expert.

This is the fused-MoE idea (as in vLLM) applied to LoRA: after routing, every pair ``p = t·k + j`` goes to expert
``idx[t, j]``; sorting the pairs by expert and padding each expert's run to a multiple of BLOCK_M makes every block of
BLOCK_M pairs belong to one expert, so both the shrink ``h = x_t A_eᵀ`` and the expand ``y_t += g B_eᵀ`` are small
GEMMs with that expert's factors as the shared operand.

The alignment is a counting sort in one launch of one program per token block (``_scatter_kernel``), from the
per-block counts the route pass wrote, and never reads a count back to the host: the grid of the grouped kernels is
sized for the worst case (``cdiv(T·k, BLOCK_M) + min(E, T·k)`` blocks) and blocks past the last real one carry expert
-1 and return at once.

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

from .dispatch import ACC_ELEMS_MAX, MIN_TILE, NUM_WARPS, GroupedPlan, cdiv, next_pow2
from .launch import launch

# Token blocks per tile when the scatter sums the route pass's per-block counts.
COUNTS_TILE = 8192


@triton.jit(do_not_specialize=["N", "E", "NUM_BLOCKS", "N_TBLOCKS"])
def _scatter_kernel(
    idx_ptr,
    counts_ptr,
    pairs_ptr,
    bexp_ptr,
    N,
    E,
    NUM_BLOCKS,
    N_TBLOCKS,
    PAIRS_PER_TBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TB_CHUNK: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Grid (token blocks,): the counting sort of align_pairs_by_expert, one program per token block of the route pass.

    1. from the route pass's per-block counts (N_TBLOCKS, BLOCK_E): each expert's total, padded run length and run
       start (exclusive prefix sum), and the pairs of this expert in earlier token blocks;
    2. each of this block's pairs p (in order) goes to slot run start + earlier blocks' pairs of its expert + its rank
       among this block's pairs of that expert (an exclusive cumsum of the one-hot (CHUNK, BLOCK_E) tile);
    3. program 0 also writes every block's expert (how many runs end at or before its first slot; -1 past the last
       run) and the padding slots (past a run's real pairs), with N.
    Every program redoes step 1 from the same counts (a few KiB from L2), so no program waits for another: the sort
    is one launch whose depth does not grow with T.
    """
    pid = tl.program_id(0)
    e_offs = tl.arange(0, BLOCK_E)
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, N_TBLOCKS, TB_CHUNK):
        b = b0 + tl.arange(0, TB_CHUNK)[:, None]
        c = tl.load(counts_ptr + b * BLOCK_E + e_offs[None, :], mask=b < N_TBLOCKS, other=0)
        totals += tl.sum(c, axis=0)
        before += tl.sum(tl.where(b < pid, c, 0), axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, 0)
    run_start = run_end - padded
    seen = run_start + before
    c_offs = tl.arange(0, CHUNK)
    p0 = pid * PAIRS_PER_TBLOCK
    for c0 in tl.static_range(0, PAIRS_PER_TBLOCK, CHUNK):
        p = p0 + c0 + c_offs
        # idx has whole token blocks; pairs past T hold BLOCK_E, which matches no expert column.
        ev = tl.load(idx_ptr + p, mask=c0 + c_offs < PAIRS_PER_TBLOCK, other=BLOCK_E)
        onehot = (ev[:, None] == e_offs[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot
        slot = tl.sum(onehot * (rank + seen[None, :]), axis=1)
        tl.store(pairs_ptr + slot, p, mask=ev < E)
        seen += tl.sum(onehot, axis=0)
    if pid == 0:
        real_end = run_start + totals
        m_offs = tl.arange(0, BLOCK_M)
        for b0 in range(0, NUM_BLOCKS, BLOCK_B):
            bb = b0 + tl.arange(0, BLOCK_B)
            bm = bb < NUM_BLOCKS
            first = bb * BLOCK_M
            ex = tl.sum((run_end[None, :] <= first[:, None]).to(tl.int32), axis=1)
            valid = ex < E
            tl.store(bexp_ptr + bb, tl.where(valid, ex, -1), mask=bm)
            end = tl.sum(tl.where(e_offs[None, :] == ex[:, None], real_end[None, :], 0), axis=1)
            s = first[:, None] + m_offs[None, :]
            pad = (s >= end[:, None]) | (~valid[:, None])
            tl.store(pairs_ptr + s, tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.int32) + N, mask=pad & bm[:, None])


def align_pairs_by_expert(
    idx: torch.Tensor,
    counts: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    block_m: int,
    route_block_t: int,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ``idx`` (T, k) int32 by expert and pad each expert's run to a multiple of
    block_m, with one program per token block of ``route_block_t`` tokens.

    ``idx`` has whole blocks of ``route_block_t`` rows (rows past T hold BLOCK_E) and ``counts`` (token blocks,
    BLOCK_E) int32 each token block's pairs per expert, as the route pass writes them; T is ``num_tokens``.
    Returns ``(sorted_pairs, block_expert)``: sorted_pairs (num_blocks·block_m,) int32 holds pair ids ``t·k + j`` in
    the order of the pairs within each expert (padding holds T·k, an invalid id), and block_expert (num_blocks,) int32
    the expert of each block (-1 for blocks past the end). ``num_blocks`` depends only on the shapes, so nothing here
    synchronises with the host.
    """
    k = idx.shape[1]
    n = num_tokens * k
    num_blocks = min(n, cdiv(n, block_m) + min(num_experts, n))
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=idx.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=idx.device)
    if n == 0:
        return sorted_pairs, block_expert
    n_tblocks, block_e = counts.shape
    # The block pass holds a (blocks, experts) and a (blocks, BLOCK_M) tile at once: an eighth of the accumulator
    # budget (at the full budget it spilled 268-1028 bytes on sm_90, at a quarter 52 bytes with BLOCK_M = 64).
    block_b = max(1, min(next_pow2(num_blocks), ACC_ELEMS_MAX // 8 // max(block_e, block_m)))
    launch(
        _scatter_kernel,
        (n_tblocks,),
        idx,
        counts,
        sorted_pairs,
        block_expert,
        n,
        num_experts,
        num_blocks,
        n_tblocks,
        PAIRS_PER_TBLOCK=route_block_t * k,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        TB_CHUNK=max(MIN_TILE // block_e, min(next_pow2(n_tblocks), COUNTS_TILE // block_e), 1),
        CHUNK=chunk,
        BLOCK_B=block_b,
        num_warps=NUM_WARPS,
    )
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
    layer, x: torch.Tensor, w: torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor, plan: GroupedPlan
) -> torch.Tensor:
    """``hw`` (T·k, r) float32 with ``hw[t·k + j] = w[t, j] · A_{idx[t, j]} x_t``; ``layer`` a
    :class:`~.linear.PreparedExperts` (A as (E·r, d_in)), pairs from align_pairs_by_expert."""
    a, rank = layer.a, layer.rank
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
    layer,
    y: torch.Tensor,
    hw: torch.Tensor,
    w: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    plan: GroupedPlan,
) -> torch.Tensor:
    """``y += Σ_j g_j Bᵀ_{idx_j}`` in place (y must hold the base output or zeros), g from ``hw`` and the layer's
    mixing."""
    b_t, rank, mix_weights = layer.b_t, layer.rank, layer.mix_weights
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
