"""LoraLibrary: a set of task LoRA experts per target module, after GenKnowSub, with their Arrow prototypes.

Built from PEFT adapter directories (:meth:`LoraLibrary.from_adapters`) or from a PEFT model made by
``peft.create_arrow_model`` (:meth:`LoraLibrary.from_peft_model`); saved as one safetensors file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import LoraAdapter, read_adapter
from .backends import prototype_ext

FORMAT_VERSION = 1
GKS_MODES = ("param", "delta")
_META_KEY = "genknowsub_fast"
_CLASS_SUFFIX = re.compile(r"(For[A-Za-z]+|LMHeadModel|Model)$")


def model_family(class_name: str | None) -> str | None:
    """``"Phi3ForCausalLM"`` → ``"phi3"``: the part of a HF class name shared by its heads and its bare model."""
    if not class_name:
        return None
    return _CLASS_SUFFIX.sub("", class_name).lower() or None


@dataclass
class ModuleExperts:
    """The experts of one target module: A (E, r_max, d_in), B (E, d_out, r_max), scaling (E,), prototypes
    (E, d_in) and ranks (E,). Mixed ranks are zero-padded to r_max."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    prototypes: torch.Tensor
    ranks: torch.Tensor

    @property
    def d_in(self) -> int:
        return int(self.a.shape[2])

    @property
    def d_out(self) -> int:
        return int(self.b.shape[1])

    def to(self, device=None, dtype=None) -> ModuleExperts:
        """A copy with float tensors on ``device`` / in ``dtype`` (scaling stays float32, ranks int64)."""
        return ModuleExperts(
            self.a.to(device=device, dtype=dtype),
            self.b.to(device=device, dtype=dtype),
            self.scaling.to(device=device),
            self.prototypes.to(device=device, dtype=dtype),
            self.ranks.to(device=device),
        )


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
    ):
        if not modules:
            raise ValueError("a LoraLibrary needs at least one module")
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

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

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
        return len(self.modules)

    def __repr__(self) -> str:
        ranks = sorted({int(r) for m in self.modules.values() for r in m.ranks.tolist()})
        names = ", ".join(self.expert_names[:6]) + (", ..." if self.num_experts > 6 else "")
        gks = f"gks={self.gks!r} ({len(self.general_names)} general)" if self.gks else "gks=None"
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"LoraLibrary({self.num_experts} experts [{names}], {len(self.modules)} modules "
            f"({', '.join(self.target_modules)}), rank {'/'.join(map(str, ranks))}, {gks}, "
            f"prototypes={self.prototype_method!r}, dtype={dtype}, device={self.device})"
        )

    def to(self, device=None, dtype=None) -> LoraLibrary:
        """A copy of the library on another device and/or float dtype."""
        return LoraLibrary(
            {p: m.to(device=device, dtype=dtype) for p, m in self.modules.items()},
            self.expert_names,
            self.gks,
            self.general_names,
            self.base_model_class,
            self.prototype_method,
            self.routing,
        )

    def stats(self, top: int | None = 8):
        """Prototype |cos| matrices and top-``top`` ΔW singular values per module: see
        :func:`genknowsub_fast.analytics.library_stats`."""
        from .analytics import library_stats

        return library_stats(self, top)

    # ------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_adapters(
        cls,
        task_adapters: Sequence[str | os.PathLike],
        general_adapters: Sequence[str | os.PathLike] | None = None,
        gks: str = "param",
        prototypes: str = "exact",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        names: Sequence[str] | None = None,
        rng_seed: int | None = None,
        progress: bool | None = None,
    ) -> LoraLibrary:
        """Build a library from PEFT LoRA adapter directories.

        Args:
            task_adapters: directories of the task experts (one expert each, in index order).
            general_adapters: directories of general-knowledge adapters to subtract (GenKnowSub); none → no GKS.
            gks: ``"param"`` (factor-wise, as PEFT's ``use_gks=True``) or ``"delta"`` (exact ΔW subtraction).
            prototypes: ``"exact"`` (default), ``"power"`` (PEFT's power iteration) or ``"svd"``.
            dtype, device: where the library's tensors live (default: the adapters' dtype, CPU).
            allow_pickle: accept pickled ``adapter_model.bin`` files.
            names: expert names (default: the directory names).
            rng_seed: start-vector seed of ``prototypes="power"``.
            progress: show a progress bar while reading (default: when stderr is a terminal).
        """
        task_adapters = list(task_adapters or [])
        general_adapters = list(general_adapters or [])
        if not task_adapters:
            raise ValueError("from_adapters needs at least one task adapter")
        if gks not in GKS_MODES:
            raise ValueError(f"gks must be one of {GKS_MODES}, got {gks!r}")
        if prototypes not in ("exact", "power", "svd"):
            raise ValueError(f"prototypes must be 'exact', 'power' or 'svd', got {prototypes!r}")
        if names is not None and len(names) != len(task_adapters):
            raise ValueError(f"{len(names)} names given for {len(task_adapters)} task adapters")
        for p in task_adapters + general_adapters:
            if not os.path.isdir(p):
                raise ValueError(f"adapter path {os.fspath(p)!r} does not exist or is not a directory")
        if progress is None:
            progress = sys.stderr.isatty()
        paths = task_adapters + general_adapters
        from tqdm.auto import tqdm

        read = [
            read_adapter(p, allow_pickle=allow_pickle)
            for p in tqdm(paths, desc="reading adapters", unit="adapter", disable=not progress)
        ]
        tasks, general = read[: len(task_adapters)], read[len(task_adapters) :]
        if names is not None:
            for adapter, n in zip(tasks, names, strict=True):
                adapter.name = n
        return cls._from_loaded(tasks, general, gks if general else None, prototypes, dtype, device, rng_seed)

    @classmethod
    def _from_loaded(
        cls,
        tasks: list[LoraAdapter],
        general: list[LoraAdapter],
        gks: str | None,
        prototypes: str,
        dtype: torch.dtype | None,
        device,
        rng_seed: int | None,
        routing: dict | None = None,
        already_subtracted: set[str] | None = None,
    ) -> LoraLibrary:
        base_class = _check_compatible(tasks, general)
        paths = tasks[0].module_paths
        modules: dict[str, ModuleExperts] = {}
        for path in paths:
            if gks == "param" and path not in (already_subtracted or set()):
                _check_equal_ranks(path, tasks + general)
            work = torch.promote_types(tasks[0].a[path].dtype, torch.float32)
            a_list = [t.a[path].to(work) for t in tasks]
            b_list = [t.b[path].to(work) for t in tasks]
            s_list = [t.scaling[path] for t in tasks]
            if gks == "param" and path not in (already_subtracted or set()):
                mean_a = torch.stack([g.a[path].to(work) for g in general]).mean(0)
                mean_b = torch.stack([g.b[path].to(work) for g in general]).mean(0)
                a_list = [a - mean_a for a in a_list]
                b_list = [b - mean_b for b in b_list]
            elif gks == "delta":
                n = len(general)
                a_g = [g.a[path].to(work) for g in general]
                b_g = [-(g.scaling[path] / n) * g.b[path].to(work) for g in general]
                a_list = [torch.cat([a] + a_g, dim=0) for a in a_list]
                b_list = [torch.cat([s * b] + b_g, dim=1) for b, s in zip(b_list, s_list, strict=True)]
                s_list = [1.0] * len(tasks)
            ranks = [a.shape[0] for a in a_list]
            r_max = max(ranks)
            modules[path] = ModuleExperts(
                a=_pad_stack(a_list, 0, r_max),
                b=_pad_stack(b_list, 1, r_max),
                scaling=torch.tensor(s_list, dtype=torch.float32),
                prototypes=torch.empty(0),
                ranks=torch.tensor(ranks, dtype=torch.int64),
            )
        _fill_prototypes(modules, prototypes, rng_seed, [t.name for t in tasks])
        lib = cls(
            modules,
            [t.name for t in tasks],
            gks,
            [g.name for g in general],
            base_class,
            prototypes,
            routing,
        )
        if dtype is not None or device is not None:
            lib = lib.to(device=device, dtype=dtype)
        return lib

    @classmethod
    def from_peft_model(cls, model: torch.nn.Module, prototypes: str = "exact") -> LoraLibrary:
        """Build a library from a model made by ``peft.create_arrow_model`` (task_i / gks_i adapters + ArrowConfig).

        GenKnowSub is applied here when the ArrowConfig asks for it and PEFT has not yet applied it (PEFT subtracts
        lazily, in place, on a layer's first forward); layers PEFT already subtracted are taken as they are. The
        ArrowConfig's ``top_k`` and ``router_temperature`` become the library's default routing.
        """
        arrow = None
        tasks: dict[str, LoraAdapter] = {}
        general: dict[str, LoraAdapter] = {}
        done: set[str] = set()
        for name, module in model.named_modules():
            arrow_dict = getattr(module, "lora_arrow", None)
            if not arrow_dict or "arrow_router" not in arrow_dict:
                continue
            arrow = arrow_dict["arrow_router"]
            path = name.removeprefix("base_model.model.")
            if arrow.use_gks and arrow.gks_done:
                done.add(path)
            for group, names in ((tasks, arrow.task_adapter_names), (general, arrow.gks_adapter_names or [])):
                for n in names:
                    if n not in module.lora_A:
                        raise ValueError(f"PEFT Arrow layer {name!r} has no adapter {n!r}")
                    ad = group.setdefault(n, LoraAdapter(name=n))
                    ad.a[path] = module.lora_A[n].weight.detach()
                    ad.b[path] = module.lora_B[n].weight.detach()
                    ad.scaling[path] = float(module.scaling[n])
        if arrow is None:
            raise ValueError("model has no PEFT Arrow layers (expected a model made by peft.create_arrow_model)")
        for ad in list(tasks.values()) + list(general.values()):
            for path, a in ad.a.items():
                if not torch.isfinite(a).all() or not torch.isfinite(ad.b[path]).all():
                    raise ValueError(f"adapter {ad.name!r}, module {path!r}: weights contain NaN or Inf")
        gks = "param" if arrow.use_gks else None
        base = getattr(model, "get_base_model", lambda: model)()
        lib = cls._from_loaded(
            [tasks[n] for n in arrow.task_adapter_names],
            [general[n] for n in (arrow.gks_adapter_names or [])] if gks else [],
            gks,
            prototypes,
            None,
            None,
            arrow.rng_seed,
            routing={"top_k": int(arrow.top_k), "temperature": float(arrow.temperature)},
            already_subtracted=done,
        )
        lib.base_model_class = lib.base_model_class or type(base).__name__
        return lib

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the library to one safetensors file (format in DESIGN.md)."""
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
            "target_modules": self.target_modules,
            "module_paths": list(self.modules),
            "prototype_method": self.prototype_method,
            "routing": self.routing,
        }
        save_file({k: v.cpu() for k, v in tensors.items()}, os.fspath(path), metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> LoraLibrary:
        """Read a library written by :meth:`save`; ValueError if the file is missing or not such a library."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"library file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                if raw is None:
                    raise ValueError(f"{path!r} is a safetensors file but not a genknowsub_fast library")
                meta = json.loads(raw)
                if meta.get("format_version") != FORMAT_VERSION:
                    raise ValueError(
                        f"{path!r} has library format {meta.get('format_version')}, this version reads {FORMAT_VERSION}"
                    )
                modules = {}
                for p in meta["module_paths"]:
                    t = {k: f.get_tensor(f"{p}/{k}") for k in ("A", "B", "scaling", "prototypes", "ranks")}
                    for k in ("A", "B", "prototypes"):
                        if not torch.isfinite(t[k]).all():
                            raise ValueError(f"{path!r}: {p}/{k} contains NaN or Inf")
                    modules[p] = ModuleExperts(t["A"], t["B"], t["scaling"], t["prototypes"], t["ranks"])
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
        )
        return lib.to(device=device) if device is not None else lib


