"""Routing analytics: how distinct a library's experts are, and how a patched model routes tokens.

Library side (no model needed):

- :func:`library_stats` (also ``LoraLibrary.stats()``): per target module, the |cos| similarity matrix of the Arrow
  prototypes (sign is irrelevant; an expert with a zero prototype gets a zero row and column, diagonal included) and
  the top singular values of every expert's ``s·B·A``, computed from r×r factors (QR of Aᵀ and of B), never by
  forming ΔW.
- :func:`compare_gks`: a library file keeps only the experts *after* GenKnowSub, so the before/after comparison
  builds both libraries (general adapters off and on) from the adapter directories and returns both statistics.

Model side:

- :func:`record_routing`: a context manager over a patched model that counts, per patched module, how often each
  expert is selected (and selected first), the mean top-1 weight and the mean entropy of the softmax weights over
  the k selected experts. It hooks the ``recorder`` slot that :func:`genknowsub_fast.patch_model` leaves in every
  patched module; with no recorder set, the patched forward pays one ``is not None`` test per call.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .backends import torch_ops
from .library import LoraLibrary, ModuleExperts

_LAYER = re.compile(r"\.(\d+)\.")

__all__ = [
    "ModuleStats",
    "LibraryStats",
    "GksComparison",
    "ModuleRouting",
    "RoutingRecorder",
    "RoutingStats",
    "compare_gks",
    "delta_spectra",
    "layer_index",
    "library_stats",
    "mean_off_diagonal",
    "prototype_similarity",
    "record_routing",
]


def layer_index(path: str) -> int | None:
    """``model.layers.7.mlp.down_proj`` → 7 (the first dotted integer in the path), or None."""
    m = _LAYER.search(f".{path}.")
    return int(m.group(1)) if m else None


def module_kind(path: str) -> str:
    """``model.layers.7.mlp.down_proj`` → ``down_proj``."""
    return path.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------------- library stats


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
            "mean_similarity": _json_float(self.mean_similarity),
            "max_similarity": _json_float(self.max_similarity),
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
            "mean_similarity": _json_float(self.mean_similarity),
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

    Extra keyword arguments go to :meth:`LoraLibrary.from_adapters` (``prototypes``, ``allow_pickle``, ``names``...).
    """
    if not general_dirs:
        raise ValueError("compare_gks needs at least one general adapter directory")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="experts with ΔW = 0")
        before = LoraLibrary.from_adapters(task_dirs, None, **from_adapters_kwargs)
        after = LoraLibrary.from_adapters(task_dirs, general_dirs, gks=gks, **from_adapters_kwargs)
    return GksComparison(library_stats(before, top), library_stats(after, top), before, after)


# ---------------------------------------------------------------------------------------------------- routing stats


@dataclass
class ModuleRouting:
    """Routing counts accumulated for one patched module."""

    path: str
    top_k: int
    counts: torch.Tensor  # (E,) times each expert was among the top-k
    top1_counts: torch.Tensor  # (E,) times each expert was ranked first
    tokens: int = 0
    sum_top1_weight: float = 0.0
    sum_entropy: float = 0.0

    @property
    def layer(self) -> int | None:
        return layer_index(self.path)

    @property
    def mean_top1_weight(self) -> float:
        return self.sum_top1_weight / self.tokens if self.tokens else float("nan")

    @property
    def mean_entropy(self) -> float:
        """Mean entropy (nats) of the softmax weights over the k selected experts; at most log k."""
        return self.sum_entropy / self.tokens if self.tokens else float("nan")

    @property
    def usage(self) -> torch.Tensor:
        """Share of the token's k selections that went to each expert (sums to 1)."""
        total = self.counts.sum()
        return self.counts.double() / total if total > 0 else self.counts.double()

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "layer": self.layer,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "counts": self.counts.tolist(),
            "top1_counts": self.top1_counts.tolist(),
            "mean_top1_weight": _json_float(self.mean_top1_weight),
            "mean_entropy": _json_float(self.mean_entropy),
        }


