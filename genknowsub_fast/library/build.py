"""Building a library's experts from adapters: reading the directories, GenKnowSub per module, zero-padding mixed
ranks, and the Arrow prototypes (one batched call for the whole library).

:class:`~genknowsub_fast.library.lora_library.LoraLibrary` validates its arguments and calls these; they return the
pieces a library is made of and know nothing of the file format.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..backends import prototype_ext
from ..backends.packing import PackedExperts, from_stored, pack_into
from ..experts import ModuleExperts, all_finite
from . import file_format, naming
from . import gks as gks_math
from .adapters import FileTensors, LoraAdapter, read_adapter
from .base_model import model_family, model_id
from .layer_prototypes import decoder_layer, group_by_layer, layer_factors


def read_adapter_dirs(
    task_adapters: list[str | os.PathLike],
    general_adapters: list[str | os.PathLike],
    add_adapters: list[str | os.PathLike],
    names: Sequence[str] | None,
    allow_pickle: bool,
    ignore_modules_to_save: bool,
    progress: bool | None,
    general_names: Sequence[str] | None = None,
    add_names: Sequence[str] | None = None,
) -> tuple[list[LoraAdapter], list[LoraAdapter], list[LoraAdapter]]:
    """(tasks, general, added) adapters read from their directories, named ``names`` / ``general_names`` /
    ``add_names`` (default: :func:`.naming.default_names`). Every directory and name is checked before the first file
    is read."""
    naming.check_adapter_dirs(task_adapters + general_adapters + add_adapters)
    # The original code's average-of-tasks variant subtracts the mean of the task adapters themselves.
    tasks_as_general = _same_dirs(general_adapters, task_adapters)
    _check_distinct_dirs(task_adapters, [] if tasks_as_general else general_adapters, add_adapters)
    all_names = (
        naming.adapter_names(task_adapters, names, "task")
        + naming.adapter_names(general_adapters, general_names, "general")
        + naming.adapter_names(add_adapters, add_names, "added")
    )
    if progress is None:
        progress = sys.stderr.isatty()
    paths = task_adapters + general_adapters + add_adapters
    from tqdm.auto import tqdm

    # The bar is closed (and cleared) before an error propagates, so the error starts on a line of its own.
    with tqdm(paths, desc="reading adapters", unit="adapter", disable=not progress, leave=False) as bar:
        read = [
            read_adapter(p, allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save, lazy=True)
            for p in bar
        ]
    n_t, n_g = len(task_adapters), len(general_adapters)
    tasks, general, add = read[:n_t], read[n_t : n_t + n_g], read[n_t + n_g :]
    for adapter, n in zip(read, all_names, strict=True):
        adapter.name = n
    _warn_ignored_modules(read)
    return tasks, general, add


# A build combines, prototypes and packs this many bytes of one group's task factors (in the working dtype) at a time,
# so that it holds the finished library (or, writing a file, one module of it), the general and added adapters'
# factors of one group, and one such chunk: never every adapter and every intermediate at once.
CHUNK_BYTES = 8 * 2**20
# ... or this fraction of the library, when that is more: fewer, larger steps on a big library cost it little memory.
CHUNK_FRACTION = 1 / 64


@dataclass
class ModulePlan:
    """What one module of the library will hold, known from the adapters' headers before anything is read."""

    d_in: int
    d_out: int
    ranks: list[int]  # per task expert, after GenKnowSub (delta: the concatenated rank)
    scalings: list[float]  # per task expert (delta: 1.0, the scalings are folded into B)
    work: torch.dtype  # the dtype GenKnowSub and the prototypes compute in
    dtype: torch.dtype  # the library's dtype
    combine: bool  # whether GenKnowSub combines this module's factors
    _specs: tuple | None = field(default=None, repr=False)

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    def stored_specs(self):
        """(name → (dtype, shape), layout) of the packed tensors a file stores for this module."""
        if self._specs is None:
            self._specs = file_format.stored_specs(len(self.ranks), self.r_max, self.d_in, self.d_out, self.dtype)
        return self._specs


