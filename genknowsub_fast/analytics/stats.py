"""Library statistics, from a library alone (no model): how distinct the experts are, before and after GenKnowSub.

- :func:`library_stats`: per target module, the |cos| similarity matrix of the Arrow prototypes (sign is irrelevant;
  an expert with a zero prototype gets a zero row and column, diagonal included) and the top singular values of every
  expert's ``s·B·A``, computed from r×r factors (QR of Aᵀ and of B), never by forming ΔW.
- :func:`compare_gks`: a library file keeps only the experts *after* GenKnowSub, so the before/after comparison
  builds both libraries (general adapters off and on) from the adapter directories and returns both statistics.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..experts import ModuleExperts
from ..library import LoraLibrary
from .common import json_float, module_kind


def prototype_similarity(prototypes: torch.Tensor) -> torch.Tensor:
    """|cos| between every pair of prototypes (E, d_in) → (E, E) float64, symmetric.

    Non-zero experts have a diagonal of exactly 1; a zero prototype (an expert with ΔW = 0) has a zero row and column.
    """
    p = prototypes.detach().to(torch.float64)
    norms = p.norm(dim=1)
    nonzero = norms > 0
    unit = p / torch.where(nonzero, norms, torch.ones_like(norms))[:, None]
    sim = (unit @ unit.T).abs().clamp_(max=1.0)
    sim = (sim + sim.T) / 2  # exact symmetry despite rounding
    sim.diagonal().copy_(nonzero.to(sim.dtype))
    return sim


def mean_off_diagonal(sim: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN for a 1×1 matrix)."""
    e = sim.shape[0]
    if e < 2:
        return float("nan")
    return float((sim.sum() - sim.diagonal().sum()) / (e * (e - 1)))


def delta_spectra(experts: ModuleExperts, top: int | None = None) -> torch.Tensor:
    """Singular values (E, n) of every expert's ``ΔW_e = s_e·B_e·A_e``, largest first, float64.

    With ``Aᵀ = Q_a R_a`` and ``B = Q_b R_b`` (reduced QR), ``ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ`` has the singular values of
    the r×r matrix ``s·R_b R_aᵀ``; ΔW (d_out × d_in) is never formed. ``n = min(top, r_max)``.
    """
    a = experts.a.detach().to(torch.float64)
    b = experts.b.detach().to(torch.float64)
    _, r_a = torch.linalg.qr(a.transpose(1, 2))  # (E, min(d_in, r), r)
    _, r_b = torch.linalg.qr(b)  # (E, min(d_out, r), r)
    core = experts.scaling.detach().to(torch.float64).view(-1, 1, 1) * (r_b @ r_a.transpose(1, 2))
    sv = torch.linalg.svdvals(core)
    return sv[:, :top] if top is not None else sv


@dataclass
class ModuleStats:
    """Statistics of one target module's experts."""

    path: str
    similarity: torch.Tensor  # (E, E) |cos| of the prototypes
    spectra: torch.Tensor  # (E, n) top singular values of s·B·A
    zero_experts: list[int] = field(default_factory=list)

    @property
    def mean_similarity(self) -> float:
        """Mean off-diagonal |cos| between prototypes (lower = more distinct experts)."""
        return mean_off_diagonal(self.similarity)

    @property
    def max_similarity(self) -> float:
        """Largest off-diagonal |cos|."""
        e = self.similarity.shape[0]
        if e < 2:
            return float("nan")
        off = self.similarity.masked_fill(torch.eye(e, dtype=torch.bool), float("-inf"))
        return float(off.max())

    @property
    def spectral_gap(self) -> torch.Tensor:
        """σ₁/σ₂ per expert (inf for rank-1 experts, NaN for zero experts): how well-defined each prototype is."""
        if self.spectra.shape[1] < 2:
            return torch.full((self.spectra.shape[0],), float("inf"), dtype=torch.float64)
        s1, s2 = self.spectra[:, 0], self.spectra[:, 1]
        return torch.where(s1 > 0, s1 / s2, torch.full_like(s1, float("nan")))

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "similarity": self.similarity.tolist(),
            "spectra": self.spectra.tolist(),
            "zero_experts": list(self.zero_experts),
            "mean_similarity": json_float(self.mean_similarity),
            "max_similarity": json_float(self.max_similarity),
        }


