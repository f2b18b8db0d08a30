"""Decode (T <= 16): route first, then shrink and expand only the k selected experts.

1. ``_decode_route_kernel``, grid (slices of d_in, prototype blocks, token blocks of 16): float32 partial scores
   ``x·P`` of its slice, stored to ``ws`` (slices, T, route columns). P is float32 and x converts to it exactly; the
   dot runs with input_precision="ieee" (FMA), so the sum is a float32 sum.
2. ``_decode_shrink_kernel``, grid (T, slices of d_in): program (t, s) sums token t's partial scores over the route
   slices, takes the top-k of their magnitudes (ties to the lower index) and the softmax of ``top / temperature``, and
   multiplies the k·r selected rows of A by its slice of x_t. Every program of a token computes the same routing from
   the same partial sums in the same order, so they agree; program (t, 0) stores it (idx, w) for the expand. Partial
   shrinks go to ``h`` (slices, T, BLOCK_KR), float32.
3. ``_decode_expand_kernel``, grid (d_out blocks, T): sums token t's shrink slices, applies the mixing, and adds
   ``Σ_j g_j Bᵀ_{idx_j}`` (the k·r selected rows of Bᵀ, gathered) for its d_out block into y.

Only the expand needs the base output, so ``linear.py`` runs kernels 1 and 2 beside the base GEMM on a GPU. What each
kernel reads: P (E·d_in·4 bytes) once; the k·r selected A rows per token; the k·r selected Bᵀ rows per token; never
the other experts. Deterministic: no atomics. Row starts are multiples of the K tile and the slice length is a
specialised integer, so the loads along d_in and d_out are 16-byte vectors when the row strides allow it; counts that
never enter an address (T, E, R, slice counts) are not specialised, so a token count does not compile a new variant.

With caller-given scores (tensor parallelism) kernel 1 does not run and kernel 2 reads the (T, E) scores as a single
slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import MIN_DOT, DecodePlan
from .launch import launch
from .routing import topk_softmax_row


@triton.jit(do_not_specialize=["T", "E"])
def _decode_route_kernel(
    x_ptr,
    p_ptr,
    ws_ptr,
    T,
    D_IN,
    stride_x,
    stride_p,
    E,
    K_PER_SPLIT,
    WS_COLS,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid (slices, prototype blocks, token blocks): ws[s, t, e] = Σ_{k in slice s} x[t, k] p[e, k] (float32)."""
    pid_k = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_t = tl.program_id(2)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    e_offs = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < E
    x_rows = x_ptr + t_offs.to(tl.int64)[:, None] * stride_x
    p_cols = p_ptr + e_offs.to(tl.int64)[None, :] * stride_p
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < D_IN
        xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        pt = tl.load(p_cols + k_offs[:, None], mask=k_mask[:, None] & e_mask[None, :], other=0.0)
        acc = tl.dot(xt.to(tl.float32), pt, acc, input_precision="ieee")
    ws_rows = ws_ptr + (pid_k * T + t_offs).to(tl.int64)[:, None] * WS_COLS
    tl.store(ws_rows + e_offs[None, :], acc, mask=t_mask[:, None])


