"""Route + shrink: one pass over x against the stacked ``[P ; A_all]`` rows of ``PackedExperts.route_shrink``.

Per block of BLOCK_T tokens the kernel accumulates, in float32 for any input dtype,

- ``S_p = x Pᵀ`` (BLOCK_T, BLOCK_E): the routing logits before ``|·|``;
- in mode DENSE also ``S_a = x A_allᵀ`` (BLOCK_T, BLOCK_EA·BLOCK_R): every expert's shrink, from the same x tiles.

Then, in the epilogue: ``|S_p|``, top-k (ties to the lower index), softmax of ``top/temperature`` over the k, and the
selected experts' shrinks ``h_j`` (mode DENSE: picked out of ``S_a``; mode GATHER: a second pass over x against only the
k·r selected A rows of each token; mode ROUTE: none, the grouped shrink in ``grouped.py`` does them). The expand
coefficients written to ``g`` (T, k·r) float32 already include the mixing:

- ``mixing="output"``:  ``g_j = w_j h_j``
- ``mixing="weights"``: ``g_j = w_j Σ_i w_i h_i``  (so ``Σ_j Bᵀ_{idx_j} g_j = (Σ_j w_j s B_j)(Σ_i w_i A_i x)``)

The scaling s is folded into ``b_t`` at pack time, so it never appears here.

Split-K (decode): with few token blocks a single program per block would read all of ``[P ; A]`` through one SM. With
SPLIT_K > 1 the grid is (token blocks, SPLIT_K); each program stores its partial sums to a float32 workspace
(SPLIT_K, T, NW) and ``_route_epilogue_kernel`` adds them up and runs the same epilogue.

Column layout of the A part: column ``e·BLOCK_R + s`` holds expert e's rank-slot s (BLOCK_R = next power of two of r,
BLOCK_EA = next power of two of E, at least 16 / BLOCK_R so the tl.dot N dimension is >= 16; the logits block BLOCK_E
is itself at least 16), so ``S_a`` reshapes to (BLOCK_T, BLOCK_EA, BLOCK_R) and picking expert e is a masked sum over
the middle axis.
The same padded layout (``j·BLOCK_R + s``) is used for the k selected slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import MODE_DENSE, MODE_GATHER, MODE_ROUTE, RoutePlan
from .launch import launch

# Kernel-side copies of the mode numbers (Triton needs globals used in @triton.jit code to be constexpr).
_DENSE: tl.constexpr = tl.constexpr(MODE_DENSE)
_GATHER: tl.constexpr = tl.constexpr(MODE_GATHER)
_ROUTE: tl.constexpr = tl.constexpr(MODE_ROUTE)


@triton.jit
def _topk_softmax(acc_p, E, inv_temp, TOP_K: tl.constexpr, BLOCK_KK: tl.constexpr):
    """Top-k of ``|acc_p|`` per row (ties to the lower index) and the softmax of ``top·inv_temp`` over the k.

    Returns (weights (BLOCK_T, BLOCK_KK) float32, indices (BLOCK_T, BLOCK_KK) int32); slots >= TOP_K hold 0.
    tl.topk returns values only, so each of the k rounds takes the row max, then the smallest column index holding it
    (this is what sends ties to the lower expert index), then knocks that column out.
    """
    BLOCK_T: tl.constexpr = acc_p.shape[0]
    BLOCK_E: tl.constexpr = acc_p.shape[1]
    cols = tl.arange(0, BLOCK_E)[None, :]
    slots = tl.arange(0, BLOCK_KK)[None, :]
    logits = tl.abs(acc_p)
    # NaN (from a NaN in x) would match no column below and yield index BLOCK_E; map it to 0 so the index stays valid
    # (the output is NaN anyway: the shrink of that token carries the NaN). Padding columns get -1 < every |logit|.
    logits = tl.where(logits == logits, logits, 0.0)
    logits = tl.where(cols < E, logits, -1.0)
    top_v = tl.zeros((BLOCK_T, BLOCK_KK), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_KK), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        m = tl.max(logits, axis=1)
        sel = tl.min(tl.where(logits == m[:, None], cols, BLOCK_E), axis=1)
        sel = tl.minimum(sel, E - 1)
        top_v = tl.where(slots == j, m[:, None], top_v)
        top_i = tl.where(slots == j, sel[:, None], top_i)
        logits = tl.where(cols == sel[:, None], -2.0, logits)
    # Slot 0 holds the row max, so exp() arguments are <= 0.
    m0 = tl.max(tl.where(slots == 0, top_v, -float("inf")), axis=1)
    p = tl.exp((top_v - m0[:, None]) * inv_temp)
    p = tl.where(slots < TOP_K, p, 0.0)
    w = p / tl.sum(p, axis=1)[:, None]
    return w, top_i


@triton.jit
def _route_epilogue(
    acc_p,
    acc_a,
    t_offs,
    t_mask,
    x_ptr,
    rs_ptr,
    g_ptr,
    idx_ptr,
    wts_ptr,
    D_IN,
    stride_x,
    stride_w,
    E,
    R,
    inv_temp,
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    GATHER_BLOCK_K: tl.constexpr,
):
    """Top-k + softmax, then (modes DENSE/GATHER) the selected shrinks and the mixed coefficients, and the stores."""
    BLOCK_T: tl.constexpr = acc_p.shape[0]
    w, top_i = _topk_softmax(acc_p, E, inv_temp, TOP_K, BLOCK_KK)
    t64 = t_offs.to(tl.int64)
    slots = tl.arange(0, BLOCK_KK)[None, :]
    kmask = t_mask[:, None] & (slots < TOP_K)
    tl.store(idx_ptr + t64[:, None] * TOP_K + slots, top_i, mask=kmask)
    tl.store(wts_ptr + t64[:, None] * TOP_K + slots, w, mask=kmask)
    if MODE != _ROUTE:
        s3 = tl.arange(0, BLOCK_R)[None, None, :]
        j3 = tl.arange(0, BLOCK_KK)[None, :, None]
        if MODE == _DENSE:
            acc3 = tl.reshape(acc_a, (BLOCK_T, BLOCK_EA, BLOCK_R))
            e3 = tl.arange(0, BLOCK_EA)[None, :, None]
            h3 = tl.zeros((BLOCK_T, BLOCK_KK, BLOCK_R), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                ej = tl.sum(tl.where(slots == j, top_i, 0), axis=1)
                hj = tl.sum(tl.where(e3 == ej[:, None, None], acc3, 0.0), axis=1)
                h3 = tl.where(j3 == j, hj[:, None, :], h3)
        else:
            # GATHER: h = (selected A rows) · x, a second pass over x. Column c = j·BLOCK_R + s of the compact block
            # reads row E + idx_j·R + s of route_shrink. Plain multiply-add (no tl.dot): every token has its own rows.
            c = tl.arange(0, BLOCK_KK * BLOCK_R)
            cj = c // BLOCK_R
            cs = c % BLOCK_R
            ecol = tl.zeros((BLOCK_T, BLOCK_KK * BLOCK_R), dtype=tl.int32)
            for j in tl.static_range(TOP_K):
                ej = tl.sum(tl.where(slots == j, top_i, 0), axis=1)
                ecol = tl.where(cj[None, :] == j, ej[:, None], ecol)
            rows = (E + ecol * R + cs[None, :]).to(tl.int64)
            rmask = t_mask[:, None] & (cj[None, :] < TOP_K) & (cs[None, :] < R)
            x_rows = x_ptr + t64[:, None] * stride_x
            hacc = tl.zeros((BLOCK_T, BLOCK_KK * BLOCK_R), dtype=tl.float32)
            for k0 in range(0, D_IN, GATHER_BLOCK_K):
                k_offs = k0 + tl.arange(0, GATHER_BLOCK_K)
                k_mask = k_offs < D_IN
                a = tl.load(
                    rs_ptr + rows[:, :, None] * stride_w + k_offs[None, None, :],
                    mask=rmask[:, :, None] & k_mask[None, None, :],
                    other=0.0,
                )
                xv = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
                hacc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[:, None, :], axis=2)
            h3 = tl.reshape(hacc, (BLOCK_T, BLOCK_KK, BLOCK_R))
        w3 = w[:, :, None]
        if MIX_WEIGHTS:
            hs = tl.sum(w3 * h3, axis=1)
            g3 = w3 * hs[:, None, :]
        else:
            g3 = w3 * h3
        t3 = t64[:, None, None]
        gmask = t_mask[:, None, None] & (j3 < TOP_K) & (s3 < R)
        tl.store(g_ptr + t3 * (TOP_K * R) + j3 * R + s3, g3, mask=gmask)


@triton.jit(do_not_specialize=["T", "E", "R", "K_PER_SPLIT"])
def _route_shrink_kernel(
    x_ptr,
    rs_ptr,
    g_ptr,
    idx_ptr,
    wts_ptr,
    ws_ptr,
    T,
    D_IN,
    stride_x,
    stride_w,
    E,
    R,
    K_PER_SPLIT,
    inv_temp,
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    STORE_PARTIAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    GATHER_BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), SPLIT_K). See the module docstring."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    x_rows = x_ptr + t_offs.to(tl.int64)[:, None] * stride_x
    e_offs = tl.arange(0, BLOCK_E)
    p_cols = rs_ptr + e_offs.to(tl.int64)[None, :] * stride_w
    p_mask = e_offs[None, :] < E
    acc_p = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if MODE == _DENSE:
        c = tl.arange(0, BLOCK_EA * BLOCK_R)
        ce = c // BLOCK_R
        cs = c % BLOCK_R
        a_cols = rs_ptr + (E + ce * R + cs).to(tl.int64)[None, :] * stride_w
        a_mask = (ce[None, :] < E) & (cs[None, :] < R)
        acc_a = tl.zeros((BLOCK_T, BLOCK_EA * BLOCK_R), dtype=tl.float32)
    else:
        acc_a = tl.zeros((BLOCK_T, 16), dtype=tl.float32)  # unused placeholder
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, D_IN)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < k_end
        xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        pt = tl.load(p_cols + k_offs[:, None], mask=k_mask[:, None] & p_mask, other=0.0)
        acc_p = tl.dot(xt, pt, acc_p, input_precision="ieee")
        if MODE == _DENSE:
            at = tl.load(a_cols + k_offs[:, None], mask=k_mask[:, None] & a_mask, other=0.0)
            acc_a = tl.dot(xt, at, acc_a, input_precision="ieee")
    if STORE_PARTIAL:
        NW: tl.constexpr = BLOCK_E + BLOCK_EA * BLOCK_R if MODE == _DENSE else BLOCK_E
        ws_rows = ws_ptr + (pid_k * T + t_offs).to(tl.int64)[:, None] * NW
        tl.store(ws_rows + e_offs[None, :], acc_p, mask=t_mask[:, None])
        if MODE == _DENSE:
            tl.store(ws_rows + BLOCK_E + c[None, :], acc_a, mask=t_mask[:, None])
    else:
        _route_epilogue(
            acc_p,
            acc_a,
            t_offs,
            t_mask,
            x_ptr,
            rs_ptr,
            g_ptr,
            idx_ptr,
            wts_ptr,
            D_IN,
            stride_x,
            stride_w,
            E,
            R,
            inv_temp,
            TOP_K,
            MODE,
            MIX_WEIGHTS,
            BLOCK_EA,
            BLOCK_R,
            BLOCK_KK,
            GATHER_BLOCK_K,
        )


@triton.jit(do_not_specialize=["T", "E", "R", "SPLIT_K"])
def _route_epilogue_kernel(
    ws_ptr,
    x_ptr,
    rs_ptr,
    g_ptr,
    idx_ptr,
    wts_ptr,
    T,
    D_IN,
    stride_x,
    stride_w,
    E,
    R,
    inv_temp,
    SPLIT_K,
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    GATHER_BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): add the SPLIT_K partial sums of ``_route_shrink_kernel`` and run the epilogue."""
    pid_t = tl.program_id(0)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    e_offs = tl.arange(0, BLOCK_E)
    NW: tl.constexpr = BLOCK_E + BLOCK_EA * BLOCK_R if MODE == _DENSE else BLOCK_E
    acc_p = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if MODE == _DENSE:
        c = tl.arange(0, BLOCK_EA * BLOCK_R)
        acc_a = tl.zeros((BLOCK_T, BLOCK_EA * BLOCK_R), dtype=tl.float32)
    else:
        acc_a = tl.zeros((BLOCK_T, 16), dtype=tl.float32)  # unused placeholder
    for split in range(0, SPLIT_K):
        ws_rows = ws_ptr + (split * T + t_offs).to(tl.int64)[:, None] * NW
        acc_p += tl.load(ws_rows + e_offs[None, :], mask=t_mask[:, None], other=0.0)
        if MODE == _DENSE:
            acc_a += tl.load(ws_rows + BLOCK_E + c[None, :], mask=t_mask[:, None], other=0.0)
    _route_epilogue(
        acc_p,
        acc_a,
        t_offs,
        t_mask,
        x_ptr,
        rs_ptr,
        g_ptr,
        idx_ptr,
        wts_ptr,
        D_IN,
        stride_x,
        stride_w,
        E,
        R,
        inv_temp,
        TOP_K,
        MODE,
        MIX_WEIGHTS,
        BLOCK_EA,
        BLOCK_R,
        BLOCK_KK,
        GATHER_BLOCK_K,
    )


