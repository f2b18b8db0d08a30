"""Float32 prototypes as a sum of 16-bit pieces, so tensor-core dots in the model's dtype give float32 scores.

Routing scores are ``x·p`` with p in float32 whatever the model dtype (x converts exactly). The route pass of the
dense and grouped regimes computes them on the tensor cores: p is scaled by a power of two s and split into three
pieces of the compute dtype, each rounded to nearest from what the previous ones left,

    s·p = q0 + q1 + q2 (+ a remainder below 2^-3m of |s·p|, m = 8 significand bits for bfloat16, 11 for float16),

so the three carry at least 3m >= 24 bits, float32's precision. Every product ``x_i · q_j,i`` of two 16-bit values is
exact in float32, so the three dots accumulated into one float32 accumulator and multiplied by 1/s give the float32
dot product up to float32 accumulation error. The kernel needs one accumulator and no per-piece scaling.

Layout: the pieces are interleaved along K in blocks of ``dispatch.PIECE_BLOCK_K`` columns (block b of piece j at
columns ``(3b + j)·PIECE_BLOCK_K``), so the route pass walks 3·d_in columns with one tile per step while x's tile is the
same for three steps.

s: bfloat16 has float32's exponent range, so s = 1. float16 does not: s puts max|p| just under 2^15, so the small
pieces of the large components stay normal numbers; components far below max|p| lose low bits of their last piece,
an absolute error below 2^-30·max|p| per component.
"""

from __future__ import annotations

import math

import torch

from .dispatch import PIECE_BLOCK_K

NUM_PIECES = 3
# log2 of the largest |s·p|: float16 (max 65504) holds 2^15; products with |x| <= 65504 stay below 2^31.
_TOP_EXP = {torch.bfloat16: 0, torch.float16: 15}


def split_prototypes(prototypes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``(pieces (E, 3·d_pad) in dtype, 1/s)`` for float32 prototypes (E, d_in); see the module docstring.

    ``d_pad`` is d_in rounded up to PIECE_BLOCK_K (zero padding); 1/s is a power of two, so the scaling is exact.
    """
    if dtype not in _TOP_EXP:
        raise ValueError(f"prototype pieces are for float16 / bfloat16, got {dtype}")
    e, d_in = prototypes.shape
    p = prototypes.to(torch.float64)
    amax = float(p.abs().max()) if p.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError("prototypes hold NaN or Inf")
    exp = _TOP_EXP[dtype] - math.ceil(math.log2(amax)) if amax > 0 and dtype == torch.float16 else 0
    kb = PIECE_BLOCK_K
    d_pad = -(-d_in // kb) * kb
    rest = torch.nn.functional.pad(p * 2.0**exp, (0, d_pad - d_in))
    pieces = []
    for _ in range(NUM_PIECES):
        q = rest.to(dtype)
        pieces.append(q.view(e, d_pad // kb, 1, kb))
        rest = rest - q.to(torch.float64)
    out = torch.cat(pieces, dim=2)  # (E, blocks, piece, kb): block-major, then piece
    return out.reshape(e, NUM_PIECES * d_pad).contiguous(), 2.0**-exp
