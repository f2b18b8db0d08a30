"""Building a library's experts from adapters: reading the directories, GenKnowSub per module, zero-padding mixed
ranks, and the Arrow prototypes (one batched call for the whole library).

:class:`~genknowsub_fast.library.lora_library.LoraLibrary` validates its arguments and calls these; they return the
pieces a library is made of and know nothing of the file format.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch

from ..backends import prototype_ext
from ..experts import ModuleExperts
from . import file_checks as checks
from . import gks as gks_math
from .adapters import LoraAdapter, read_adapter
from .base_model import model_family, model_id
from .layer_prototypes import group_by_layer, layer_factors


def read_adapter_dirs(
    task_adapters: list[str | os.PathLike],
    general_adapters: list[str | os.PathLike],
    add_adapters: list[str | os.PathLike],
    names: Sequence[str] | None,
    allow_pickle: bool,
    ignore_modules_to_save: bool,
    progress: bool | None,
) -> tuple[list[LoraAdapter], list[LoraAdapter], list[LoraAdapter]]:
    """(tasks, general, added) adapters read from their directories, the task adapters named ``names`` (default: the
    directory names). Every directory and name is checked before the first file is read."""
    for p in task_adapters + general_adapters + add_adapters:
        if not os.path.isdir(p):
            raise ValueError(f"adapter path {os.fspath(p)!r} does not exist or is not a directory")
    # The original code's average-of-tasks variant subtracts the mean of the task adapters themselves.
    tasks_as_general = _same_dirs(general_adapters, task_adapters)
    _check_distinct_dirs(task_adapters, [] if tasks_as_general else general_adapters, add_adapters)
    task_names = list(names) if names is not None else [_dir_name(p) for p in task_adapters]
    try:
        checks.check_names(task_names, "expert names")
        checks.check_names([_dir_name(p) for p in general_adapters], "general adapter names", allow_empty=True)
        checks.check_names([_dir_name(p) for p in add_adapters], "added adapter names", allow_empty=True)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; pass names=[...] (command line: --names) to name task experts whose directories share a name"
        ) from None
    if progress is None:
        progress = sys.stderr.isatty()
    paths = task_adapters + general_adapters + add_adapters
    from tqdm.auto import tqdm

    # The bar is closed (and cleared) before an error propagates, so the error starts on a line of its own.
    with tqdm(paths, desc="reading adapters", unit="adapter", disable=not progress, leave=False) as bar:
        read = [
            read_adapter(p, allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save) for p in bar
        ]
    n_t, n_g = len(task_adapters), len(general_adapters)
    tasks, general, add = read[:n_t], read[n_t : n_t + n_g], read[n_t + n_g :]
    for adapter, n in zip(tasks, task_names, strict=True):
        adapter.name = n
    _warn_ignored_modules(read)
    return tasks, general, add


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
) -> tuple[dict[str, ModuleExperts], str | None, str | None]:
    """(modules, base model class, base model name): each module's experts after GenKnowSub, padded to one rank, with
    their prototypes. The arguments are validated by the caller (``LoraLibrary.from_loaded``)."""
    base_class, base_name = _check_compatible(tasks, general + add, base_model_name)
    modules: dict[str, ModuleExperts] = {}
    for path in tasks[0].module_paths:
        work = torch.promote_types(tasks[0].a[path].dtype, torch.float32)
        task_f = [(t.a[path].to(work), t.b[path].to(work)) for t in tasks]
        gen_f = [(g.a[path].to(work), g.b[path].to(work)) for g in general]
        add_f = [(g.a[path].to(work), g.b[path].to(work)) for g in add]
        scalings = [t.scaling[path] for t in tasks]
        if gks == "param" and path not in already_subtracted:
            _check_equal_ranks(path, tasks + general + add)
            task_f = gks_math.combine_param(task_f, gen_f, general_weights, add_f, add_weights, task_weight)
        elif gks == "delta":
            gen_s = [(a, b, g.scaling[path]) for (a, b), g in zip(gen_f, general, strict=True)]
            add_s = [(a, b, g.scaling[path]) for (a, b), g in zip(add_f, add, strict=True)]
            task_s = [(a, b, s) for (a, b), s in zip(task_f, scalings, strict=True)]
            sub = gks_math.combine_delta(task_s, gen_s, general_weights, add_s, add_weights, task_weight)
            task_f, scalings = [(a, b) for a, b, _ in sub], [s for _, _, s in sub]
        ranks = [a.shape[0] for a, _ in task_f]
        r_max = max(ranks)
        modules[path] = ModuleExperts(
            a=_pad_stack([a for a, _ in task_f], 0, r_max),
            b=_pad_stack([b for _, b in task_f], 1, r_max),
            scaling=torch.tensor(scalings, dtype=torch.float32),
            prototypes=torch.empty(0),
            ranks=torch.tensor(ranks, dtype=torch.int64),
        )
    names = [t.name for t in tasks]
    if prototype_scope == "layer":
        _fill_layer_prototypes(modules, prototypes, rng_seed, names)
    else:
        _fill_prototypes(modules, prototypes, rng_seed, names)
    return modules, base_class, base_name


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


def _dir_name(path: str | os.PathLike) -> str:
    return os.path.basename(os.path.normpath(os.fspath(path)))


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


def _check_compatible(
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
            if ad.a[p].shape[1] != ref.a[p].shape[1] or ad.b[p].shape[0] != ref.b[p].shape[0]:
                raise ValueError(
                    f"module {p!r}: adapter {ad.name!r} has d_in×d_out {ad.a[p].shape[1]}×{ad.b[p].shape[0]}, "
                    f"{ref.name!r} has {ref.a[p].shape[1]}×{ref.b[p].shape[0]}: adapters for another base model?"
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


def _fill_prototypes(
    modules: dict[str, ModuleExperts], method: str, rng_seed: int | None, names: list[str], what: str = "modules"
) -> None:
    """Compute every module's prototypes: one batched call for the exact method."""
    paths = list(modules)
    protos, zeros = prototype_ext.prototypes_by_method(
        [modules[p].a for p in paths], [modules[p].b for p in paths], method, rng_seed, progress=True
    )
    zero_report = []
    for p, proto, zero in zip(paths, protos, zeros, strict=True):
        modules[p].prototypes = proto
        if bool(zero.any()):
            zero_report.append(f"{p}: {[names[i] for i in zero.nonzero().flatten().tolist()]}")
    if zero_report:
        warnings.warn(
            "experts with ΔW = 0 get a zero prototype (never routed to unless all are zero): "
            + "; ".join(zero_report[:5])
            + (f" and {len(zero_report) - 5} more {what}" if len(zero_report) > 5 else ""),
            stacklevel=3,
        )


def _fill_layer_prototypes(
    modules: dict[str, ModuleExperts], method: str, rng_seed: int | None, names: list[str]
) -> None:
    """``prototype_scope="layer"``: one prototype per decoder layer and expert, of ``Σ_m s_m B_m A_m`` over the
    layer's modules, given to each of them (see :mod:`genknowsub_fast.layer_prototypes`)."""
    groups = group_by_layer(list(modules))
    sums = {}
    for layer, paths in groups.items():
        a_cat, b_cat = layer_factors(layer, {p: modules[p] for p in paths})
        ones = torch.ones(a_cat.shape[0], dtype=torch.float32)
        ranks = torch.full_like(ones, a_cat.shape[1], dtype=torch.int64)
        sums[layer] = ModuleExperts(a_cat, b_cat, ones, torch.empty(0), ranks)
    _fill_prototypes(sums, method, rng_seed, names, what="layers")
    for layer, paths in groups.items():
        for p in paths:
            modules[p].prototypes = sums[layer].prototypes.to(modules[p].a.dtype).clone()


__all__ = ["read_adapter_dirs", "build_modules"]