@triton.jit
def _selected_rows(idx, R, TOP_K: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows ``idx[j]·R + s`` of the flattened (E·R, ·) factors for c = j·BLOCK_R + s, and which of them are real."""
    c = tl.arange(0, BLOCK_KK * BLOCK_R)
    cj = c // BLOCK_R
    cs = c % BLOCK_R
    slots = tl.arange(0, BLOCK_KK)
    ej = tl.sum(tl.where(slots[None, :] == cj[:, None], idx[None, :], 0), axis=1)
    return (ej * R + cs).to(tl.int64), (cj < TOP_K) & (cs < R)


@triton.jit(do_not_specialize=["T", "E", "R", "ROUTE_SPLITS"])
def _decode_shrink_kernel(
    x_ptr,
    ws_ptr,
    a_ptr,
    h_ptr,
    idx_ptr,
    wts_ptr,
    T,
    D_IN,
    stride_x,
    stride_a,
    E,
    R,
    ROUTE_SPLITS,
    ROUTE_COLS,
    K_PER_SPLIT,
    inv_temp,
    TOP_K: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUTE_CHUNK: tl.constexpr,
):
    """Grid (T, slices): routing of token t, then h[s, t, j·BLOCK_R + i] = Σ_{k in s} A[idx_j·R + i, k] x[t, k]."""
    t = tl.program_id(0)
    pid_k = tl.program_id(1)
    e_offs = tl.arange(0, BLOCK_E)
    if HAS_SCORES:  # caller-given (T, E) scores: one row, E wide
        scores = tl.load(ws_ptr + t.to(tl.int64) * E + e_offs, mask=e_offs < E, other=0.0)
    else:  # partial rows BLOCK_E wide, zero past E (the route kernel's blocks cover next_pow2(E))
        scores = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for s0 in range(0, ROUTE_SPLITS, ROUTE_CHUNK):
            s = s0 + tl.arange(0, ROUTE_CHUNK)[:, None]
            row = (s * T + t).to(tl.int64) * ROUTE_COLS
            tile = tl.load(ws_ptr + row + e_offs[None, :], mask=s < ROUTE_SPLITS, other=0.0)
            scores += tl.sum(tile, axis=0)
    w, idx = topk_softmax_row(scores, E, inv_temp, TOP_K, BLOCK_KK)
    slots = tl.arange(0, BLOCK_KK)
    if pid_k == 0:
        keep = slots < TOP_K
        tl.store(idx_ptr + t * TOP_K + slots, idx, mask=keep)
        tl.store(wts_ptr + t * TOP_K + slots, w, mask=keep)
    rows, r_mask = _selected_rows(idx, R, TOP_K, BLOCK_KK, BLOCK_R)
    a_rows = a_ptr + rows[:, None] * stride_a
    x_row = x_ptr + t.to(tl.int64) * stride_x
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_KK * BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < D_IN
        xk = tl.load(x_row + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(a_rows + k_offs[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += at.to(tl.float32) * xk[None, :]
    h = tl.sum(acc, axis=1)
    c = tl.arange(0, BLOCK_KK * BLOCK_R)
    tl.store(h_ptr + (pid_k * T + t).to(tl.int64) * (BLOCK_KK * BLOCK_R) + c, h)


@triton.jit(do_not_specialize=["T", "R", "SHRINK_SPLITS"])
def _decode_expand_kernel(
    h_ptr,
    idx_ptr,
    wts_ptr,
    bt_ptr,
    y_ptr,
    T,
    D_OUT,
    stride_b,
    stride_y,
    R,
    SHRINK_SPLITS,
    TOP_K: tl.constexpr,
    MIX_WEIGHTS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHRINK_CHUNK: tl.constexpr,
):
    """Grid (d_out blocks, T): y[t, n] (+)= Σ_{j, i} g[t, j, i] Bᵀ[idx_j·R + i, n] over the program's n block."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    BLOCK_KR: tl.constexpr = BLOCK_KK * BLOCK_R
    c = tl.arange(0, BLOCK_KR)
    h = tl.zeros((BLOCK_KR,), dtype=tl.float32)
    for s0 in range(0, SHRINK_SPLITS, SHRINK_CHUNK):
        s = s0 + tl.arange(0, SHRINK_CHUNK)[:, None]
        row = (s * T + t).to(tl.int64) * BLOCK_KR
        h += tl.sum(tl.load(h_ptr + row + c[None, :], mask=s < SHRINK_SPLITS, other=0.0), axis=0)
    slots = tl.arange(0, BLOCK_KK)
    keep = slots < TOP_K
    idx = tl.load(idx_ptr + t * TOP_K + slots, mask=keep, other=0)
    w = tl.load(wts_ptr + t * TOP_K + slots, mask=keep, other=0.0)
    # Mixing on the (slot, rank) view: "output" g_j = w_j h_j; "weights" g_j = w_j Σ_i w_i h_i.
    h2 = tl.reshape(h, (BLOCK_KK, BLOCK_R))
    if MIX_WEIGHTS:
        hs = tl.sum(w[:, None] * h2, axis=0)
        g2 = w[:, None] * hs[None, :]
    else:
        g2 = w[:, None] * h2
    g = tl.reshape(g2, (BLOCK_KR,))
    rows, r_mask = _selected_rows(idx, R, TOP_K, BLOCK_KK, BLOCK_R)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    b = tl.load(bt_ptr + rows[:, None] * stride_b + n_offs[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.sum(g[:, None] * b.to(tl.float32), axis=0)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_y + n_offs
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def workspace(x: torch.Tensor, top_k: int, plan: DecodePlan) -> dict[str, torch.Tensor]:
    """The buffers of one decode call (allocated on the caller's stream before any side-stream work)."""
    t = x.shape[0]
    new = lambda n, dtype=torch.float32: torch.empty(n, device=x.device, dtype=dtype)  # noqa: E731
    return {
        "ws": new(max(1, plan.route_splits * t * plan.route_cols)),
        "h": new(plan.shrink_splits * t * plan.block_kr),
        "idx": new(t * top_k, torch.int32),
        "w": new(t * top_k),
    }


def route_shrink(
    layer, x: torch.Tensor, plan: DecodePlan, buffers: dict[str, torch.Tensor], scores: torch.Tensor | None = None
) -> None:
    """Kernels 1 and 2 for x (T, d_in): routing and the selected experts' partial shrinks into ``buffers``.

    ``layer`` is a :class:`~.linear.PreparedExperts`; ``scores`` (T, E) float32 are caller-given signed scores.
    """
    t, d_in = x.shape
    e, r = layer.num_experts, layer.rank
    if scores is None:
        launch(
            _decode_route_kernel, plan.route_grid(t),
            x, layer.prototypes, buffers["ws"], t, d_in, x.stride(0), layer.prototypes.stride(0), e,
            plan.route_k_per_split, plan.route_cols,
            BLOCK_T=MIN_DOT, BLOCK_K=plan.route_block_k, BLOCK_E=plan.route_block_e,
            num_warps=plan.num_warps, num_stages=plan.route_stages,
        )  # fmt: skip
        ws, route_splits, route_cols = buffers["ws"], plan.route_splits, plan.route_cols
    else:
        ws, route_splits, route_cols = scores, 1, e
    launch(
        _decode_shrink_kernel, plan.shrink_grid(t),
        x, ws, layer.a, buffers["h"], buffers["idx"], buffers["w"], t, d_in, x.stride(0), layer.a.stride(0), e, r,
        route_splits, route_cols, plan.shrink_k_per_split, 1.0 / layer.temperature,
        TOP_K=layer.top_k, HAS_SCORES=scores is not None, BLOCK_E=plan.block_e, BLOCK_R=plan.block_r,
        BLOCK_KK=plan.block_kk, BLOCK_K=plan.shrink_block_k, ROUTE_CHUNK=plan.route_chunk,
        num_warps=plan.num_warps,
    )  # fmt: skip


def expand_(
    layer, y: torch.Tensor, plan: DecodePlan, buffers: dict[str, torch.Tensor], accumulate: bool
) -> torch.Tensor:
    """Kernel 3: ``y (+)= Σ_j g_j Bᵀ_{idx_j}`` from the buffers of :func:`route_shrink`; returns y."""
    t, d_out = y.shape
    launch(
        _decode_expand_kernel, plan.expand_grid(t, d_out),
        buffers["h"], buffers["idx"], buffers["w"], layer.b_t, y, t, d_out, layer.b_t.stride(1), y.stride(0),
        layer.rank, plan.shrink_splits,
        TOP_K=layer.top_k, MIX_WEIGHTS=layer.mix_weights, ACCUMULATE=accumulate, BLOCK_R=plan.block_r,
        BLOCK_KK=plan.block_kk, BLOCK_N=plan.block_n, SHRINK_CHUNK=plan.shrink_chunk, num_warps=plan.num_warps,
    )  # fmt: skip
    return y
