"""Device functions shared by the decode and route-pass kernels: top-k + softmax (per block of tokens and per token),
the mixing of the shrinks, and the sum of split-K partial sums."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_softmax(scores, E, inv_temp, TOP_K: tl.constexpr, BLOCK_KK: tl.constexpr):
    """Top-k of ``|scores|`` per row (ties to the lower index) and the softmax of ``top·inv_temp`` over the k.

    ``scores`` (BLOCK_T, BLOCK_E) float32, columns >= E ignored. Returns (weights (BLOCK_T, BLOCK_KK) float32,
    indices (BLOCK_T, BLOCK_KK) int32); slots >= TOP_K hold 0. tl.topk returns values only, so each of the k rounds
    takes the row max, then the smallest column index holding it (this is what sends ties to the lower expert index),
    then knocks that column out.
    """
    BLOCK_T: tl.constexpr = scores.shape[0]
    BLOCK_E: tl.constexpr = scores.shape[1]
    cols = tl.arange(0, BLOCK_E)[None, :]
    slots = tl.arange(0, BLOCK_KK)[None, :]
    logits = tl.abs(scores)
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
def topk_softmax_row(scores, E, inv_temp, TOP_K: tl.constexpr, BLOCK_KK: tl.constexpr):
    """:func:`topk_softmax` of one token: ``scores`` (BLOCK_E,) float32 → (weights (BLOCK_KK,), indices (BLOCK_KK,))."""
    BLOCK_E: tl.constexpr = scores.shape[0]
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_KK)
    logits = tl.abs(scores)
    logits = tl.where(logits == logits, logits, 0.0)  # NaN: see topk_softmax
    logits = tl.where(cols < E, logits, -1.0)
    top_v = tl.zeros((BLOCK_KK,), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_KK,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        m = tl.max(logits, axis=0)
        sel = tl.minimum(tl.min(tl.where(logits == m, cols, BLOCK_E), axis=0), E - 1)
        top_v = tl.where(slots == j, m, top_v)
        top_i = tl.where(slots == j, sel, top_i)
        logits = tl.where(cols == sel, -2.0, logits)
    m0 = tl.max(tl.where(slots == 0, top_v, -float("inf")), axis=0)
    p = tl.where(slots < TOP_K, tl.exp((top_v - m0) * inv_temp), 0.0)
    return p / tl.sum(p, axis=0), top_i


@triton.jit
def mix(w, h3, MIX_WEIGHTS: tl.constexpr):
    """Expand coefficients from the weights w (BLOCK_T, BLOCK_KK) and shrinks h3 (BLOCK_T, BLOCK_KK, BLOCK_R).

    ``mixing="output"``: ``g_j = w_j h_j``; ``"weights"``: ``g_j = w_j Σ_i w_i h_i`` (so that
    ``Σ_j Bᵀ_{idx_j} g_j = (Σ_j w_j s B_j)(Σ_i w_i A_i x)``). Slots with w = 0 get g = 0.
    """
    w3 = w[:, :, None]
    if MIX_WEIGHTS:
        hs = tl.sum(w3 * h3, axis=1)
        return w3 * hs[:, None, :]
    return w3 * h3


@triton.jit
def slot(values, j, BLOCK_KK: tl.constexpr):
    """Column j of a (BLOCK_T, BLOCK_KK) tensor, as (BLOCK_T,)."""
    slots = tl.arange(0, BLOCK_KK)[None, :]
    return tl.sum(tl.where(slots == j, values, 0), axis=1)


@triton.jit
def sum_splits(ws_ptr, t_offs, cols, cmask, T, K_SPLITS, WS_COLS, SPLIT_CHUNK: tl.constexpr):
    """Σ of the K_SPLITS partial rows of ws (splits, T, WS_COLS) at tokens t_offs and columns cols (BLOCK_T, W).

    SPLIT_CHUNK splits are loaded per (SPLIT_CHUNK, BLOCK_T, W) tile: all of them at once when they fit.
    """
    sp = tl.arange(0, SPLIT_CHUNK)[:, None, None]
    out = tl.zeros(cols.shape, dtype=tl.float32)
    for s0 in range(0, K_SPLITS, SPLIT_CHUNK):
        s = s0 + sp
        row = (s * T + t_offs[None, :, None]).to(tl.int64) * WS_COLS
        tile = tl.load(ws_ptr + row + cols[None, :, :], mask=(s < K_SPLITS) & cmask[None, :, :], other=0.0)
        out += tl.sum(tile, axis=0)
    return out
