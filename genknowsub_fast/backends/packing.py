"""The one packed layout of a module's experts that every backend reads.

Built once per target module (at patch time, or once per functional call), never per forward:

- ``route_shrink`` (E + E·r, d_in): the prototypes stacked on top of every expert's A rows, so routing and the
  LoRA shrink are one GEMM against x. ``prototypes`` and ``a`` are views into it.
- ``b_t`` (E, r, d_out): each expert's Bᵀ with its scaling folded in (``s_e · B_eᵀ``), so the expand of any set of
  experts is one GEMM against a (·, k·r) or (·, E·r) coefficient block, and no per-expert scaling is applied per call.

Mixed ranks are zero-padded to r_max; padded rows of A and of Bᵀ are zero, so they add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIXING_MODES = ("output", "weights")


@dataclass
class PackedExperts:
    """Experts of one target module in the layout the backends read (see the module docstring)."""

    route_shrink: torch.Tensor  # (E + E*r, d_in)
    b_t: torch.Tensor  # (E, r, d_out), scaling folded in
    num_experts: int
    rank: int
    mixing: str

    @property
    def prototypes(self) -> torch.Tensor:
        """(E, d_in) view of the prototype rows."""
        return self.route_shrink[: self.num_experts]

    @property
    def a(self) -> torch.Tensor:
        """(E, r, d_in) view of the A rows."""
        e, r = self.num_experts, self.rank
        return self.route_shrink[e:].view(e, r, -1)

    @property
    def b_flat(self) -> torch.Tensor:
        """(E·r, d_out) view of the scaled Bᵀ rows."""
        return self.b_t.view(self.num_experts * self.rank, -1)

    @property
    def d_in(self) -> int:
        return self.route_shrink.shape[1]

    @property
    def d_out(self) -> int:
        return self.b_t.shape[2]

    def to(self, device=None, dtype=None) -> PackedExperts:
        """A copy on another device and/or dtype."""
        return PackedExperts(
            self.route_shrink.to(device=device, dtype=dtype),
            self.b_t.to(device=device, dtype=dtype),
            self.num_experts,
            self.rank,
            self.mixing,
        )


def check_mixing(mixing: str, scaling: torch.Tensor, ranks: torch.Tensor | None) -> None:
    """Raise ValueError if ``mixing`` is unknown, or is ``"weights"`` with unequal ranks or scalings."""
    if mixing not in MIXING_MODES:
        raise ValueError(f"mixing must be one of {MIXING_MODES}, got {mixing!r}")
    if mixing == "weights":
        if ranks is not None and ranks.numel() and bool((ranks != ranks[0]).any()):
            raise ValueError(f'mixing="weights" needs all experts to share one rank, got ranks {ranks.tolist()}')
        if scaling.numel() and not torch.allclose(scaling, scaling[0].expand_as(scaling), rtol=1e-6, atol=0):
            raise ValueError(f'mixing="weights" needs one shared scaling, got {scaling.tolist()}')


def pack_experts(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    prototypes: torch.Tensor,
    mixing: str = "output",
    ranks: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PackedExperts:
    """Pack A (E, r, d_in), B (E, d_out, r), scaling (E,) and prototypes (E, d_in) for the backends."""
    check_mixing(mixing, scaling, ranks)
    e, r, d_in = a.shape
    if b.shape[0] != e or b.shape[2] != r:
        raise ValueError(f"B has shape {tuple(b.shape)}, expected ({e}, d_out, {r}) to match A {tuple(a.shape)}")
    if prototypes.shape != (e, d_in):
        raise ValueError(f"prototypes have shape {tuple(prototypes.shape)}, expected ({e}, {d_in})")
    if scaling.shape != (e,):
        raise ValueError(f"scaling has shape {tuple(scaling.shape)}, expected ({e},)")
    dtype = dtype or a.dtype
    device = device if device is not None else a.device
    # Fold the scaling in float32 (or better) before casting, so fp16/bf16 storage rounds once.
    work = torch.promote_types(a.dtype, torch.float32)
    route_shrink = torch.cat([prototypes.to(work), a.to(work).reshape(e * r, d_in)], dim=0)
    b_t = b.to(work).transpose(1, 2) * scaling.to(work).view(e, 1, 1)
    b_t = b_t.to(device=device, dtype=dtype)
    if b_t.device.type == "cpu":
        b_t = padded_rows(b_t)
    return PackedExperts(route_shrink.to(device=device, dtype=dtype).contiguous(), b_t, e, r, mixing)


def padded_rows(b_t: torch.Tensor) -> torch.Tensor:
    """A copy of (E, r, d_out) whose row stride, in 64-byte cache lines, is odd.

    The CPU expand keeps a 64-float tile of all E·r rows in L1. With d_out = 5632 (a stride of 352 cache lines) every
    row of a tile fell into the same 2 of L1's 64 sets and the tile thrashed; an odd stride spreads the rows over all
    sets (T = 64, d_out = 5632, E·r = 80: 823 → 649 µs on one core). The tensor is a strided view, so ``view(E·r,
    d_out)`` and indexing still work.
    """
    e, r, d = b_t.shape
    per_line = max(1, 64 // b_t.element_size())
    ld = -(-d // per_line) * per_line
    if (ld // per_line) % 2 == 0:
        ld += per_line
    storage = b_t.new_zeros(e * r * ld)
    out = storage.as_strided((e, r, d), (r * ld, ld, 1))
    out.copy_(b_t)
    return out