def plan_modules(
    tasks: list[LoraAdapter],
    general: list[LoraAdapter],
    add: list[LoraAdapter],
    gks: str | None,
    already_subtracted: set[str],
    dtype: torch.dtype | None,
) -> dict[str, ModulePlan]:
    """Every module's :class:`ModulePlan`, from the adapters' shapes (nothing is read); ValueError for ranks that
    ``gks="param"`` cannot subtract."""
    plans = {}
    for path in tasks[0].module_paths:
        work = torch.promote_types(tasks[0].dtype(path), torch.float32)
        combine = gks == "delta" or (gks == "param" and path not in already_subtracted)
        if gks == "param" and combine:
            _check_equal_ranks(path, tasks + general + add)
        extra = sum(g.rank(path) for g in general + add) if gks == "delta" else 0
        plans[path] = ModulePlan(
            d_in=int(tasks[0].a_shape(path)[1]),
            d_out=int(tasks[0].b_shape(path)[0]),
            ranks=[t.rank(path) + extra for t in tasks],
            scalings=[1.0 if gks == "delta" else t.scaling[path] for t in tasks],
            work=work,
            dtype=dtype or work,
            combine=combine,
        )
    return plans


def library_bytes(plans: dict[str, ModulePlan]) -> int:
    """Bytes of the library the plans describe (what its file's tensors hold)."""
    total = 0
    for plan in plans.values():
        specs, _ = plan.stored_specs()
        total += sum(dt.itemsize * math.prod(shape) for dt, shape in specs.values())
        total += len(plan.ranks) * (4 + 8)  # scaling float32, ranks int64
    return total


