"""The one packed layout of a module's experts that every backend reads.

Built once per target module and (device, dtype) by the prepared runner (``genknowsub_fast.runner``), never per
forward:

- ``prototypes`` (E, d_in) float32 whatever the compute dtype: routing scores ``x·p`` are always accumulated in
  float32 against float32 prototypes (x converts to float32 exactly from bf16/fp16), so the top-k choice does not
  depend on the model's dtype;
- ``a`` (E, r, d_in) in the compute dtype;
- ``b_t`` (E, r, d_out) in the compute dtype: each expert's Bᵀ with its scaling folded in (``s_e · B_eᵀ``), so the
  expand of any set of experts is one GEMM against a (·, k·r) or (·, E·r) coefficient block. On the CPU its row
  stride is padded (see :func:`padded_rows`).

Mixed ranks are zero-padded to r_max; padded rows of A and of Bᵀ are zero, so they add nothing. A backend that wants
another arrangement (stacked, split) derives it once in its own prepare step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import MIXING_MODES

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class PackedExperts:
    """Experts of one target module in the layout the backends read (see the module docstring)."""

    prototypes: torch.Tensor  # (E, d_in) float32
    a: torch.Tensor  # (E, r, d_in) compute dtype
    b_t: torch.Tensor  # (E, r, d_out) compute dtype, scaling folded in
    num_experts: int
    rank: int
    mixing: str

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of ``a`` and ``b_t``)."""
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def a_flat(self) -> torch.Tensor:
        """(E·r, d_in) view of the A rows."""
        return self.a.view(self.num_experts * self.rank, -1)

    @property
    def b_flat(self) -> torch.Tensor:
        """(E·r, d_out) view of the scaled Bᵀ rows."""
        return self.b_t.view(self.num_experts * self.rank, -1)

    @property
    def d_in(self) -> int:
        return self.a.shape[2]

    @property
    def d_out(self) -> int:
        return self.b_t.shape[2]


def check_mixing(mixing: str, scaling: torch.Tensor, ranks: torch.Tensor | None) -> None:
    """Raise ValueError if ``mixing`` is unknown, or is ``"weights"`` with unequal ranks or scalings."""
    if mixing not in MIXING_MODES:
        raise ValueError(f"mixing must be one of {MIXING_MODES}, got {mixing!r}")
    if mixing == "weights":
        if ranks is not None and ranks.numel() and bool((ranks != ranks[0]).any()):
            raise ValueError(f'mixing="weights" needs all experts to share one rank, got ranks {ranks.tolist()}')
        if scaling.numel() and not torch.allclose(scaling, scaling[0].expand_as(scaling), rtol=1e-6, atol=0):
            raise ValueError(f'mixing="weights" needs one shared scaling, got {scaling.tolist()}')


def check_factors(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, prototypes: torch.Tensor) -> None:
    """ValueError unless A (E, r, d_in), B (E, d_out, r), scaling (E,) and prototypes (E, d_in) fit together."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(f"expected A (E, r, d_in) and B (E, d_out, r), got {tuple(a.shape)} and {tuple(b.shape)}")
    e, _, d_in = a.shape
    if prototypes.shape != (e, d_in):
        raise ValueError(f"prototypes have shape {tuple(prototypes.shape)}, expected ({e}, {d_in})")
    if scaling.shape != (e,):
        raise ValueError(f"scaling has shape {tuple(scaling.shape)}, expected ({e},)")
    for name, t in (("A", a), ("B", b), ("scaling", scaling), ("prototypes", prototypes)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


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
    check_factors(a, b, scaling, prototypes)
    check_mixing(mixing, scaling, ranks)
    e, r, d_in = a.shape
    dtype = dtype or a.dtype
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"experts run in one of {COMPUTE_DTYPES}, got {dtype}")
    device = torch.device(device) if device is not None else a.device
    # Fold the scaling in float32 (or better) before casting, so fp16/bf16 storage rounds once.
    work = torch.promote_types(a.dtype, torch.float32)
    protos = pack_prototypes(prototypes, dtype, device)
    a_packed = a.to(device=device, dtype=dtype).contiguous()
    b_t = (b.to(work).transpose(1, 2) * scaling.to(work).view(e, 1, 1)).to(device=device, dtype=dtype)
    if b_t.device.type == "cpu":
        b_t = padded_rows(b_t)
    else:
        b_t = b_t.contiguous()
    return PackedExperts(protos, a_packed, b_t, e, r, mixing)


def pack_prototypes(prototypes: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The prototypes as :func:`pack_experts` keeps them for compute ``dtype`` on ``device``."""
    protos = prototypes.to(device=device, dtype=torch.promote_types(prototypes.dtype, torch.float32)).contiguous()
    if protos.dtype == torch.float64 and dtype != torch.float64:
        protos = protos.float()
    return protos


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