def _check_compatible(tasks: list[LoraAdapter], general: list[LoraAdapter]) -> str | None:
    """All adapters target the same modules with the same shapes and come from one base model class."""
    ref = tasks[0]
    classes = {a.base_model_class for a in tasks + general if a.base_model_class}
    families = {model_family(c) for c in classes}
    if len(families) > 1:
        raise ValueError(f"adapters were trained on different base models: {sorted(classes)}")
    names = {os.path.basename(os.path.normpath(a.base_model_name)) for a in tasks + general if a.base_model_name}
    if len(names) > 1:
        raise ValueError(f"adapters name different base models: {sorted(names)}")
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
    return next(iter(classes)) if classes else None


def _check_equal_ranks(path: str, adapters: list[LoraAdapter]) -> None:
    ranks = {ad.name: ad.rank(path) for ad in adapters}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f'gks="param" subtracts factors, so all ranks must agree; module {path!r} has ranks {ranks}. '
            'Use gks="delta" for mixed ranks.'
        )


def _fill_prototypes(modules: dict[str, ModuleExperts], method: str, rng_seed: int | None, names: list[str]) -> None:
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
            + (f" and {len(zero_report) - 5} more modules" if len(zero_report) > 5 else ""),
            stacklevel=3,
        )


__all__ = ["LoraLibrary", "ModuleExperts", "model_family", "FORMAT_VERSION", "GKS_MODES"]
