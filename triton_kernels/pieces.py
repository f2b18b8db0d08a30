"""Float32 prototypes as a sum of 16-bit pieces, so a tensor-core dot in the model's dtype gives float32 scores.

Routing scores are ``x·p`` with p in float32 whatever the model dtype (x converts exactly). The route pass of the
dense and grouped regimes computes them on the tensor cores: p is scaled by a power of two ``s`` into [-1, 1] and
split into three pieces of the compute dtype,

    s·p = q0 + 2^-m q1 + 2^-2m q2     (m = 8 significand bits for bfloat16, 11 for float16),

each piece rounded to nearest from the remainder of the previous ones, so the three carry at least 3m >= 24 bits,
float32's precision (float16's narrow exponent range is why the remainders are scaled up by 2^m before rounding).
Every product ``x_i · q_j,i`` of two 16-bit values is exact in float32, so ``Σ_j 2^-jm (x·q_j)`` accumulated in
float32 and divided by s is the float32 dot product up to float32 accumulation error.
"""

from __future__ import annotations

import math

import torch

SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11}
NUM_PIECES = 3


def piece_shift(dtype: torch.dtype) -> int:
    """m: the factor between consecutive pieces is 2^m."""
    return SIGNIFICAND_BITS[dtype]


def split_prototypes(prototypes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``(pieces (3·E, d_in) in dtype, 1/s)`` for float32 prototypes (E, d_in); see the module docstring.

    Rows ``j·E + e`` hold piece j of expert e. The scale s is a power of two, so scaling is exact.
    """
    if dtype not in SIGNIFICAND_BITS:
        raise ValueError(f"prototype pieces are for float16 / bfloat16, got {dtype}")
    p = prototypes.to(torch.float64)
    amax = float(p.abs().max()) if p.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError("prototypes hold NaN or Inf")
    exp = math.ceil(math.log2(amax)) if amax > 0 else 0
    rest = p * 2.0**-exp
    m = piece_shift(dtype)
    pieces = []
    for _ in range(NUM_PIECES):
        q = rest.to(dtype)
        pieces.append(q)
        rest = (rest - q.to(torch.float64)) * 2.0**m
    return torch.cat(pieces, dim=0).contiguous(), 2.0**exp