@dataclass
class LibraryStats:
    """Statistics of every module of a library (see :func:`library_stats`)."""

    expert_names: list[str]
    modules: dict[str, ModuleStats]
    gks: str | None = None
    general_names: list[str] = field(default_factory=list)

    @property
    def mean_similarity(self) -> float:
        """Mean off-diagonal prototype |cos| over all modules."""
        vals = [m.mean_similarity for m in self.modules.values()]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def mean_similarity_matrix(self, kind: str | None = None) -> torch.Tensor:
        """The (E, E) |cos| matrix averaged over all modules (or over modules named ``kind``, e.g. ``qkv_proj``)."""
        mats = [m.similarity for p, m in self.modules.items() if kind is None or module_kind(p) == kind]
        if not mats:
            raise ValueError(f"no module named {kind!r}")
        return torch.stack(mats).mean(0)

    def table(self) -> str:
        """Per module: mean and max off-diagonal |cos|, mean σ₁ and mean σ₁/σ₂ of the experts."""
        gks = f"GenKnowSub {self.gks} ({len(self.general_names)} general)" if self.gks else "no GenKnowSub"
        lines = [
            f"{len(self.expert_names)} experts, {len(self.modules)} modules, {gks}",
            f"{'module':<{self._width()}}  {'mean|cos|':>9}  {'max|cos|':>8}  {'mean σ1':>9}  {'σ1/σ2':>7}",
        ]
        for path, m in self.modules.items():
            gap = m.spectral_gap
            gap = gap[torch.isfinite(gap)]
            lines.append(
                f"{path:<{self._width()}}  {m.mean_similarity:>9.4f}  {m.max_similarity:>8.4f}  "
                f"{float(m.spectra[:, 0].mean()):>9.4g}  {float(gap.mean()) if gap.numel() else float('nan'):>7.2f}"
                + (f"  zero: {[self.expert_names[i] for i in m.zero_experts]}" if m.zero_experts else "")
            )
        lines.append(f"{'all modules':<{self._width()}}  {self.mean_similarity:>9.4f}")
        return "\n".join(lines)

    def _width(self) -> int:
        return max([len(p) for p in self.modules] + [11])

    def to_dict(self) -> dict:
        return {
            "expert_names": list(self.expert_names),
            "gks": self.gks,
            "general_names": list(self.general_names),
            "mean_similarity": json_float(self.mean_similarity),
            "modules": {p: m.to_dict() for p, m in self.modules.items()},
        }


def library_stats(lib: LoraLibrary, top: int | None = 8) -> LibraryStats:
    """Prototype |cos| matrices and ΔW spectra (``top`` singular values) of every module of ``lib``."""
    modules = {}
    for path, m in lib.modules.items():
        zero = (~(m.prototypes != 0).any(dim=1)).nonzero().flatten().tolist()
        modules[path] = ModuleStats(path, prototype_similarity(m.prototypes), delta_spectra(m, top), zero)
    return LibraryStats(list(lib.expert_names), modules, lib.gks, list(lib.general_names))


@dataclass
class GksComparison:
    """The same task experts without (``before``) and with (``after``) GenKnowSub."""

    before: LibraryStats
    after: LibraryStats
    before_library: LoraLibrary | None = field(default=None, repr=False)
    after_library: LoraLibrary | None = field(default=None, repr=False)

    def table(self) -> str:
        """Per module: mean off-diagonal |cos| before and after GKS, and the change."""
        w = self.after._width()
        lines = [
            f"prototype similarity (mean off-diagonal |cos|), {len(self.after.expert_names)} experts, "
            f"GenKnowSub {self.after.gks} with {len(self.after.general_names)} general adapters",
            f"{'module':<{w}}  {'before':>8}  {'after':>8}  {'change':>8}",
        ]
        for path, after in self.after.modules.items():
            b, a = self.before.modules[path].mean_similarity, after.mean_similarity
            lines.append(f"{path:<{w}}  {b:>8.4f}  {a:>8.4f}  {a - b:>+8.4f}")
        b, a = self.before.mean_similarity, self.after.mean_similarity
        lines.append(f"{'all modules':<{w}}  {b:>8.4f}  {a:>8.4f}  {a - b:>+8.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}


def compare_gks(
    task_dirs: Sequence[str | os.PathLike],
    general_dirs: Sequence[str | os.PathLike],
    gks: str = "param",
    top: int | None = 8,
    **from_adapters_kwargs,
) -> GksComparison:
    """Build the library from ``task_dirs`` without and with GenKnowSub against ``general_dirs`` and compare them.

    Extra keyword arguments go to :meth:`LoraLibrary.from_adapters` (``prototypes``, ``allow_pickle``, ``names``...);
    those of the general and added adapters (``general_names``, ``general_weights``, ``add_adapters``, ``add_names``,
    ``add_weights``, ``task_weight``) only to the library with GenKnowSub.
    """
    if not general_dirs:
        raise ValueError("compare_gks needs at least one general adapter directory")
    gks_only = ("general_names", "general_weights", "add_adapters", "add_names", "add_weights", "task_weight")
    before_kwargs = {k: v for k, v in from_adapters_kwargs.items() if k not in gks_only}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="experts with ΔW = 0")
        before = LoraLibrary.from_adapters(task_dirs, None, **before_kwargs)
        after = LoraLibrary.from_adapters(task_dirs, general_dirs, gks=gks, **from_adapters_kwargs)
    return GksComparison(library_stats(before, top), library_stats(after, top), before, after)


__all__ = [
    "ModuleStats",
    "LibraryStats",
    "GksComparison",
    "compare_gks",
    "delta_spectra",
    "library_stats",
    "mean_off_diagonal",
    "prototype_similarity",
]
