"""Expand: ``y (+)= Σ_j g_j · Bᵀ_{idx_j}`` from the compact coefficients of the route pass.

``g`` (T, k·r) float32 holds each token's k selected slots (mixing already applied, scaling folded into ``b_t``),
``idx`` (T, k) int32 the experts. Two kernels here (the grouped one lives in ``grouped.py``):

- ``gather``: per token, loads its k·r rows of ``b_t`` and multiply-adds them (no tl.dot: every token has its own
  rows). For decode, where T·k is below E.
- ``dense``: rebuilds the masked (BLOCK_T, E·r) coefficient block in registers (zeros for unselected experts) and
  does one tl.dot against all of ``b_t`` (E·r, BLOCK_N). For small E·r at any T.

With ACCUMULATE the result is added to y (the base linear's output, so y is read and written once); without, y is
only written (delta-only calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import ExpandPlan
from .launch import launch


@triton.jit(do_not_specialize=["T", "R"])
def _expand_gather_kernel(
    g_ptr,
    idx_ptr,
    bt_ptr,
    y_ptr,
    T,
    D_OUT,
    stride_b,
    stride_y,
    R,
    TOP_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KK: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(D_OUT, BLOCK_N)). Column c = j·BLOCK_R + s of the slot block is slot j, rank s."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    t64 = t_offs.to(tl.int64)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    c = tl.arange(0, BLOCK_KK * BLOCK_R)
    cj = c // BLOCK_R
    cs = c % BLOCK_R
    cmask = t_mask[:, None] & (cj[None, :] < TOP_K) & (cs[None, :] < R)
    e = tl.load(idx_ptr + t64[:, None] * TOP_K + cj[None, :], mask=cmask, other=0)
    coef = tl.load(g_ptr + t64[:, None] * (TOP_K * R) + cj[None, :] * R + cs[None, :], mask=cmask, other=0.0)
    rows = (e * R + cs[None, :]).to(tl.int64)
    b = tl.load(
        bt_ptr + rows[:, :, None] * stride_b + n_offs[None, None, :],
        mask=cmask[:, :, None] & n_mask[None, None, :],
        other=0.0,
    )
    acc = tl.sum(coef[:, :, None] * b.to(tl.float32), axis=1)
    y_ptrs = y_ptr + t64[:, None] * stride_y + n_offs[None, :]
    ymask = t_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit(do_not_specialize=["T", "E", "R"])
def _expand_dense_kernel(
    g_ptr,
    idx_ptr,
    bt_ptr,
    y_ptr,
    T,
    D_OUT,
    stride_b,
    stride_y,
    E,
    R,
    TOP_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KC: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(D_OUT, BLOCK_N)). Column e·BLOCK_R + s of the dense block: expert e, rank s.

    The dense K = BLOCK_EA·BLOCK_R is walked in chunks of BLOCK_KC columns (only up to expert E), so the operand tiles
    in registers stay small whatever E·r is.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    t64 = t_offs.to(tl.int64)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, E * BLOCK_R, BLOCK_KC):
        c = k0 + tl.arange(0, BLOCK_KC)
        ce = c // BLOCK_R
        cs = c % BLOCK_R
        real = (ce < E) & (cs < R)
        # Scatter the k compact slots into the dense chunk: slot j of token t lands on the columns of expert idx[t, j].
        coef = tl.zeros((BLOCK_T, BLOCK_KC), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            ej = tl.load(idx_ptr + t64 * TOP_K + j, mask=t_mask, other=-1)
            hit = t_mask[:, None] & real[None, :] & (ce[None, :] == ej[:, None])
            coef += tl.load(g_ptr + t64[:, None] * (TOP_K * R) + j * R + cs[None, :], mask=hit, other=0.0)
        b = tl.load(
            bt_ptr + (ce * R + cs).to(tl.int64)[:, None] * stride_b + n_offs[None, :],
            mask=real[:, None] & n_mask[None, :],
            other=0.0,
        )
        # Coefficients are rounded to the weights' dtype for the tensor-core dot (as the torch backend does);
        # "ieee" keeps float32 inputs exact instead of TF32.
        acc = tl.dot(coef.to(b.dtype), b, acc, input_precision="ieee")
    y_ptrs = y_ptr + t64[:, None] * stride_y + n_offs[None, :]
    ymask = t_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def expand_(
    y: torch.Tensor,
    g: torch.Tensor,
    idx: torch.Tensor,
    b_t: torch.Tensor,
    num_experts: int,
    rank: int,
    plan: ExpandPlan,
    accumulate: bool,
) -> torch.Tensor:
    """``y (+)= Σ_j g_j Bᵀ_{idx_j}`` with the "gather" or "dense" kernel of ``plan``; y (T, d_out) is written in place.

    ``g`` (T, k·r) float32 and ``idx`` (T, k) int32 come from :func:`route_shrink.route_shrink`; ``b_t`` is
    (E, r, d_out) contiguous. Returns y.
    """
    t, d_out = y.shape
    if t == 0:
        return y
    top_k = idx.shape[1]
    grid = (triton.cdiv(t, plan.block_t), triton.cdiv(d_out, plan.block_n))
    if plan.kind == "gather":
        launch(
            _expand_gather_kernel,
            grid,
            g,
            idx,
            b_t,
            y,
            t,
            d_out,
            b_t.stride(1),
            y.stride(0),
            rank,
            TOP_K=top_k,
            ACCUMULATE=accumulate,
            BLOCK_T=plan.block_t,
            BLOCK_N=plan.block_n,
            BLOCK_R=plan.block_r,
            BLOCK_KK=plan.block_kk,
            num_warps=plan.num_warps,
        )
    elif plan.kind == "dense":
        launch(
            _expand_dense_kernel,
            grid,
            g,
            idx,
            b_t,
            y,
            t,
            d_out,
            b_t.stride(1),
            y.stride(0),
            num_experts,
            rank,
            TOP_K=top_k,
            ACCUMULATE=accumulate,
            BLOCK_T=plan.block_t,
            BLOCK_N=plan.block_n,
            BLOCK_EA=plan.block_ea,
            BLOCK_R=plan.block_r,
            BLOCK_KC=plan.block_kc,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
    else:
        raise ValueError(f"expand_ runs the 'gather' and 'dense' kernels; got {plan.kind!r} (see grouped.py)")
    return y
