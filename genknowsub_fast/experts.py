"""ModuleExperts: the experts of one target module, the unit every layer of the package passes around.

A library holds one per target module; the ops prepare a runner from one; the analytics read them. It is plain data
(no knowledge of models or files); packed experts hold the kernels' layout (:mod:`.backends.packing`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .backends.packing import PackedExperts, pack_experts, pack_prototypes, stored_tensors


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf.

    One reduction: NaN propagates through min/max and ±Inf shows at one end, and no full-size temporary is made
    (``torch.isfinite(t).all()`` makes one: 205 ms against 0.4 ms for this, median of 20, on 2.4 M float32 here).
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class ModuleExperts:
    """The E experts of one target module, after GenKnowSub.

    Built from the factors, ``ModuleExperts(a, b, scaling, prototypes, ranks)``, or held in the layout the kernels
    read (:meth:`from_packed`: a library's modules, and a patched layer's), where each expert is stored once:
    ``a`` and ``prototypes`` are then the packed tensors themselves and ``b`` is computed from the packed ``s·Bᵀ`` on
    each access (``b_t / s``: exact when s is a power of two, else within a rounding of the dtype).

    Attributes:
        a: (E, r_max, d_in) LoRA A factors; rows past an expert's rank are zero.
        b: (E, d_out, r_max) LoRA B factors; columns past an expert's rank are zero.
        scaling: (E,) float32, ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) per expert.
        prototypes: (E, d_in) unit Arrow prototypes (a zero row for an expert whose ΔW is zero); float32 (float64 for a
            float64 library) when packed, as the routing scores read them.
        ranks: (E,) int64, each expert's true rank (≤ r_max).
        packed: the experts in the kernels' layout (:class:`~genknowsub_fast.backends.packing.PackedExperts`) on their
            device and in their dtype, or None for experts given as factors.
    """

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: torch.Tensor,
        prototypes: torch.Tensor,
        ranks: torch.Tensor,
    ):
        self._a, self._b, self._prototypes = a, b, prototypes
        self.scaling = scaling
        self.ranks = ranks
        self.packed: PackedExperts | None = None

    @classmethod
    def from_packed(cls, packed: PackedExperts, scaling: torch.Tensor, ranks: torch.Tensor) -> ModuleExperts:
        """Experts held only in their packed layout (no separate copy of the factors)."""
        m = cls.__new__(cls)
        m._a = m._b = m._prototypes = None
        m.scaling, m.ranks, m.packed = scaling, ranks, packed
        return m

    # ------------------------------------------------------------------------------------------------- factors
    @property
    def a(self) -> torch.Tensor:
        return self.packed.a if self.packed is not None else self._a

    @a.setter
    def a(self, value: torch.Tensor) -> None:
        self._settable("a")
        self._a = value

    @property
    def b(self) -> torch.Tensor:
        if self.packed is None:
            return self._b
        p = self.packed
        work = torch.promote_types(p.dtype, torch.float32)
        s = self.scaling.to(device=p.device, dtype=work).view(-1, 1, 1)
        b_t = p.b_t.to(work)
        b_t = torch.where(s != 0, b_t / torch.where(s != 0, s, 1), 0)  # an expert with scaling 0 adds nothing
        return b_t.transpose(1, 2).to(p.dtype).contiguous()

    @b.setter
    def b(self, value: torch.Tensor) -> None:
        self._settable("b")
        self._b = value

    @property
    def prototypes(self) -> torch.Tensor:
        return self.packed.prototypes if self.packed is not None else self._prototypes

    @prototypes.setter
    def prototypes(self, value: torch.Tensor) -> None:
        if self.packed is not None:
            p = self.packed
            if tuple(value.shape) != tuple(p.prototypes.shape) or not value.is_floating_point():
                raise ValueError(f"prototypes must be float ({p.num_experts}, {p.d_in}), got {tuple(value.shape)}")
            self.packed = replace(p, prototypes=pack_prototypes(value, p.dtype, p.device))
        else:
            self._prototypes = value

    def _settable(self, name: str) -> None:
        if self.packed is not None:
            raise ValueError(f"packed experts hold {name} in the kernels' layout; build new ModuleExperts instead")

    # --------------------------------------------------------------------------------------------------- shapes
    @property
    def is_packed(self) -> bool:
        """True when the experts are held only in the kernels' layout (:attr:`packed`)."""
        return self.packed is not None

    @property
    def num_experts(self) -> int:
        return int(self.a.shape[0])

    @property
    def rank(self) -> int:
        """r_max, the padded rank."""
        return int(self.a.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.a.shape[2])

    @property
    def d_out(self) -> int:
        return int(self.packed.d_out if self.packed is not None else self._b.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of A (and of B, or of the packed s·Bᵀ)."""
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def nbytes(self) -> int:
        """Bytes the experts hold (the packed tensors, padding included, or the factors)."""
        if self.packed is not None:
            tensors = list(stored_tensors(self.packed)[0].values())
        else:
            tensors = [self._a, self._b, self._prototypes]
        return sum(t.numel() * t.element_size() for t in [*tensors, self.scaling, self.ranks])

    # ------------------------------------------------------------------------------------------------- packing
    def packed_for(self, device: torch.device | str, dtype: torch.dtype, mixing: str = "output") -> PackedExperts:
        """The experts in the layout the kernels read on ``device`` in ``dtype``: the held packed form when it is that
        one (no copy), else a new packing (from the packed form, whose scaling is already folded, or the factors)."""
        device = torch.device(device)
        p = self.packed
        if p is not None and p.device == device and p.dtype == dtype:
            return p if p.mixing == mixing else replace(p, mixing=mixing)
        if p is not None:
            # Moved as they are first (one copy of the packed bytes to the device), then packed there.
            a, b_t, protos = (t.to(device) for t in (p.a, p.b_t, p.prototypes))
            ones = torch.ones(p.num_experts, dtype=torch.float32, device=device)
            return pack_experts(a, b_t.transpose(1, 2), ones, protos, mixing, None, dtype, device)
        return pack_experts(self._a, self._b, self.scaling, self._prototypes, mixing, self.ranks, dtype, device)

    def packed_copy(self, device=None, dtype=None) -> ModuleExperts:
        """These experts held packed (:meth:`from_packed`) on ``device`` in ``dtype`` (default: where they are)."""
        device = torch.device(device) if device is not None else self.device
        packed = self.packed_for(device, dtype or self.dtype)
        if packed is self.packed:
            return self
        return ModuleExperts.from_packed(packed, self.scaling.to(device=device), self.ranks.to(device=device))

    def check_finite(self) -> None:
        """ValueError naming the first of A, B, scaling, prototypes that holds NaN or Inf (experts given as raw
        tensors; a library's experts are checked when it is built or loaded)."""
        b = ("B", self.packed.b_t) if self.packed is not None else ("B", self._b)
        for name, t in (("A", self.a), b, ("scaling", self.scaling), ("prototypes", self.prototypes)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf")

    def to(self, device=None, dtype=None) -> ModuleExperts:
        """A copy with A, B and the prototypes on ``device`` / in ``dtype`` (scaling stays float32, ranks int64).

        Packed experts stay packed (the prototypes keep the packing's float32); moving them where they already are
        returns them as they are.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"experts are stored in a floating-point dtype, got {dtype}")
        if self.packed is not None:
            return self.packed_copy(device, dtype)
        return ModuleExperts(
            self.a.to(device=device, dtype=dtype),
            self.b.to(device=device, dtype=dtype),
            self.scaling.to(device=device),
            self.prototypes.to(device=device, dtype=dtype),
            self.ranks.to(device=device),
        )

    def __repr__(self) -> str:
        ranks = sorted({int(r) for r in self.ranks.tolist()})
        dtype = str(self.a.dtype).replace("torch.", "")
        return (
            f"ModuleExperts({self.num_experts} experts, {self.d_in}→{self.d_out}, "
            f"rank {'/'.join(map(str, ranks))}, {dtype}, {self.a.device}{', packed' * self.is_packed})"
        )


__all__ = ["ModuleExperts", "all_finite"]
