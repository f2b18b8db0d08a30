"""LoraLibrary: a set of task LoRA experts per target module, after GenKnowSub, with their Arrow prototypes.

Built from PEFT adapter directories (:meth:`LoraLibrary.from_adapters`, the work in :mod:`.build`) or from a PEFT model
made by ``peft.create_arrow_model`` (:meth:`LoraLibrary.from_peft_model`, read by the PEFT integration); saved as one
safetensors file (:mod:`.file_format`). The library knows neither models' patching nor analytics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..experts import ModuleExperts
from ..memory import check_fits, human_bytes
from ..options import RoutingOptions, resolve_routing
from . import build, file_format
from . import file_checks as checks
from . import gks as gks_math
from .adapters import LoraAdapter
from .base_model import model_family
from .gks import resolve_gks
from .layer_prototypes import PROTOTYPE_SCOPES

# Where LoraLibrary.from_peft_model finds its reader: an entry point, so that the library does not import the PEFT
# integration (which imports the library). pyproject.toml registers genknowsub_fast.integrations.peft there.
MODEL_READERS = "genknowsub_fast.model_readers"


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
        storage: where the experts' bytes live: ``"mapped"`` (a file :meth:`load` maps, protected against being
            rewritten in place), ``"mapped, unprotected"`` (``load(mmap=True)`` where no protection could be had) or
            ``"memory"``.

    The modules built by :meth:`from_adapters` and read by :meth:`load` hold their experts packed, in the layout the
    CPU kernels read (:meth:`ModuleExperts.from_packed`): a patched model in the library's dtype runs on these very
    tensors.

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
            if m.a.shape[0] != e or m.scaling.shape != (e,) or m.prototypes.shape[0] != e:
                raise ValueError(f"module {path!r}: expert count does not match the {e} expert names")
            if not m.is_packed and (m.b.shape[0] != e or m.b.shape[2] != m.a.shape[1]):
                raise ValueError(f"module {path!r}: A {tuple(m.a.shape)}, B {tuple(m.b.shape)} do not chain")
            if m.prototypes.shape[1] != m.a.shape[2]:
                shapes = f"prototypes {tuple(m.prototypes.shape)}, A {tuple(m.a.shape)}"
                raise ValueError(f"module {path!r}: {shapes} do not fit")
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
        self.storage = "memory"  # load() says "mapped" (or "mapped, unprotected") when the tensors map the file

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        """Bytes the experts take (packed modules: the packed tensors, padding included, as a file stores them)."""
        return sum(m.nbytes for m in self.modules.values())

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
        checks.check_float_dtype(dtype)
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
        general_names: Sequence[str] | None = None,
        add_names: Sequence[str] | None = None,
        output: str | os.PathLike | None = None,
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
            names: expert names, one per task adapter (default: named after the directories, see below); they must
                be distinct.
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
            general_names, add_names: names of the general and of the added adapters (default: named after the
                directories, as the experts); recorded in the library (``general_names``, ``added_names``).
            output: write the library to this file as it is built, one module at a time, without holding it in
                memory (``genknowsub-fast build`` does this); the library returned then maps that file
                (:meth:`load`). The file is written under a temporary name and renamed into place when complete.

        The adapters are read one module (``prototype_scope="layer"``: one decoder layer) at a time, a chunk of
        experts at a time, and each chunk is combined, given its prototypes and packed before the next is read, so a
        build holds the library it makes (none with ``output``) and little more. Their names, shapes and configs are
        checked before any work; their values (NaN, Inf) as each module is read. A library larger than the memory
        left (with ``output``: than the disk space left) is refused before any work. A progress bar with the time
        left shows on a terminal (``progress``).

        The coefficients combine the factors in ``"param"`` mode and the ΔW in ``"delta"`` mode (see
        :mod:`genknowsub_fast.library.gks`); the README gives the arguments of each variant of the original code.

        Default names: each adapter is named after its directory, except that a Hugging Face Trainer checkpoint
        ``<run>/checkpoint-<N>`` is named after its run directory (``cluster0_batch16/checkpoint-17`` ->
        ``cluster0_batch16``); adapters of one list that would share a name get as many more trailing path components
        as tell them apart (``en/wiki/checkpoint-17``, ``de/wiki/checkpoint-17`` -> ``en/wiki``, ``de/wiki``). The
        rules are in :mod:`genknowsub_fast.library.naming`. A training run directory that holds checkpoints but no
        adapter of its own is refused with the checkpoints it holds (highest step first): pass the checkpoint to use.

        The same directory twice, a directory both a task and a general adapter (unless the general adapters are
        exactly the task adapters: the average-of-tasks variant), or two adapters of one list with one name (pass
        ``names`` / ``general_names`` / ``add_names``) are ValueErrors, checked before anything is read.
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
        checks.check_float_dtype(dtype)
        if base_model_name is not None and not (isinstance(base_model_name, str) and base_model_name):
            raise ValueError(f"base_model_name must be a non-empty string, got {base_model_name!r}")
        if output is not None:
            from ..paths import check_output_file

            output = check_output_file(output, "output")
        tasks, general, add = build.read_adapter_dirs(
            task_adapters, general_adapters, add_adapters, names, allow_pickle, ignore_modules_to_save, progress,
            general_names=general_names, add_names=add_names,
        )  # fmt: skip
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
            output=output,
            progress=progress,
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
        output: str | os.PathLike | None = None,
        progress: bool | None = None,
    ) -> LoraLibrary:
        """Build a library from adapters (:class:`~.adapters.LoraAdapter`, in memory or read from their files as
        the build goes).

        ``gks`` is None (nothing subtracted) or one of :data:`~.gks.GKS_MODES`; ``already_subtracted`` names module
        paths whose task factors already had GenKnowSub applied (a PEFT model that ran once).
        ``general_weights`` / ``add`` / ``add_weights`` / ``task_weight`` / ``prototype_scope``: as in
        :meth:`from_adapters` (``add`` holds the added adapters).
        ``base_model_name``: see :meth:`from_adapters` (the adapters' own base model names are then not compared).
        ``output``, ``progress``: see :meth:`from_adapters`.
        """
        tasks, general, add = list(tasks), list(general), list(add)
        if not tasks:
            raise ValueError("a library needs at least one task adapter")
        checks.check_names([t.name for t in tasks], "expert names")
        checks.check_float_dtype(dtype)
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
        already = set(already_subtracted or ())
        base_class, base_name = build.check_compatible(tasks, general + add, base_model_name)
        plans = build.plan_modules(tasks, general, add, gks, already, dtype)
        need = build.library_bytes(plans)
        if output is None:
            hint = "build it into a file (output=..., `genknowsub-fast build`), which holds one module at a time"
            check_fits(need, f"the library needs {human_bytes(need)}", hint)
        else:
            _check_disk(output, need)
        names = [t.name for t in tasks]
        args = (tasks, general, add, gks, prototypes, rng_seed, already, general_weights, add_weights, task_weight,
                prototype_scope, base_model_name)  # fmt: skip
        described = dict(
            expert_names=names,
            gks=gks,
            general_names=[g.name for g in general],
            base_model_class=base_class,
            prototype_method=prototypes,
            routing=routing,
            base_model_name=base_name,
            added_names=[a.name for a in add],
            prototype_scope=prototype_scope,
        )
        if output is None:
            modules, _, _ = build.build_modules(*args, dtype=dtype, progress=progress, plans=plans)
            lib = cls(modules, **described)
            return lib.to(device=device) if device is not None else lib
        # Streamed into the file: everything the metadata says is known before the first module is built.
        meta = library_metadata(module_paths=list(plans), **described)
        specs = {p: plan.stored_specs() for p, plan in plans.items()}

        def produce(emit):
            build.build_modules(*args, dtype=dtype, emit=emit, progress=progress, plans=plans)

        file_format.write_streamed(output, specs, meta, produce)
        return cls.load(output, device=device)

    @classmethod
    def from_peft_model(cls, model: torch.nn.Module, prototypes: str | None = None) -> LoraLibrary:
        """Build a library from a model made by ``peft.create_arrow_model`` (task_i / gks_i adapters + ArrowConfig).

        ``prototypes="peft"`` takes PEFT's own prototypes, so the library reproduces PEFT's outputs; ``"exact"``
        computes exact ones for the same experts; None (default) is ``"peft"`` with a warning where PEFT's prototypes
        are far from exact (``"peft"`` by name takes them without it). PEFT's lazy GenKnowSub (and prototype) steps
        run first where they have not, as PEFT's next forward would; the model's adapter weights are left as they were
        (what its ``save_pretrained`` writes does not change). The reading is done by
        :func:`genknowsub_fast.integrations.peft.library_from_peft_model`, found through the ``peft`` entry point of
        the ``genknowsub_fast.model_readers`` group (installed with the package).
        """
        from importlib.metadata import entry_points

        found = [ep for ep in entry_points(group=MODEL_READERS) if ep.name == "peft"]
        if not found:
            raise ValueError(
                f"no 'peft' reader in the {MODEL_READERS!r} entry points: install genknowsub-fast with pip "
                "(pip install -e . for a checkout)"
            )
        return found[0].load()(model, prototypes=prototypes)

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the library to one safetensors file (format in docs/design.md, :mod:`.file_format`), each module in
        the layout the CPU kernels read, so that :meth:`load` maps it.

        The file is written under a temporary name in the same directory and renamed into place, so a failed write
        leaves any older file as it was; it gets the permissions of any newly created file (0o666 less the umask).
        ValueError when the directory does not exist or ``path`` is a directory, before anything is written.
        """
        meta = library_metadata(
            self.expert_names, self.gks, self.general_names, self.base_model_class, self.prototype_method,
            self.routing, self.base_model_name, self.added_names, self.prototype_scope, list(self.modules),
        )  # fmt: skip
        file_format.write(path, self.modules, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, mmap: bool | None = None
    ) -> LoraLibrary:
        """Read a library written by :meth:`save` (or ``genknowsub-fast build``).

        The experts are not copied: the library's tensors map the file (format version 2), in the layout the CPU
        kernels read, so patching a model in the library's dtype adds no second copy, and memory is the same whether
        the library object is kept or dropped after patching. The mapping is protected against the file being
        rewritten in place while it is in use (a read lease: a writer first waits until this process has copied what
        it maps, then the tensors keep the old content); where that protection cannot be had (the file belongs to
        another user, a filesystem without leases, the file open for writing) the file is read into memory
        instead, with a warning. ``mmap=True`` maps it anyway (a process whose file is truncated then dies
        of SIGBUS on its next read); ``mmap=False`` always reads it into memory. :attr:`storage` says which.
        Version 1 files are read into memory and packed once. ``device``: move the experts there (the mapping is
        released once nothing on the CPU uses it).

        A library larger than the memory this process may still use is refused before anything is read. Everything
        in the file is checked before it is used (see :mod:`genknowsub_fast.library.file_checks`): the metadata, and
        per module the dtype, shape and values of its tensors (finite, ranks in [1, r_max], zero padding, unit
        prototypes or a zero one for a zero ΔW). Anything else is a ValueError naming the file and, where one is at
        fault, the tensor.
        """
        modules, meta, storage = file_format.read(path, mmap=mmap)
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
        lib.storage = storage
        return lib.to(device=device) if device is not None else lib


def library_metadata(
    expert_names: list[str],
    gks: str | None,
    general_names: list[str],
    base_model_class: str | None,
    prototype_method: str,
    routing: dict | None,
    base_model_name: str | None,
    added_names: list[str],
    prototype_scope: str,
    module_paths: list[str],
) -> dict:
    """The JSON metadata of a library file (the file format adds its version and layouts)."""
    return {
        "expert_names": list(expert_names),
        "gks": gks,
        "general_names": list(general_names),
        "base_model_class": base_model_class,
        "base_model_type": model_family(base_model_class),
        "base_model_name": base_model_name,
        "target_modules": list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in module_paths)),
        "module_paths": list(module_paths),
        "prototype_method": prototype_method,
        "routing": dict(routing or {}),
        "added_names": list(added_names),
        "prototype_scope": prototype_scope,
    }


def _check_disk(path: str, need: int) -> None:
    """ValueError when the file system of ``path`` has less than ``need`` bytes free (before a build starts)."""
    import shutil

    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if need > free:
        raise ValueError(
            f"the library file {path!r} needs {human_bytes(need)}, but only {human_bytes(free)} of disk space is free"
        )


__all__ = ["LoraLibrary"]
