"""Route pass of the dense and grouped regimes (T > 16): one pass over x against the prototype pieces and A.

Per block of BLOCK_T tokens the kernel accumulates, in float32 for any input dtype,

- the routing scores ``x·p_e``: for 16-bit layers a GEMM loop over the compute-dtype pieces ``q_0 + q_1 + q_2 = s·p``
  of the float32 prototypes, interleaved along K (``pieces.py``), into one accumulator, times 1/s at the end; float32
  layers dot against the float32 prototypes directly;
- in mode DENSE also ``S_a = x A_allᵀ`` (BLOCK_T, BLOCK_EA·BLOCK_R): every expert's shrink, from the same x tiles.

Then, in the epilogue: top-k of ``|scores|`` (ties to the lower index), softmax of ``top/temperature`` over the k,
and (mode DENSE) the dense expand coefficients C (T, NA) in the compute dtype: S_a times each token's routing weight
on its selected experts' columns (zero elsewhere), with the mixing applied. The dense expand then adds ``C · Bᵀ`` as
one more K range of a GEMM ([x | C]·[W | Bᵀ], ``expand.py``). Mode ROUTE writes only the routing, and each token
block's count of (token, slot) pairs per expert, which the grouped regime's scatter sorts by (``grouped.py``); the
grouped kernels do the shrink.

Phases (one kernel, one epilogue): PHASE 0 runs all of d_in and the epilogue. With few token blocks the pass is split
over d_in: PHASE 1 programs (grid (token blocks, splits)) store float32 partial sums to ws (splits, T, NW), and one
PHASE 2 program per token block loads them a few splits per tile (SCORE_CHUNK for the scores, SPLIT_CHUNK for S_a),
sums, and runs the epilogue.

Column layout of the A part: column ``e·BLOCK_R + s`` holds expert e's rank-slot s (BLOCK_R = next power of two of r,
BLOCK_EA = next power of two of E, at least 16 / BLOCK_R so the tl.dot N dimension is >= 16); C has the same
columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import MODE_DENSE, RoutePlan, cdiv
from .launch import launch
from .routing import slot, sum_splits, topk_softmax

_DENSE: tl.constexpr = tl.constexpr(MODE_DENSE)


@triton.jit
def _accumulate(
    x_rows,
    t_mask,
    p_ptr,
    a_ptr,
    stride_p,
    stride_a,
    E,
    R,
    D_IN,
    k_start,
    K_PER_SPLIT,
    inv_scale,
    MODE: tl.constexpr,
    PIECES: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NA: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """(scores (BLOCK_T, BLOCK_E), S_a (BLOCK_T, NA)) over d_in range [k_start, k_start + K_PER_SPLIT), float32.

    The pieces are interleaved along K in blocks of BLOCK_K (``pieces.py``), so the score loop is a plain GEMM loop
    over PIECES·K_PER_SPLIT columns with one tile per step, into one (BLOCK_T, BLOCK_E) accumulator (holding the
    pieces in separate accumulators, or side by side in one tile, spilled 68-600 bytes on sm_90). Every product is
    exact, so the accumulator holds a float32 sum of x·q_j terms: x·(s·p). The A part follows in its own loop.
    k_start and K_PER_SPLIT are multiples of BLOCK_K (K_PER_SPLIT a specialised integer), and the only K mask is
    ``k < D_IN``: the compiler sees aligned, mask-uniform 16-byte groups when D_IN and the strides allow them.
    """
    e_offs = tl.arange(0, BLOCK_E)
    p_cols = p_ptr + e_offs.to(tl.int64)[None, :] * stride_p
    p_mask = e_offs[None, :] < E
    c = tl.arange(0, NA)
    ce = c // BLOCK_R
    cs = c % BLOCK_R
    a_cols = a_ptr + (ce * R + cs).to(tl.int64)[None, :] * stride_a
    a_mask = (ce[None, :] < E) & (cs[None, :] < R)
    acc_p = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_T, NA), dtype=tl.float32)
    kb = tl.arange(0, BLOCK_K)
    if not HAS_SCORES:
        for step in range(0, PIECES * K_PER_SPLIT, BLOCK_K):
            k_offs = k_start + (step // (PIECES * BLOCK_K)) * BLOCK_K + kb
            k_mask = k_offs < D_IN
            xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            pt = tl.load(p_cols + (k_start * PIECES + step + kb)[:, None], mask=k_mask[:, None] & p_mask, other=0.0)
            acc_p = tl.dot(xt.to(pt.dtype), pt, acc_p, input_precision="ieee")
    if MODE == _DENSE:
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            k_offs = k0 + kb
            k_mask = k_offs < D_IN
            xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_cols + k_offs[:, None], mask=k_mask[:, None] & a_mask, other=0.0)
            acc_a = tl.dot(xt, at, acc_a, input_precision="ieee")
    return acc_p * inv_scale, acc_a


@triton.jit(do_not_specialize=["T", "E", "R", "K_SPLITS"])
def _route_shrink_kernel(
    x_ptr,
    p_ptr,
    a_ptr,
    scores_ptr,
    c_ptr,
    idx_ptr,
    wts_ptr,
    ws_ptr,
    scratch_ptr,
    counts_ptr,
    T,
    D_IN,
    stride_x,
    stride_p,
    stride_a,
    E,
    R,
    K_PER_SPLIT,
    K_SPLITS,
    inv_temp,
    inv_scale,
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    PHASE: tl.constexpr,
    PIECES: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    SCORE_CHUNK: tl.constexpr,
    COUNT_PAIRS: tl.constexpr,
):
    """Grid (token blocks, splits in PHASE 1 else 1). See the module docstring."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    NA: tl.constexpr = BLOCK_EA * BLOCK_R if MODE == _DENSE else 16  # 16: an unused placeholder in mode ROUTE
    NW: tl.constexpr = BLOCK_E + NA
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    t64 = t_offs.to(tl.int64)
    e_cols = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32) + tl.arange(0, BLOCK_E)[None, :]
    a_cols = tl.zeros((BLOCK_T, NA), dtype=tl.int32) + tl.arange(0, NA)[None, :]
    if PHASE == 2:
        scores = sum_splits(ws_ptr, t_offs, e_cols, t_mask[:, None], T, K_SPLITS, NW, SCORE_CHUNK)
        if MODE == _DENSE:
            acc_a = sum_splits(ws_ptr, t_offs, BLOCK_E + a_cols, t_mask[:, None], T, K_SPLITS, NW, SPLIT_CHUNK)
        else:
            acc_a = tl.zeros((BLOCK_T, NA), dtype=tl.float32)
    else:
        scores, acc_a = _accumulate(
            x_ptr + t64[:, None] * stride_x, t_mask, p_ptr, a_ptr, stride_p, stride_a, E, R, D_IN,
            pid_k * K_PER_SPLIT, K_PER_SPLIT, inv_scale, MODE, PIECES, HAS_SCORES, BLOCK_T, BLOCK_K, BLOCK_E, NA,
            BLOCK_R,
        )  # fmt: skip
    if PHASE == 1:
        ws_rows = ws_ptr + (pid_k * T + t_offs).to(tl.int64)[:, None] * NW
        tl.store(ws_rows + e_cols, scores, mask=t_mask[:, None])
        if MODE == _DENSE:
            tl.store(ws_rows + BLOCK_E + a_cols, acc_a, mask=t_mask[:, None])
    else:
        if HAS_SCORES:
            emask = t_mask[:, None] & (e_cols < E)
            scores = tl.load(scores_ptr + t64[:, None] * E + e_cols, mask=emask, other=0.0)
        w, top_i = topk_softmax(scores, E, inv_temp, TOP_K, BLOCK_KK)
        slots = tl.arange(0, BLOCK_KK)[None, :]
        kmask = t_mask[:, None] & (slots < TOP_K)
        if COUNT_PAIRS:
            # idx has a row for every token of the last block: rows past T hold BLOCK_E (no expert), so the scatter
            # reads whole blocks of pairs without a mask on T.
            tl.store(idx_ptr + t64[:, None] * TOP_K + slots, tl.where(t_mask[:, None], top_i, BLOCK_E),
                     mask=slots < TOP_K)  # fmt: skip
        else:
            tl.store(idx_ptr + t64[:, None] * TOP_K + slots, top_i, mask=kmask)
        tl.store(wts_ptr + t64[:, None] * TOP_K + slots, w, mask=kmask)
        if COUNT_PAIRS:
            # This token block's (token, slot) pairs per expert, for the scatter of the grouped regime (grouped.py).
            flat = tl.reshape(top_i, (BLOCK_T * BLOCK_KK,))
            counts = tl.histogram(flat, BLOCK_E, mask=tl.reshape(kmask, (BLOCK_T * BLOCK_KK,)))
            tl.store(counts_ptr + pid_t * BLOCK_E + tl.arange(0, BLOCK_E), counts)
        if MODE == _DENSE:
            # The dense expand coefficients C (T, NA): column e·BLOCK_R + s holds w_e·h_{e,s} for a selected expert
            # e ("output" mixing) or w_e·Σ_i w_i h_{i,s} ("weights"), zero for the others; the expand multiplies them
            # with all of Bᵀ as one more K range of a GEMM. wexp spreads each token's k weights over its experts'
            # columns in S_a's own layout, so the epilogue holds no second copy of S_a.
            ce = a_cols // BLOCK_R
            wexp = tl.zeros((BLOCK_T, NA), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                ej = slot(top_i, j, BLOCK_KK)
                wj = slot(w, j, BLOCK_KK)
                wexp += tl.where(ce == ej[:, None], wj[:, None], 0.0)
            if MIX_WEIGHTS:
                # hs[t, s] = Σ_e w_e h[t, e, s], spread back over every selected expert's slot s: the weighted block
                # goes through an L2 scratch row and comes back as a (BLOCK_T, BLOCK_EA, BLOCK_R) tile, whose layout
                # the loads choose (reshaping the register block instead spilled 80-200 bytes on sm_90, and one-hot
                # FMA dots over the 256 columns spilled a kilobyte). The barrier makes every thread's stores visible
                # to the whole program before the loads.
                rows = scratch_ptr + t64[:, None] * NA
                tl.store(rows + a_cols, acc_a * wexp, mask=t_mask[:, None])
                tl.debug_barrier()
                # Chunks of EC experts: (BLOCK_T, EC, BLOCK_R) tiles of at most 2048 elements.
                EC: tl.constexpr = max(1, min(BLOCK_EA, 2048 // (BLOCK_T * BLOCK_R)))
                s3 = tl.arange(0, BLOCK_R)[None, None, :]
                m3 = t_mask[:, None, None]
                hs = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                for e0 in range(0, BLOCK_EA, EC):  # a loop, not unrolled: one chunk's registers at a time
                    e3 = e0 + tl.arange(0, EC)[None, :, None]
                    hs += tl.sum(tl.load(scratch_ptr + t64[:, None, None] * NA + e3 * BLOCK_R + s3, mask=m3,
                                         other=0.0), axis=1)  # fmt: skip
                for e0 in range(0, BLOCK_EA, EC):
                    e2 = e0 + tl.arange(0, EC)[None, :]
                    wsel = tl.zeros((BLOCK_T, EC), dtype=tl.float32)
                    for j in tl.static_range(TOP_K):
                        wsel += tl.where(e2 == slot(top_i, j, BLOCK_KK)[:, None], slot(w, j, BLOCK_KK)[:, None], 0.0)
                    c3 = c_ptr + t64[:, None, None] * NA + (e0 + tl.arange(0, EC)[None, :, None]) * BLOCK_R + s3
                    tl.store(c3, (wsel[:, :, None] * hs[:, None, :]).to(c_ptr.dtype.element_ty), mask=m3)
            else:
                tl.store(c_ptr + t64[:, None] * NA + a_cols, (acc_a * wexp).to(c_ptr.dtype.element_ty),
                         mask=t_mask[:, None])  # fmt: skip


def route_shrink(
    layer, x: torch.Tensor, plan: RoutePlan, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the route pass for x (T, d_in); returns ``(c, idx, w, counts)``.

    ``layer`` is a :class:`~.linear.PreparedExperts` (prototype pieces, A, routing options). c (T, NA) in x's dtype
    holds the dense expand coefficients (mode DENSE, see the kernel's epilogue; (T, 0) in mode ROUTE), idx (T, k)
    int32 the experts (whole token blocks of rows in mode ROUTE, see the kernel), w (T, k) float32 the routing
    weights, counts (token blocks, BLOCK_E) int32 each token block's pairs per expert (``plan.count_pairs``, else
    None). ``scores`` (T, E) float32: caller-computed routing scores (then the prototypes are not read).
    """
    t, d_in = x.shape
    top_k = layer.top_k
    dev = x.device
    c = torch.empty(t, plan.na, device=dev, dtype=x.dtype)
    n_tblocks = cdiv(t, plan.block_t)
    rows = n_tblocks * plan.block_t if plan.count_pairs else t  # the scatter reads whole token blocks of idx
    idx = torch.empty(rows, top_k, device=dev, dtype=torch.int32)
    w = torch.empty(t, top_k, device=dev, dtype=torch.float32)
    counts = torch.empty(n_tblocks, plan.block_e, device=dev, dtype=torch.int32) if plan.count_pairs else None
    if t == 0:
        return c, idx, w, counts
    k_per_split = cdiv(cdiv(d_in, plan.split_k), plan.block_k) * plan.block_k
    split_k = cdiv(d_in, k_per_split)
    na = plan.na
    nw = plan.block_e + (na if plan.mode == MODE_DENSE else 16)
    ws = torch.empty(split_k * t * nw if split_k > 1 else 1, device=dev, dtype=torch.float32)
    p_route = layer.p_route
    # Scratch rows for the "weights" mixing epilogue only.
    scratch = torch.empty(t * na if na and layer.mix_weights else 1, device=dev, dtype=torch.float32)
    args = (x, p_route, layer.a, scores if scores is not None else w, c if na else x, idx, w, ws, scratch)
    args += (counts if counts is not None else idx, t, d_in, x.stride(0), p_route.stride(0), layer.a.stride(0))
    args += (layer.num_experts, layer.rank, k_per_split, split_k, 1.0 / layer.temperature, float(layer.inv_scale))
    dense = plan.mode == MODE_DENSE
    common = dict(
        TOP_K=top_k,
        MODE=plan.mode,
        MIX_WEIGHTS=layer.mix_weights and dense,
        PIECES=plan.pieces,
        HAS_SCORES=scores is not None,
        BLOCK_T=plan.block_t,
        BLOCK_K=plan.block_k,
        BLOCK_E=plan.block_e,
        BLOCK_EA=plan.block_ea if dense else 1,  # the shrink block exists in mode DENSE only
        BLOCK_R=plan.block_r if dense else 16,
        BLOCK_KK=plan.block_kk,
        SPLIT_CHUNK=plan.split_chunk,
        SCORE_CHUNK=plan.score_chunk,
        COUNT_PAIRS=plan.count_pairs,
        num_warps=plan.num_warps,
    )
    # Constexprs a phase does not read are passed as fixed values, so a phase compiles once for all the values it
    # ignores: PHASE 1 has no epilogue, PHASE 2 no K loop.
    no_epilogue = dict(TOP_K=1, MIX_WEIGHTS=False, BLOCK_KK=1, SPLIT_CHUNK=1, SCORE_CHUNK=1, COUNT_PAIRS=False)
    no_k_loop = dict(PIECES=1, BLOCK_K=16)
    phases = ((1, (n_tblocks, split_k)), (2, (n_tblocks, 1))) if split_k > 1 else ((0, (n_tblocks, 1)),)
    for phase, grid in phases:
        kw = {**common, **(no_epilogue if phase == 1 else no_k_loop if phase == 2 else {})}
        stages = plan.num_stages if phase != 2 else 1
        launch(_route_shrink_kernel, grid, *args, PHASE=phase, num_stages=stages, **kw)
    return c, idx, w, counts
