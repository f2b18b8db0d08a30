"""Decode (T <= 16): a split-K shrink over many CTAs, then one expand kernel that reduces the splits, routes and adds.

1. ``_decode_shrink_kernel``, grid (k-splits, column blocks, token blocks): CTA (s, c) multiplies its slice
   ``[s·K_PER_SPLIT, (s+1)·K_PER_SPLIT)`` of d_in for column block c, and stores the float32 partial sums to the
   workspace ws (k-splits, T, WS_COLS). Columns ``[0, N_P_BLOCKS·BLOCK_C)`` are the routing scores ``x·p_e`` (p in
   float32, x converted exactly, FMA dot), the rest ``A x`` for every expert's rows ``e·r + s`` (tensor-core dot,
   float32 accumulation). At T = 1 this is ``cdiv(SMs, column blocks)`` splits: every SM reads a few tiles, instead of
   one CTA walking all of d_in.
2. ``_decode_expand_kernel``, grid (d_out blocks, token blocks): each CTA loads all splits of the score columns as one
   tile (in chunks of SPLIT_CHUNK splits) and sums them, takes the top-k and softmax, loads all splits of the k·r
   selected shrink columns the same way, applies the mixing, and adds ``Σ_j g_j Bᵀ_{idx_j}`` for its d_out block
   into y (per token gathered rows, no tl.dot: every token has its own rows). The split reduction is repeated by each
   d_out block: dispatch.py caps those bytes (WS_READ_MAX), and no third launch is needed.

With caller-given scores (tensor parallelism) the shrink computes only A x and the expand reads the (T, E) scores.
Deterministic: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import DecodePlan
from .launch import launch
from .routing import mix, slot, sum_splits, topk_softmax


@triton.jit
def _partial_dot(x_rows, t_mask, w_ptr, rows, rmask, stride_w, k_start, k_len, k_end, acc, BLOCK_K: tl.constexpr):
    """acc += x[:, k_start:k_end] · W[rows, k_start:k_end]ᵀ (k_len >= k_end - k_start), x cast to W's dtype (exact
    for float32 W). The loop runs over the scalar argument k_len, not over program-dependent bounds."""
    for dk in range(0, k_len, BLOCK_K):
        k_offs = k_start + dk + tl.arange(0, BLOCK_K)
        k_mask = k_offs < k_end
        xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(
            w_ptr + rows[None, :] * stride_w + k_offs[:, None], mask=k_mask[:, None] & rmask[None, :], other=0.0
        )
        acc = tl.dot(xt.to(wt.dtype), wt, acc, input_precision="ieee")
    return acc


@triton.jit(do_not_specialize=["T", "E", "ER", "K_PER_SPLIT", "N_P_BLOCKS", "WS_COLS"])
def _decode_shrink_kernel(
    x_ptr,
    p_ptr,
    a_ptr,
    ws_ptr,
    T,
    D_IN,
    stride_x,
    stride_p,
    stride_a,
    E,
    ER,
    K_PER_SPLIT,
    N_P_BLOCKS,
    WS_COLS,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (k-splits, N_P_BLOCKS + A blocks, token blocks). See the module docstring."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_t = tl.program_id(2)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    x_rows = x_ptr + t_offs.to(tl.int64)[:, None] * stride_x
    c = tl.arange(0, BLOCK_C)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, D_IN)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if pid_c < N_P_BLOCKS:
        rows = pid_c * BLOCK_C + c
        acc = _partial_dot(
            x_rows, t_mask, p_ptr, rows.to(tl.int64), rows < E, stride_p, k_start, K_PER_SPLIT, k_end, acc, BLOCK_K
        )
    else:
        rows = (pid_c - N_P_BLOCKS) * BLOCK_C + c
        acc = _partial_dot(
            x_rows, t_mask, a_ptr, rows.to(tl.int64), rows < ER, stride_a, k_start, K_PER_SPLIT, k_end, acc, BLOCK_K
        )
    ws_rows = ws_ptr + (pid_k * T + t_offs).to(tl.int64)[:, None] * WS_COLS
    tl.store(ws_rows + (pid_c * BLOCK_C + c)[None, :], acc, mask=t_mask[:, None])


@triton.jit(do_not_specialize=["T", "E", "R", "K_SPLITS", "A_COL0", "WS_COLS"])
def _decode_expand_kernel(
    ws_ptr,
    scores_ptr,
    bt_ptr,
    y_ptr,
    T,
    D_OUT,
    stride_b,
    stride_y,
    E,
    R,
    K_SPLITS,
    inv_temp,
    A_COL0,
    WS_COLS,
    TOP_K: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Grid (cdiv(D_OUT, BLOCK_N), token blocks). See the module docstring."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    t64 = t_offs.to(tl.int64)
    e_offs = tl.arange(0, BLOCK_E)[None, :]
    emask = t_mask[:, None] & (e_offs < E)
    if HAS_SCORES:
        scores = tl.load(scores_ptr + t64[:, None] * E + e_offs, mask=emask, other=0.0)
    else:
        e_cols = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32) + e_offs
        scores = sum_splits(ws_ptr, t_offs, e_cols, emask, T, K_SPLITS, WS_COLS, SPLIT_CHUNK)
    w, idx = topk_softmax(scores, E, inv_temp, TOP_K, BLOCK_KK)

    # The selected shrinks: column A_COL0 + idx_j·R + s of the workspace, for slot j and rank s.
    c = tl.arange(0, BLOCK_KK * BLOCK_R)[None, :]
    cj = c // BLOCK_R
    cs = c % BLOCK_R
    ecol = tl.zeros((BLOCK_T, BLOCK_KK * BLOCK_R), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        ecol = tl.where(cj == j, slot(idx, j, BLOCK_KK)[:, None], ecol)
    hmask = t_mask[:, None] & (cj < TOP_K) & (cs < R)
    h = sum_splits(ws_ptr, t_offs, A_COL0 + ecol * R + cs, hmask, T, K_SPLITS, WS_COLS, SPLIT_CHUNK)
    g3 = mix(w, tl.reshape(h, (BLOCK_T, BLOCK_KK, BLOCK_R)), MIX_WEIGHTS)

    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    s = tl.arange(0, BLOCK_R)
    j3 = tl.arange(0, BLOCK_KK)[None, :, None]
    bmask = t_mask[:, None, None] & (s < R)[None, :, None] & n_mask[None, None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        rows = (slot(idx, j, BLOCK_KK)[:, None] * R + s[None, :]).to(tl.int64)
        b = tl.load(bt_ptr + rows[:, :, None] * stride_b + n_offs[None, None, :], mask=bmask, other=0.0)
        gj = tl.sum(tl.where(j3 == j, g3, 0.0), axis=1)
        acc += tl.sum(gj[:, :, None] * b.to(tl.float32), axis=1)
    y_ptrs = y_ptr + t64[:, None] * stride_y + n_offs[None, :]
    ymask = t_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def decode_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    prototypes: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    plan: DecodePlan,
    accumulate: bool,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y (+)= routed delta`` for x (T, d_in) with the two decode kernels; returns y.

    ``prototypes`` (E, d_in) float32, ``a`` (E·r, d_in) and ``b_t`` (E, r, d_out) in x's dtype, rows unit-stride;
    ``scores`` (T, E) float32 when the caller computed them (then ``plan`` has no prototype blocks).
    """
    t, d_in = x.shape
    if t == 0:
        return y
    e, r, d_out = b_t.shape
    ws = torch.empty(plan.k_splits * t * plan.ws_cols, device=x.device, dtype=torch.float32)
    launch(
        _decode_shrink_kernel,
        plan.shrink_grid(t),
        x,
        prototypes,
        a,
        ws,
        t,
        d_in,
        x.stride(0),
        prototypes.stride(0),
        a.stride(0),
        e,
        e * r,
        plan.k_per_split,
        plan.n_p_blocks,
        plan.ws_cols,
        BLOCK_T=plan.shrink_block_t,
        BLOCK_K=plan.shrink_block_k,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
        num_stages=2,
    )
    launch(
        _decode_expand_kernel,
        plan.expand_grid(t, d_out),
        ws,
        scores if scores is not None else ws,
        b_t,
        y,
        t,
        d_out,
        b_t.stride(1),
        y.stride(0),
        e,
        r,
        plan.k_splits,
        1.0 / float(temperature),
        plan.n_p_blocks * plan.block_c,
        plan.ws_cols,
        TOP_K=top_k,
        MIX_WEIGHTS=mix_weights,
        HAS_SCORES=scores is not None,
        ACCUMULATE=accumulate,
        BLOCK_T=plan.block_t,
        BLOCK_N=plan.block_n,
        BLOCK_E=plan.block_e,
        BLOCK_R=plan.block_r,
        BLOCK_KK=plan.block_kk,
        SPLIT_CHUNK=plan.split_chunk,
        num_warps=plan.num_warps,
    )
    return y