def route_shrink(
    x: torch.Tensor,
    route_shrink_rows: torch.Tensor,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    plan: RoutePlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch route + shrink for x (T, d_in) against ``route_shrink_rows`` (E + E·r, d_in) (rows unit-stride).

    Returns ``(g, idx, w)``: the expand coefficients g (T, k·r) float32 with the mixing applied (modes "dense" and
    "gather"; in mode "route" g is an empty (T, 0) tensor), the expert indices idx (T, k) int32 and the routing
    weights w (T, k) float32. ``plan`` (from :func:`dispatch.choose_plan`) fixes the mode and block sizes.
    """
    t, d_in = x.shape
    e, r = num_experts, rank
    kr = top_k * r if plan.mode != MODE_ROUTE else 0
    g = torch.empty(t, kr, device=x.device, dtype=torch.float32)
    idx = torch.empty(t, top_k, device=x.device, dtype=torch.int32)
    w = torch.empty(t, top_k, device=x.device, dtype=torch.float32)
    if t == 0:
        return g, idx, w
    # K range per split: a multiple of BLOCK_K so every split but the last runs full tiles; rounding up may leave
    # fewer non-empty splits than asked for, and only those are launched.
    k_per_split = triton.cdiv(triton.cdiv(d_in, plan.split_k), plan.block_k) * plan.block_k
    split_k = triton.cdiv(d_in, k_per_split)
    n_tblocks = triton.cdiv(t, plan.block_t)
    nw = plan.block_e + (plan.block_ea * plan.block_r if plan.mode == MODE_DENSE else 0)
    ws = torch.empty(split_k * t * nw if split_k > 1 else 1, device=x.device, dtype=torch.float32)
    common = dict(
        TOP_K=top_k,
        MODE=plan.mode,
        MIX_WEIGHTS=mix_weights,
        BLOCK_T=plan.block_t,
        BLOCK_E=plan.block_e,
        BLOCK_EA=plan.block_ea,
        BLOCK_R=plan.block_r,
        BLOCK_KK=plan.block_kk,
        GATHER_BLOCK_K=plan.gather_block_k,
    )
    inv_temp = 1.0 / float(temperature)
    launch(
        _route_shrink_kernel,
        (n_tblocks, split_k),
        x,
        route_shrink_rows,
        g,
        idx,
        w,
        ws,
        t,
        d_in,
        x.stride(0),
        route_shrink_rows.stride(0),
        e,
        r,
        k_per_split,
        inv_temp,
        STORE_PARTIAL=split_k > 1,
        BLOCK_K=plan.block_k,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **common,
    )
    if split_k > 1:
        launch(
            _route_epilogue_kernel,
            (n_tblocks,),
            ws,
            x,
            route_shrink_rows,
            g,
            idx,
            w,
            t,
            d_in,
            x.stride(0),
            route_shrink_rows.stride(0),
            e,
            r,
            inv_temp,
            split_k,
            num_warps=plan.num_warps,
            **common,
        )
    return g, idx, w