# ---------------------------------------------------------------------------------------------------- stored form
# A library file holds each module's PackedExperts as packed for the CPU in the library's dtype, so that loading maps
# the tensors the kernels read instead of packing again. These two functions are the only code that knows how a
# PackedExperts maps to stored tensors: a change of the layout above changes them, and the file follows.

STORED_NAMES = ("prototypes", "a", "b_t")


class StoredLayoutError(ValueError):
    """Stored tensors that cannot be a PackedExperts; ``key`` names the tensor at fault."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key} {message}")


def stored_tensors(packed: PackedExperts) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, layout) a file stores for ``packed``: dense tensors named by :data:`STORED_NAMES`, each with the
    experts along dimension 0, and the JSON numbers that :func:`from_stored` needs to view them back.

    ``b_t`` is stored with its padded rows (``(E, r, row stride)``, zeros past ``d_out``), so that a mapped file gives
    the CPU layout without a copy.
    """
    b_t = packed.b_t
    e, r, d = b_t.shape
    ld = b_t.stride(1) if r > 1 else b_t.stride(0)  # the row stride (padded_rows: an odd number of cache lines)
    if (d > 1 and b_t.stride(2) != 1) or ld < d or (e > 1 and b_t.stride(0) != r * ld):
        raise ValueError(f"b_t (E, r, d_out) has strides {b_t.stride()}; expected rows of one stride >= {d}")
    rows = b_t.as_strided((e, r, ld), (r * ld, ld, 1))
    return {"prototypes": packed.prototypes, "a": packed.a, "b_t": rows}, {"d_out": int(d)}


def from_stored(tensors: dict[str, torch.Tensor], layout: dict, mixing: str = "output") -> PackedExperts:
    """The PackedExperts that :func:`stored_tensors` wrote, as views of ``tensors`` (no copy).

    StoredLayoutError naming the tensor when they cannot be one: a wrong dtype, shape or stride.
    """
    protos, a, rows = (tensors[k] for k in STORED_NAMES)
    if a.dtype not in COMPUTE_DTYPES:
        raise StoredLayoutError("a", f"has dtype {a.dtype}; expected one of {COMPUTE_DTYPES}")
    if a.dim() != 3 or min(a.shape) < 1 or not a.is_contiguous():
        raise StoredLayoutError("a", f"has shape {tuple(a.shape)}; expected a dense (E, r, d_in)")
    e, r, d_in = a.shape
    if rows.dtype != a.dtype:
        raise StoredLayoutError("b_t", f"has dtype {rows.dtype} but a has {a.dtype}")
    d_out = layout.get("d_out") if isinstance(layout, dict) else None
    if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out < 1:
        raise StoredLayoutError("b_t", f"has no valid d_out in the layout ({layout!r})")
    if rows.dim() != 3 or tuple(rows.shape[:2]) != (e, r) or rows.shape[2] < d_out or not rows.is_contiguous():
        raise StoredLayoutError(
            "b_t", f"has shape {tuple(rows.shape)}; expected a dense ({e}, {r}, row stride >= {d_out})"
        )
    want = pack_prototypes(torch.empty(0, dtype=a.dtype, device="meta"), a.dtype, torch.device("meta")).dtype
    if protos.dtype not in (want, torch.float32):
        raise StoredLayoutError("prototypes", f"has dtype {protos.dtype}; expected {want}")
    if tuple(protos.shape) != (e, d_in) or not protos.is_contiguous():
        raise StoredLayoutError("prototypes", f"has shape {tuple(protos.shape)}; expected ({e}, {d_in})")
    return PackedExperts(protos, a, rows[:, :, :d_out], e, r, mixing)


def pack_into(
    dest: PackedExperts,
    start: int,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    prototypes: torch.Tensor,
) -> None:
    """Pack experts ``start, start + len(a)`` of ``dest`` in place: the values :func:`pack_experts` gives for these
    factors in ``dest``'s dtype, written straight into ``dest`` (a build fills a module chunk by chunk this way,
    without a packed copy of each chunk)."""
    check_factors(a, b, scaling, prototypes)
    c = a.shape[0]
    rows = slice(start, start + c)
    work = torch.promote_types(a.dtype, torch.float32)
    dest.a[rows].copy_(a)
    # The product in the working dtype, rounded once on the way into dest: as pack_experts' (B·s).to(dtype).
    torch.mul(b.to(work).transpose(1, 2), scaling.to(work).view(c, 1, 1), out=dest.b_t[rows])
    dest.prototypes[rows].copy_(pack_prototypes(prototypes, dest.dtype, dest.device))


__all__ = [
    "PackedExperts",
    "pack_experts",
    "pack_prototypes",
    "check_mixing",
    "check_factors",
    "padded_rows",
    "MIXING_MODES",
    "STORED_NAMES",
    "StoredLayoutError",
    "stored_tensors",
    "from_stored",
    "pack_into",
]
