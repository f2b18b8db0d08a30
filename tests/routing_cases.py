"""Inputs whose Arrow routing is unambiguous in every dtype, so backends can be compared end to end.

Prototypes are orthonormal and each token is ``Σ_e c_e p_e`` with |c_e| a per-token permutation of evenly spaced
values, so the top-k margin (≥ 0.3 in logit units) is far above fp16/bf16 rounding of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    x: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    prototypes: torch.Tensor
    ranks: torch.Tensor

    def to(self, dtype: torch.dtype) -> Case:
        return Case(
            self.x.to(dtype), self.a.to(dtype), self.b.to(dtype), self.scaling, self.prototypes.to(dtype), self.ranks
        )


def make_case(t, e, r, d_in, d_out, seed=0, mixed_ranks=False, shared_scaling=False) -> Case:
    """A float64 case; ``mixed_ranks`` zero-pads some experts' factors below r."""
    assert d_in >= e, "orthonormal prototypes need d_in >= E"
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, e, generator=g, dtype=torch.float64))
    protos = q.T.contiguous()
    levels = torch.linspace(1.0, 1.0 + 0.3 * max(e - 1, 0), e, dtype=torch.float64)
    coef = torch.stack([levels[torch.randperm(e, generator=g)] for _ in range(t)]) if t else levels.new_zeros(0, e)
    signs = torch.where(torch.rand(t, e, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (coef * signs) @ protos
    a = torch.randn(e, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g, dtype=torch.float64) / r**0.5
    ranks = torch.full((e,), r, dtype=torch.int64)
    if mixed_ranks:
        for i in range(e):
            ranks[i] = 1 + (i % r)
            a[i, ranks[i] :] = 0
            b[i, :, ranks[i] :] = 0
    scaling = torch.full((e,), 0.75, dtype=torch.float64)
    if not shared_scaling:
        scaling = 0.5 + torch.rand(e, generator=g, dtype=torch.float64)
    return Case(x, a, b, scaling, protos, ranks)