class RoutingStats:
    """Routing statistics per patched module, filled while :func:`record_routing` is active."""

    def __init__(self, expert_names: Sequence[str] | None = None):
        self.expert_names = list(expert_names) if expert_names is not None else None
        self.modules: dict[str, ModuleRouting] = {}

    def names(self, num_experts: int) -> list[str]:
        if self.expert_names is not None and len(self.expert_names) == num_experts:
            return self.expert_names
        return [f"expert_{i}" for i in range(num_experts)]

    @property
    def kinds(self) -> list[str]:
        """Module kinds (``qkv_proj``, ...) in first-seen order."""
        return list(dict.fromkeys(module_kind(p) for p in self.modules))

    def usage_matrix(self, kind: str | None = None) -> tuple[list[int | None], torch.Tensor]:
        """Layers and the (layers, E) usage share, averaged over the modules of each layer (or only ``kind``)."""
        by_layer: dict[int | None, list[torch.Tensor]] = {}
        for p, m in self.modules.items():
            if kind is None or module_kind(p) == kind:
                by_layer.setdefault(m.layer, []).append(m.usage)
        layers = sorted(by_layer, key=lambda x: -1 if x is None else x)
        if not layers:
            raise ValueError(f"no recorded module named {kind!r}")
        return layers, torch.stack([torch.stack(by_layer[layer]).mean(0) for layer in layers])

    def per_layer(self, attr: str, kind: str | None = None) -> tuple[list[int | None], list[float]]:
        """Layers and the mean of a :class:`ModuleRouting` attribute (e.g. ``mean_entropy``) per layer."""
        by_layer: dict[int | None, list[float]] = {}
        for p, m in self.modules.items():
            if (kind is None or module_kind(p) == kind) and m.tokens:
                by_layer.setdefault(m.layer, []).append(getattr(m, attr))
        layers = sorted(by_layer, key=lambda x: -1 if x is None else x)
        return layers, [sum(by_layer[layer]) / len(by_layer[layer]) for layer in layers]

    def table(self) -> str:
        """One row per module: tokens, mean top-1 weight, mean entropy (and its share of log k), usage per expert."""
        if not self.modules:
            return "no routing recorded"
        e = next(iter(self.modules.values())).counts.numel()
        names = self.names(e)
        w = max(len(p) for p in self.modules)
        head = f"{'module':<{w}}  {'tokens':>6}  {'top-1 w':>7}  {'entropy':>7}  {'/log k':>6}  usage % "
        lines = [head + " ".join(f"{n[:7]:>7}" for n in names)]
        for p, m in self.modules.items():
            norm = m.mean_entropy / math.log(m.top_k) if m.top_k > 1 else float("nan")
            usage = " ".join(f"{100 * u:>7.1f}" for u in m.usage.tolist())
            lines.append(
                f"{p:<{w}}  {m.tokens:>6}  {m.mean_top1_weight:>7.3f}  {m.mean_entropy:>7.3f}  {norm:>6.2f}  "
                + " " * 8
                + usage
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"expert_names": self.expert_names, "modules": {p: m.to_dict() for p, m in self.modules.items()}}


class RoutingRecorder:
    """The object :func:`record_routing` puts in each patched module's ``recorder`` slot.

    ``record`` recomputes the routing with the torch backend's ``route`` on the layer's input and prototypes (the
    fused kernels do not hand their routing back). This costs one extra (T, E) GEMM per patched layer while recording;
    in fp16/bf16 a token whose top-k margin is within rounding may be counted for a different expert than the kernel
    picked. The model's outputs are not affected.
    """

    def __init__(self, stats: RoutingStats):
        self.stats = stats

    @torch.no_grad()
    def record(self, name: str, x: torch.Tensor, packed, top_k: int, temperature: float) -> None:
        protos = packed.prototypes
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.dtype != protos.dtype:
            x2 = x2.to(protos.dtype)
        e = packed.num_experts
        m = self.stats.modules.get(name)
        if m is None:
            zeros = torch.zeros(e, dtype=torch.int64, device=protos.device)
            m = self.stats.modules[name] = ModuleRouting(name, top_k, zeros, zeros.clone())
        if x2.shape[0] == 0:
            return
        w, idx = torch_ops.route(x2, protos, top_k, temperature)
        m.counts += torch.bincount(idx.flatten(), minlength=e)
        m.top1_counts += torch.bincount(idx[:, 0], minlength=e)
        w = w.double()
        m.tokens += x2.shape[0]
        m.sum_top1_weight += float(w[:, 0].sum())
        m.sum_entropy += float(-(w * w.clamp_min(1e-300).log()).sum())


@contextlib.contextmanager
def record_routing(
    model: torch.nn.Module, expert_names: Sequence[str] | None = None, stats: RoutingStats | None = None
) -> Iterator[RoutingStats]:
    """Record the routing of every patched module of ``model`` while the block runs; yields the :class:`RoutingStats`.

    ``expert_names`` (e.g. ``library.expert_names``) label the experts in tables and plots; ``stats`` continues an
    earlier recording.

    ``model`` must be patched by :func:`genknowsub_fast.patch_model`. Recording computes the routing a second time
    with the torch backend (a diagnostic mode: see :class:`RoutingRecorder`); outputs are unchanged. On exit every
    recorder is removed, so the patched forward is back to its single ``recorder is not None`` test.
    """
    from .patching import _STATE, patched_modules

    mods = patched_modules(model)
    if not mods:
        raise ValueError("record_routing needs a model patched by genknowsub_fast.patch_model")
    states = [m.__dict__[_STATE] for m in mods.values()]
    if any(st.recorder is not None for st in states):
        raise ValueError("routing is already being recorded on this model")
    if stats is None:
        stats = RoutingStats(expert_names)
    recorder = RoutingRecorder(stats)
    for st in states:
        st.recorder = recorder
    try:
        yield stats
    finally:
        for st in states:
            st.recorder = None


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) or math.isinf(v) else float(v)