def build_modules(
    tasks: list[LoraAdapter],
    general: list[LoraAdapter],
    add: list[LoraAdapter],
    gks: str | None,
    prototypes: str,
    rng_seed: int | None,
    already_subtracted: set[str],
    general_weights: list[float] | None,
    add_weights: list[float],
    task_weight: float,
    prototype_scope: str,
    base_model_name: str | None,
    dtype: torch.dtype | None = None,
    emit: Callable[[str, ModuleExperts], None] | None = None,
    progress: bool | None = None,
    plans: dict[str, ModulePlan] | None = None,
) -> tuple[dict[str, ModuleExperts], str | None, str | None]:
    """(modules, base model class, base model name): each module's experts after GenKnowSub, padded to one rank, with
    their prototypes, packed in ``dtype`` (default: the working dtype, float32 for float32 or 16-bit adapters).

    The work goes one decoder layer (``prototype_scope="layer"``) or one module at a time, and within it a chunk of
    experts at a time (:data:`CHUNK_BYTES`): each chunk's factors are read, combined, given their prototypes and
    packed into the module's tensors, then dropped. ``emit(path, experts)``, when given, takes each finished module
    instead of the returned dict (which is then empty), so that a file can be written without holding the library.
    The arguments are validated by the caller (``LoraLibrary.from_loaded``).
    """
    base_class, base_name = check_compatible(tasks, general + add, base_model_name)
    if plans is None:
        plans = plan_modules(tasks, general, add, gks, already_subtracted, dtype)
    names = [t.name for t in tasks]
    paths = list(plans)
    groups = group_by_layer(paths) if prototype_scope == "layer" else {p: [p] for p in paths}
    e = len(tasks)
    zero_report: list[str] = []
    modules: dict[str, ModuleExperts] = {}
    item = {p: plan.work.itemsize for p, plan in plans.items()}
    per_expert = {p: plans[p].r_max * (plans[p].d_in + plans[p].d_out) * item[p] for p in paths}
    extra_bytes = {p: sum(_factor_bytes(g, p) for g in general + add) for p in paths}
    total = sum(_factor_bytes(t, p) for t in tasks for p in paths) + sum(extra_bytes.values())
    chunk_bytes = max(CHUNK_BYTES, int(library_bytes(plans) * CHUNK_FRACTION))
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="building library", unit="B", unit_scale=True, disable=not progress,
              leave=False) as bar:  # fmt: skip
        for layer, group in groups.items():
            extra = {}
            for p in group:
                w = plans[p].work
                gen_f = [(g.a[p].to(w), g.b[p].to(w)) for g in general]
                add_f = [(g.a[p].to(w), g.b[p].to(w)) for g in add]
                if gks == "param" and plans[p].combine:  # the general sums once per module, not per chunk
                    extra[p] = gks_math.param_terms(gen_f, general_weights, add_f, add_weights)
                else:
                    extra[p] = (gen_f, add_f)
                del gen_f, add_f
                bar.update(extra_bytes[p])
            step = max(1, chunk_bytes // max(1, sum(per_expert[p] for p in group)))
            outs: dict[str, PackedExperts] = {}
            zeros: dict[str, list[torch.Tensor]] = {p: [] for p in group}
            for i0 in range(0, e, step):
                chunk = tasks[i0 : i0 + step]
                raw = {
                    p: _combined_chunk(p, plans[p], chunk, general, add, extra[p], gks, general_weights,
                                       add_weights, task_weight)  # fmt: skip
                    for p in group
                }
                if prototype_scope == "layer":
                    a_cat, b_cat = layer_factors(layer, raw)
                    protos, zero = prototype_ext.prototypes_by_method([a_cat], [b_cat], prototypes, rng_seed)
                    for p in group:
                        raw[p].prototypes = protos[0].to(raw[p].a.dtype).clone()
                        zeros[p].append(zero[0])
                else:
                    for p in group:
                        m = raw[p]
                        protos, zero = prototype_ext.prototypes_by_method([m.a], [m.b], prototypes, rng_seed)
                        m.prototypes = protos[0]
                        zeros[p].append(zero[0])
                for p in group:
                    plan, m = plans[p], raw.pop(p)
                    if p not in outs:
                        specs, layout = plan.stored_specs()
                        dev = m.a.device
                        stored = {k: torch.empty(shape, dtype=dt, device=dev) for k, (dt, shape) in specs.items()}
                        stored["b_t"][:, :, layout["d_out"] :].zero_()  # the rows' filler; pack_into writes the rest
                        outs[p] = from_stored(stored, layout)
                    # Packed from the working dtype: s·Bᵀ is rounded to the library's dtype once. The prototypes are
                    # rounded to it first, as a library in that dtype holds them.
                    pack_into(outs[p], i0, m.a, m.b, m.scaling, m.prototypes.to(plan.dtype))
                    del m
                bar.update(sum(_factor_bytes(t, p) for t in chunk for p in group))
            for p in group:
                plan = plans[p]
                packed = outs.pop(p)
                experts = ModuleExperts.from_packed(
                    packed,
                    torch.tensor(plan.scalings, dtype=torch.float32, device=packed.device),
                    torch.tensor(plan.ranks, dtype=torch.int64, device=packed.device),
                )
                zero = torch.cat(zeros[p])
                if bool(zero.any()):
                    zero_report.append(f"{p}: {[names[i] for i in zero.nonzero().flatten().tolist()]}")
                if emit is not None:
                    emit(p, experts)
                else:
                    modules[p] = experts
    if zero_report:
        what = "layers" if prototype_scope == "layer" else "modules"
        if prototype_scope == "layer":  # one line per layer, as its modules share the prototypes
            by_layer = {}
            for line in zero_report:
                p, rest = line.split(": ", 1)
                by_layer.setdefault(decoder_layer(p), rest)
            zero_report = [f"{k}: {v}" for k, v in by_layer.items()]
        warnings.warn(
            "experts with ΔW = 0 get a zero prototype (never routed to unless all are zero): "
            + "; ".join(zero_report[:5])
            + (f" and {len(zero_report) - 5} more {what}" if len(zero_report) > 5 else ""),
            stacklevel=3,
        )
    return modules, base_class, base_name


def _factor_bytes(adapter: LoraAdapter, path: str) -> int:
    """Bytes of one adapter's A and B of module ``path`` (as stored)."""
    item = adapter.dtype(path).itemsize
    return (math.prod(adapter.a_shape(path)) + math.prod(adapter.b_shape(path))) * item


def _combined_chunk(
    path: str,
    plan: ModulePlan,
    chunk: list[LoraAdapter],
    general: list[LoraAdapter],
    add: list[LoraAdapter],
    extra: tuple,
    gks: str | None,
    general_weights: list[float] | None,
    add_weights: list[float],
    task_weight: float,
) -> ModuleExperts:
    """One chunk of task experts of module ``path`` after GenKnowSub, padded to the module's rank (working dtype).
    ``extra``: the general and added factors (``gks="delta"``), or their sums (``"param"``, :func:`param_terms`)."""
    w = plan.work
    scalings = [t.scaling[path] for t in chunk]
    if gks == "delta":
        gen_f, add_f = extra
        task_f = [(t.a[path].to(w), t.b[path].to(w)) for t in chunk]
        gen_s = [(a, b, g.scaling[path]) for (a, b), g in zip(gen_f, general, strict=True)]
        add_s = [(a, b, g.scaling[path]) for (a, b), g in zip(add_f, add, strict=True)]
        task_s = [(a, b, s) for (a, b), s in zip(task_f, scalings, strict=True)]
        sub = gks_math.combine_delta(task_s, gen_s, general_weights, add_s, add_weights, task_weight)
        task_f, scalings = [(a, b) for a, b, _ in sub], [s for _, _, s in sub]
        a, b = _pad_stack([a for a, _ in task_f], 0, plan.r_max), _pad_stack([b for _, b in task_f], 1, plan.r_max)
        ranks = [x.shape[0] for x, _ in task_f]
    else:
        a, b = _read_stacked(path, plan, chunk)
        if gks == "param" and plan.combine:
            # Every expert has the module's rank here, so the chunk is combined as one stacked tensor: the same
            # element-wise arithmetic as expert by expert, with the general terms broadcast.
            gks_math.apply_param_(a, b, extra, task_weight)
        ranks = [t.rank(path) for t in chunk]
    return ModuleExperts(a, b, torch.tensor(scalings, dtype=torch.float32), torch.empty(0),
                         torch.tensor(ranks, dtype=torch.int64))  # fmt: skip


def _read_stacked(path: str, plan: ModulePlan, chunk: list[LoraAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's A (c, r_max, d_in) and B (c, d_out, r_max) in the working dtype, read straight into one stacked
    tensor each (zero past each expert's rank); NaN or Inf is a ValueError naming the adapter and tensor."""
    c, r_max, w = len(chunk), plan.r_max, plan.work
    mixed = any(t.rank(path) != r_max for t in chunk)
    make = torch.zeros if mixed else torch.empty
    a = make(c, r_max, plan.d_in, dtype=w)
    b = make(c, plan.d_out, r_max, dtype=w)

    def read(i: int) -> None:
        t = chunk[i]
        r = t.rank(path)
        _read_factor(t.a, path, a[i, :r])
        if r == r_max:
            _read_factor(t.b, path, b[i])
        else:
            b[i, :, :r].copy_(t.b[path])

    # File reads release the GIL: as many threads read as torch computes with.
    threads = min(c, torch.get_num_threads())
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(c)))
    else:
        for i in range(c):
            read(i)
    if not (all_finite(a) and all_finite(b)):
        for i, t in enumerate(chunk):  # name the first adapter at fault
            for factors, x in ((t.a, a[i]), (t.b, b[i])):
                if not all_finite(x):
                    if isinstance(factors, FileTensors):
                        factors.check_finite(path, x)
                    raise ValueError(f"adapter {t.name!r}: module {path!r} contains NaN or Inf")
    return a, b


def _read_factor(factors, path: str, out: torch.Tensor) -> None:
    if isinstance(factors, FileTensors):
        factors.read_into(path, out, check=False)
    else:
        out.copy_(factors[path])


def _pad_stack(mats: list[torch.Tensor], dim: int, size: int) -> torch.Tensor:
    """Stack 2-D matrices after zero-padding dimension ``dim`` to ``size``."""
    out = []
    for m in mats:
        pad = size - m.shape[dim]
        if pad:
            shape = list(m.shape)
            shape[dim] = pad
            m = torch.cat([m, m.new_zeros(shape)], dim=dim)
        out.append(m)
    return torch.stack(out)


def _same_dirs(a: Sequence[str | os.PathLike], b: Sequence[str | os.PathLike]) -> bool:
    """True when ``a`` and ``b`` name the same directories (after resolving links) in the same order."""
    real = [os.path.realpath(os.fspath(p)) for p in a]
    return bool(real) and real == [os.path.realpath(os.fspath(p)) for p in b]


def _check_distinct_dirs(
    tasks: Sequence[str | os.PathLike], general: Sequence[str | os.PathLike], added: Sequence[str | os.PathLike] = ()
) -> None:
    """The same adapter directory (after resolving links) may appear only once among task, general and added
    adapters."""
    seen: dict[str, str] = {}
    for kind, paths in (("task", tasks), ("general", general), ("added", added)):
        for p in paths:
            real = os.path.realpath(os.fspath(p))
            if real in seen:
                first = seen[real]
                how = f"among the {kind} adapters" if first == kind else f"(as {first} adapter and as {kind} adapter)"
                raise ValueError(f"adapter directory {os.fspath(p)!r} is given twice {how}")
            seen[real] = kind


def check_compatible(
    tasks: list[LoraAdapter], general: list[LoraAdapter], base_model_name: str | None = None
) -> tuple[str | None, str | None]:
    """All adapters target the same modules with the same shapes and come from one base model class.

    Returns (base model class, base model name): the name is ``base_model_name`` when given (the adapters' own names
    are then not compared), else the first adapter's ``base_model_name_or_path``.
    """
    ref = tasks[0]
    classes = {a.base_model_class for a in tasks + general if a.base_model_class}
    families = {model_family(c) for c in classes}
    if len(families) > 1:
        raise ValueError(f"adapters were trained on different base models: {sorted(classes)}")
    named = [a for a in tasks + general if a.base_model_name]
    if base_model_name is None:
        ids = {model_id(a.base_model_name) for a in named}
        if len(ids) > 1:
            which = sorted({f"{a.name}: {a.base_model_name}" for a in named})
            raise ValueError(
                f"adapters name different base models ({'; '.join(which[:4])}); if these are one model named two "
                "ways, pass base_model_name=... (command line: --base-model-name)"
            )
        base_model_name = named[0].base_model_name if named else None
    for ad in tasks[1:] + general:
        if set(ad.module_paths) != set(ref.module_paths):
            diff = sorted(set(ad.module_paths) ^ set(ref.module_paths))[:4]
            raise ValueError(
                f"adapter {ad.name!r} targets other modules than {ref.name!r} (differences: {diff}); "
                "every task and general adapter must target the same modules"
            )
        for p in ref.module_paths:
            (_, d_in), (d_out, _) = ad.a_shape(p), ad.b_shape(p)
            (_, ref_in), (ref_out, _) = ref.a_shape(p), ref.b_shape(p)
            if d_in != ref_in or d_out != ref_out:
                raise ValueError(
                    f"module {p!r}: adapter {ad.name!r} has d_in×d_out {d_in}×{d_out}, "
                    f"{ref.name!r} has {ref_in}×{ref_out}: adapters for another base model?"
                )
    return (next(iter(classes)) if classes else None), base_model_name


def _warn_ignored_modules(adapters: Sequence[LoraAdapter]) -> None:
    """One warning listing the modules_to_save that ``ignore_modules_to_save=True`` left out, if any."""
    ignored = sorted({m for a in adapters for m in a.ignored_modules})
    if ignored:
        who = [a.name for a in adapters if a.ignored_modules]
        warnings.warn(
            f"left out the whole-module weights (modules_to_save) of {len(who)} adapter(s) for {ignored}: "
            "the patched model keeps its own weights there",
            stacklevel=3,
        )


def _check_equal_ranks(path: str, adapters: list[LoraAdapter]) -> None:
    ranks = {ad.name: ad.rank(path) for ad in adapters}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f'gks="param" subtracts factors, so all ranks must agree; module {path!r} has ranks {ranks}. '
            'Use gks="delta" for mixed ranks.'
        )


__all__ = [
    "read_adapter_dirs",
    "build_modules",
    "plan_modules",
    "library_bytes",
    "check_compatible",
    "ModulePlan",
    "CHUNK_BYTES",
]
