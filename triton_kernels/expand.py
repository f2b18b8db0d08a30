"""Dense expand: ``y (+)= C · Bᵀ_all`` from the dense coefficients of the route pass, optionally with the base GEMM in
the same kernel, which then computes ``[x | C] · [W | Bᵀ_all]ᵀ``: one GEMM whose K range is d_in plus the experts'
columns.

``C`` (T, NA) in the compute dtype holds, at column e·BLOCK_R + s, the coefficient of expert e's rank slot s (the
routing weight and mixing applied, the scaling folded into ``b_t``; zero for unselected experts and past r). Each
K step loads a (BLOCK_T, BLOCK_KC) tile of C and the matching Bᵀ rows, with 16-byte loads like any GEMM operand.

- ACCUMULATE: the delta is added to y (the base linear's output from cuBLAS): y is read and written once more.
- FUSE_BASE: the kernel first computes ``x Wᵀ (+ bias)`` for its tile over all of d_in (a plain tiled GEMM), then adds
  the delta to the same float32 accumulator: y is written once and never read, and there is no cuBLAS call.
- neither: y is only written (delta-only calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import DenseExpandPlan, cdiv
from .launch import launch


@triton.jit(do_not_specialize=["T", "E", "R"])
def _expand_dense_kernel(
    c_ptr,
    bt_ptr,
    y_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    T,
    D_IN,
    D_OUT,
    stride_b,
    stride_y,
    stride_x,
    stride_w,
    E,
    R,
    NA: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    FUSE_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(D_OUT, BLOCK_N)). Column e·BLOCK_R + s of C: expert e, rank s (Bᵀ row e·R + s)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < T
    t64 = t_offs.to(tl.int64)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < D_OUT
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if FUSE_BASE:
        x_rows = x_ptr + t64[:, None] * stride_x
        w_cols = w_ptr + n_offs.to(tl.int64)[None, :] * stride_w
        for k0 in range(0, D_IN, BLOCK_KB):
            k_offs = k0 + tl.arange(0, BLOCK_KB)
            k_mask = k_offs < D_IN
            xt = tl.load(x_rows + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_cols + k_offs[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # The experts' K range: C's columns (zero past E and past r) against Bᵀ's rows. C's rows are NA wide and
    # BLOCK_KC divides NA, so its tiles need no column mask.
    c_rows = c_ptr + t64[:, None] * NA
    for k0 in range(0, E * BLOCK_R, BLOCK_KC):
        c = k0 + tl.arange(0, BLOCK_KC)
        ce = c // BLOCK_R
        cs = c % BLOCK_R
        real = (ce < E) & (cs < R)
        ct = tl.load(c_rows + c[None, :], mask=t_mask[:, None], other=0.0)
        b = tl.load(
            bt_ptr + (ce * R + cs).to(tl.int64)[:, None] * stride_b + n_offs[None, :],
            mask=real[:, None] & n_mask[None, :],
            other=0.0,
        )
        # "ieee" keeps float32 inputs exact instead of TF32.
        acc = tl.dot(ct, b, acc, input_precision="ieee")
    y_ptrs = y_ptr + t64[:, None] * stride_y + n_offs[None, :]
    ymask = t_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def expand_dense_(
    layer,
    y: torch.Tensor,
    c: torch.Tensor,
    plan: DenseExpandPlan,
    accumulate: bool,
    x: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y (+)= Σ_j g_j Bᵀ_{idx_j}`` in place (y (T, d_out)); with ``plan.fuse_base`` ``y = x Wᵀ + bias + delta``.

    ``layer`` is a :class:`~.linear.PreparedExperts` (its ``b_t`` (E, r, d_out) has unit-stride rows and
    ``stride(0) == r·stride(1)``); ``c`` (T, NA) the dense coefficients from the route pass, in y's dtype. Returns y.
    """
    t, d_out = y.shape
    if t == 0:
        return y
    b_t = layer.b_t
    e, r, _ = b_t.shape
    fuse = plan.fuse_base and weight is not None
    if plan.fuse_base and not fuse:
        raise ValueError("a fused-base plan needs the base weight")
    grid = (cdiv(t, plan.block_t), cdiv(d_out, plan.block_n))
    launch(
        _expand_dense_kernel,
        grid,
        c,
        b_t,
        y,
        x if fuse else y,
        weight if fuse else y,
        bias if (fuse and bias is not None) else y,
        t,
        x.shape[1] if fuse else 0,
        d_out,
        b_t.stride(1),
        y.stride(0),
        x.stride(0) if fuse else 0,
        weight.stride(0) if fuse else 0,
        e,
        r,
        NA=c.shape[1],
        ACCUMULATE=accumulate and not fuse,
        FUSE_BASE=fuse,
        HAS_BIAS=fuse and bias is not None,
        BLOCK_T=plan.block_t,
        BLOCK_N=plan.block_n,
        BLOCK_R=plan.block_r,
        BLOCK_KC=plan.block_kc,
        BLOCK_KB=plan.block_kb,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return y
