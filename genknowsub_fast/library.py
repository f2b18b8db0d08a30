"""LoraLibrary: a set of task LoRA experts per target module, after GenKnowSub, with their Arrow prototypes.

Built from PEFT adapter directories (:meth:`LoraLibrary.from_adapters`) or from a PEFT model made by
``peft.create_arrow_model`` (:meth:`LoraLibrary.from_peft_model`, implemented in ``integrations.peft``); saved as one
safetensors file (format in docs/design.md). The library knows neither models' patching nor analytics.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import gks as gks_math
from . import library_checks as checks
from .adapters import LoraAdapter, read_adapter
from .backends import prototype_ext
from .experts import ModuleExperts
from .gks import GKS_MODES, resolve_gks
from .layer_prototypes import PROTOTYPE_SCOPES, group_by_layer, layer_factors
from .options import RoutingOptions, resolve_routing
from .paths import write_atomically

FORMAT_VERSION = 1
_META_KEY = "genknowsub_fast"
_CLASS_SUFFIX = re.compile(r"(For[A-Za-z]+|LMHeadModel|Model)$")


def model_family(class_name: str | None) -> str | None:
    """``"Phi3ForCausalLM"`` → ``"phi3"``: the part of a HF class name shared by its heads and its bare model."""
    if not class_name:
        return None
    return _CLASS_SUFFIX.sub("", class_name).lower() or None


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


class LoraLibrary:
    """Task LoRA experts per target module, after GenKnowSub, with exact Arrow prototypes.

    Attributes:
        modules: module path (as in the base model, e.g. ``model.layers.0.self_attn.qkv_proj``) → ModuleExperts.
        expert_names: one name per expert, in index order.
        gks: ``"param"``, ``"delta"`` or None (no general knowledge subtracted).
        general_names: names of the general adapters that were subtracted.
        base_model_class: HF class the adapters were trained on, when the adapters say so.
        prototype_method: how the prototypes were computed ("exact", "power" or "svd").
        routing: default routing options carried from a PEFT Arrow model (``top_k``, ``temperature``), or {}.
        added_names: names of the adapters added after the subtraction (``add_adapters``).
        prototype_scope: ``"module"`` (one prototype per module and expert) or ``"layer"`` (one per decoder layer and
            expert, shared by the layer's modules).
        base_model_name: the base model the adapters name (``base_model_name_or_path``), or the ``base_model_name``
            given to :meth:`from_adapters`; None when they name none.

    ``len(library)`` is the number of experts (as ``library.num_experts``); ``len(library.modules)`` counts the target
    modules.
    """

    def __init__(
        self,
        modules: dict[str, ModuleExperts],
        expert_names: list[str],
        gks: str | None = None,
        general_names: Sequence[str] = (),
        base_model_class: str | None = None,
        prototype_method: str = "exact",
        routing: dict | None = None,
        base_model_name: str | None = None,
        added_names: Sequence[str] = (),
        prototype_scope: str = "module",
    ):
        if not modules:
            raise ValueError("a LoraLibrary needs at least one module")
        expert_names = checks.check_names(list(expert_names), "expert names")
        e = len(expert_names)
        for path, m in modules.items():
            if m.a.shape[0] != e or m.b.shape[0] != e or m.scaling.shape != (e,) or m.prototypes.shape[0] != e:
                raise ValueError(f"module {path!r}: expert count does not match the {e} expert names")
            if m.b.shape[2] != m.a.shape[1] or m.prototypes.shape[1] != m.a.shape[2]:
                raise ValueError(f"module {path!r}: A {tuple(m.a.shape)}, B {tuple(m.b.shape)} do not chain")
        self.modules = modules
        self.expert_names = list(expert_names)
        self.gks = gks
        self.general_names = list(general_names)
        self.base_model_class = base_model_class
        self.prototype_method = prototype_method
        self.routing = dict(routing or {})
        self.base_model_name = base_model_name
        self.added_names = list(added_names)
        self.prototype_scope = prototype_scope

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def routing_options(
        self, top_k: int | None = None, temperature: float | None = None, mixing: str | None = None
    ) -> RoutingOptions:
        """Validated routing options for this library: the given values, and for each one that is None the library's
        own option (carried from a PEFT Arrow model), else the package default (``min(3, number of experts)``, 1.0,
        ``"output"``); see :func:`genknowsub_fast.options.resolve_routing`. Every entry point (``patch_model``, the
        ``eval`` and ``inspect`` commands, the lm-eval model, ``make_llm``) resolves its options here."""
        return resolve_routing(self.num_experts, top_k, temperature, mixing, defaults=self.routing)

    @property
    def target_modules(self) -> list[str]:
        """Short names of the targeted modules (``qkv_proj``, ...), in first-seen order."""
        return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in self.modules))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).a.dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).a.device

    def __len__(self) -> int:
        """The number of experts (``len(library.modules)`` is the number of target modules)."""
        return self.num_experts

    def __repr__(self) -> str:
        ranks = sorted({int(r) for m in self.modules.values() for r in m.ranks.tolist()})
        names = ", ".join(self.expert_names[:6]) + (", ..." if self.num_experts > 6 else "")
        gks = f"gks={self.gks!r} ({len(self.general_names)} general)" if self.gks else "gks=None"
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"LoraLibrary({self.num_experts} expert{'s' * (self.num_experts != 1)} [{names}], "
            f"{len(self.modules)} module{'s' * (len(self.modules) != 1)} "
            f"({', '.join(self.target_modules)}), rank {'/'.join(map(str, ranks))}, {gks}, "
            f"prototypes={self.prototype_method!r}, dtype={dtype}, device={self.device})"
        )

    def to(self, device=None, dtype=None) -> LoraLibrary:
        """A copy of the library on another device and/or float dtype (ValueError for a non-float dtype)."""
        _check_float_dtype(dtype)
        return LoraLibrary(
            {p: m.to(device=device, dtype=dtype) for p, m in self.modules.items()},
            self.expert_names,
            self.gks,
            self.general_names,
            self.base_model_class,
            self.prototype_method,
            self.routing,
            self.base_model_name,
            self.added_names,
            self.prototype_scope,
        )

    # ------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_adapters(
        cls,
        task_adapters: Sequence[str | os.PathLike],
        general_adapters: Sequence[str | os.PathLike] | None = None,
        gks: str | None = "auto",
        prototypes: str = "exact",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        names: Sequence[str] | None = None,
        rng_seed: int | None = None,
        progress: bool | None = None,
        base_model_name: str | None = None,
        ignore_modules_to_save: bool = False,
        general_weights: Sequence[float] | None = None,
        add_adapters: Sequence[str | os.PathLike] | None = None,
        add_weights: Sequence[float] | None = None,
        task_weight: float = 1.0,
        prototype_scope: str = "module",
    ) -> LoraLibrary:
        """Build a library from PEFT LoRA adapter directories.

        Args:
            task_adapters: directories of the task experts (one expert each, in index order).
            general_adapters: directories of general-knowledge adapters to subtract (GenKnowSub).
            gks: ``"auto"`` (default: ``"param"`` when general adapters are given, else no GenKnowSub), ``"param"``
                (factor-wise, as PEFT's ``use_gks=True``), ``"delta"`` (exact ΔW subtraction) or None (no
                GenKnowSub). ``"param"``/``"delta"`` without general adapters, and None with them, are errors.
            prototypes: ``"exact"`` (default), ``"power"`` (PEFT's power iteration) or ``"svd"``.
            dtype, device: where the library's tensors live (default: the adapters' dtype, CPU); dtype is a float
                dtype (float32, bfloat16, float16 or float64).
            allow_pickle: accept pickled ``adapter_model.bin`` files (read with ``torch.load(weights_only=True)``:
                tensors only, a file holding anything else is refused).
            names: expert names (default: the directory names); they must be distinct.
            rng_seed: start-vector seed of ``prototypes="power"``.
            progress: show a progress bar while reading (default: when stderr is a terminal).
            base_model_name: the base model all adapters were trained on. By default the adapters'
                ``base_model_name_or_path`` entries must agree (a hub id and a Hugging Face cache snapshot of it do);
                give this when they name one model in two ways that cannot be matched (e.g. a hub id and a local
                copy): the names are then not compared, while the model class and every module's shape still are.
            ignore_modules_to_save: leave out the whole-module tensors adapters saved for ``modules_to_save`` (e.g.
                a fine-tuned ``lm_head``), with one warning naming them; without it such adapters are refused, since
                Arrow routes LoRA factors only and the model keeps its own weights for those modules.
            general_weights: one coefficient per general adapter (default: the mean, ``1/G`` each).
            add_adapters: directories of adapters added after the subtraction (the cross-lingual variants).
            add_weights: one coefficient per added adapter (default 1 each; -1 subtracts).
            task_weight: coefficient of the task expert itself (default 1).
            prototype_scope: ``"module"`` (one prototype per module and expert, PEFT's Arrow) or ``"layer"`` (one
                per decoder layer and expert, shared by the layer's modules, as the original Phi-2 code).

        The coefficients combine the factors in ``"param"`` mode and the ΔW in ``"delta"`` mode (see
        :mod:`genknowsub_fast.gks`); the README gives the arguments of each variant of the original code.

        The same directory twice, a directory both a task and a general adapter (unless the general adapters are
        exactly the task adapters: the average-of-tasks variant), or two experts with one name (e.g. two directories
        called ``adapter``: pass ``names``) are ValueErrors, checked before anything is read.
        """
        for what, given in (("task_adapters", task_adapters), ("general_adapters", general_adapters),
                            ("add_adapters", add_adapters)):  # fmt: skip
            if isinstance(given, (str, bytes, os.PathLike)):  # a list of its characters would be read otherwise
                raise ValueError(f"{what} must be a list of adapter directories, got the single path {given!r}")
        task_adapters = list(task_adapters or [])
        general_adapters = list(general_adapters or [])
        add_adapters = list(add_adapters or [])
        if not task_adapters:
            raise ValueError("from_adapters needs at least one task adapter")
        gks = resolve_gks(gks, len(general_adapters), len(add_adapters))
        if prototypes not in ("exact", "power", "svd"):
            raise ValueError(f"prototypes must be 'exact', 'power' or 'svd', got {prototypes!r}")
        if names is not None and len(names) != len(task_adapters):
            raise ValueError(f"{len(names)} names given for {len(task_adapters)} task adapters")
        _check_float_dtype(dtype)
        if base_model_name is not None and not (isinstance(base_model_name, str) and base_model_name):
            raise ValueError(f"base_model_name must be a non-empty string, got {base_model_name!r}")
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
        return cls.from_loaded(
            tasks,
            general,
            gks,
            prototypes,
            dtype,
            device,
            rng_seed,
            general_weights=general_weights,
            base_model_name=base_model_name,
            add=add,
            add_weights=add_weights,
            task_weight=task_weight,
            prototype_scope=prototype_scope,
        )

    @classmethod
    def from_loaded(
        cls,
        tasks: Sequence[LoraAdapter],
        general: Sequence[LoraAdapter] = (),
        gks: str | None = "param",
        prototypes: str = "exact",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        rng_seed: int | None = None,
        routing: dict | None = None,
        already_subtracted: set[str] | None = None,
        general_weights: Sequence[float] | None = None,
        base_model_name: str | None = None,
        add: Sequence[LoraAdapter] = (),
        add_weights: Sequence[float] | None = None,
        task_weight: float = 1.0,
        prototype_scope: str = "module",
    ) -> LoraLibrary:
        """Build a library from adapters already in memory (:class:`~genknowsub_fast.adapters.LoraAdapter`).

        ``gks`` is None (nothing subtracted) or one of :data:`~genknowsub_fast.gks.GKS_MODES`; ``already_subtracted``
        names module paths whose task factors already had GenKnowSub applied (a PEFT model that ran once).
        ``general_weights`` / ``add`` / ``add_weights`` / ``task_weight`` / ``prototype_scope``: as in
        :meth:`from_adapters` (``add`` holds the added adapters).
        ``base_model_name``: see :meth:`from_adapters` (the adapters' own base model names are then not compared).
        """
        tasks, general, add = list(tasks), list(general), list(add)
        if not tasks:
            raise ValueError("a library needs at least one task adapter")
        checks.check_names([t.name for t in tasks], "expert names")
        _check_float_dtype(dtype)
        gks = resolve_gks(gks, len(general), len(add))
        if prototype_scope not in PROTOTYPE_SCOPES:
            raise ValueError(f"prototype_scope must be one of {PROTOTYPE_SCOPES}, got {prototype_scope!r}")
        if general_weights is not None:
            general_weights = gks_math.check_weights(general_weights, len(general))
        add_weights = gks_math.check_weights(
            [1.0] * len(add) if add_weights is None else add_weights, len(add), "add_weights"
        )
        task_weight = gks_math.check_weight(task_weight, "task_weight")
        if task_weight != 1.0 and gks is None:
            raise ValueError("task_weight weighs the task factors against general or added adapters; give some")
        base_class, base_name = _check_compatible(tasks, general + add, base_model_name)
        done = already_subtracted or set()
        modules: dict[str, ModuleExperts] = {}
        for path in tasks[0].module_paths:
            work = torch.promote_types(tasks[0].a[path].dtype, torch.float32)
            task_f = [(t.a[path].to(work), t.b[path].to(work)) for t in tasks]
            gen_f = [(g.a[path].to(work), g.b[path].to(work)) for g in general]
            add_f = [(g.a[path].to(work), g.b[path].to(work)) for g in add]
            scalings = [t.scaling[path] for t in tasks]
            if gks == "param" and path not in done:
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
        general_names, added_names = [g.name for g in general], [a.name for a in add]
        lib = cls(modules, names, gks, general_names, base_class, prototypes, routing, base_name, added_names)
        lib.prototype_scope = prototype_scope
        if dtype is not None or device is not None:
            lib = lib.to(device=device, dtype=dtype)
        return lib

    @classmethod
    def from_peft_model(cls, model: torch.nn.Module, prototypes: str = "peft") -> LoraLibrary:
        """Build a library from a model made by ``peft.create_arrow_model`` (task_i / gks_i adapters + ArrowConfig).

        ``prototypes="peft"`` (default) takes PEFT's own prototypes, so the library reproduces PEFT's outputs;
        ``"exact"`` computes exact ones for the same experts. PEFT's lazy GenKnowSub (and prototype) steps run first
        where they have not, as PEFT's next forward would. See
        :func:`genknowsub_fast.integrations.peft.library_from_peft_model`, which this calls.
        """
        from .integrations.peft import library_from_peft_model

        return library_from_peft_model(model, prototypes=prototypes)

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the library to one safetensors file (format in docs/design.md).

        The file is written under a temporary name in the same directory and renamed into place, so a failed write
        leaves any older file as it was; it gets the permissions of any newly created file (0o666 less the umask).
        ValueError when the directory does not exist or ``path`` is a directory, before anything is written.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"library file {path!r} is a directory")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"library file {path!r}: directory {parent!r} does not exist")
        tensors = {}
        for p, m in self.modules.items():
            tensors[f"{p}/A"] = m.a.contiguous()
            tensors[f"{p}/B"] = m.b.contiguous()
            tensors[f"{p}/scaling"] = m.scaling.contiguous()
            tensors[f"{p}/prototypes"] = m.prototypes.contiguous()
            tensors[f"{p}/ranks"] = m.ranks.contiguous()
        meta = {
            "format_version": FORMAT_VERSION,
            "expert_names": self.expert_names,
            "gks": self.gks,
            "general_names": self.general_names,
            "base_model_class": self.base_model_class,
            "base_model_type": model_family(self.base_model_class),
            "base_model_name": self.base_model_name,
            "target_modules": self.target_modules,
            "module_paths": list(self.modules),
            "prototype_method": self.prototype_method,
            "routing": self.routing,
            "added_names": self.added_names,
            "prototype_scope": self.prototype_scope,
        }
        cpu = {k: v.cpu() for k, v in tensors.items()}
        write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata={_META_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> LoraLibrary:
        """Read a library written by :meth:`save`.

        Everything in the file is checked before it is used (see :mod:`genknowsub_fast.library_checks`): the metadata,
        and per module the dtype, shape and values of A, B, scaling, prototypes and ranks (finite, ranks in
        [1, r_max], zero padding, unit prototypes or a zero one for a zero ΔW). Anything else is a ValueError naming
        the file and, where one is at fault, the tensor.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            hint = (
                " (an adapter directory: build a library from it with LoraLibrary.from_adapters or "
                "`genknowsub-fast build`)"
                if os.path.isfile(os.path.join(path, "adapter_config.json"))
                else ""
            )
            raise ValueError(f"library file {path!r} is a directory{hint}")
        if not os.path.isfile(path):
            raise ValueError(f"library file {path!r} does not exist")
        where = f"library {path!r}"
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                if raw is None:
                    raise ValueError(f"{path!r} is a safetensors file but not a genknowsub_fast library")
                try:
                    meta = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: metadata is not valid JSON ({exc})") from None
                if not isinstance(meta, dict):
                    raise ValueError(f"{where}: metadata is not a JSON object")
                version = meta.get("format_version")
                if version != FORMAT_VERSION:
                    raise ValueError(f"{where} has library format {version!r}, this version reads {FORMAT_VERSION}")
                checks.check_metadata(meta, where)
                checks.check_tensor_keys(list(f.keys()), meta["module_paths"], where)
                e, method = len(meta["expert_names"]), meta.get("prototype_method", "exact")
                modules = {}
                for p in meta["module_paths"]:
                    t = {k: f.get_tensor(f"{p}/{k}") for k in checks.TENSOR_KEYS}
                    modules[p] = checks.check_module_tensors(t, e, method, f"{where}: tensor '{p}")
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise ValueError(f"cannot read library {path!r}: {exc}") from exc
        lib = cls(
            modules,
            meta["expert_names"],
            meta.get("gks"),
            meta.get("general_names", []),
            meta.get("base_model_class"),
            meta.get("prototype_method", "exact"),
            meta.get("routing"),
            meta.get("base_model_name"),
            meta.get("added_names", []),
            meta.get("prototype_scope", "module"),
        )
        return lib.to(device=device) if device is not None else lib


def _check_float_dtype(dtype: object) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in checks.FLOAT_DTYPES):
        raise ValueError(f"a library's dtype must be one of {checks.FLOAT_DTYPES}, got {dtype!r}")


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


_HF_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


def _model_id(name: str) -> str:
    """What a base model name identifies: the last path part, with a Hugging Face cache snapshot path
    (``.../models--org--name/snapshots/<rev>``) mapped to ``name`` like the hub id ``org/name``."""
    m = _HF_SNAPSHOT.search(name)
    if m:
        return m["name"]
    return os.path.basename(os.path.normpath(name))


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
        ids = {_model_id(a.base_model_name) for a in named}
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
    if method == "exact":
        protos, zeros = prototype_ext.exact_prototypes_batched(
            [modules[p].a for p in paths], [modules[p].b for p in paths], progress=True
        )
    else:
        from . import ops

        protos = [ops.arrow_prototypes(modules[p].a, modules[p].b, method, rng_seed, warn_zero=False) for p in paths]
        zeros = [~(p != 0).any(dim=1) for p in protos]
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


__all__ = ["LoraLibrary", "ModuleExperts", "model_family", "FORMAT_VERSION", "GKS_MODES"]
