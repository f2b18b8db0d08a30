"""The library file: one safetensors file with five tensors per target module and JSON metadata (format version 1;
the table is in docs/design.md, section 4).

:func:`write` takes a library's modules and metadata and writes them atomically; :func:`read` checks everything a
file holds (:mod:`.file_checks`) before returning it. Neither knows how a library is built or used.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from safetensors.torch import save_file

from ..experts import ModuleExperts
from ..paths import write_atomically
from . import file_checks as checks

FORMAT_VERSION = 1
META_KEY = "genknowsub_fast"


def write(path: str | os.PathLike, modules: dict[str, ModuleExperts], meta: dict) -> None:
    """Write ``modules`` and ``meta`` (the JSON metadata, ``format_version`` added here) to ``path``.

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
    for p, m in modules.items():
        tensors[f"{p}/A"] = m.a
        tensors[f"{p}/B"] = m.b
        tensors[f"{p}/scaling"] = m.scaling
        tensors[f"{p}/prototypes"] = m.prototypes
        tensors[f"{p}/ranks"] = m.ranks
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps({"format_version": FORMAT_VERSION, **meta})
    write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata={META_KEY: text}))


def read(path: str | os.PathLike) -> tuple[dict[str, ModuleExperts], dict]:
    """(modules, metadata) of a library file, on the CPU.

    Everything in the file is checked before it is used (:mod:`.file_checks`): the metadata, and per module the
    dtype, shape and values of A, B, scaling, prototypes and ranks (finite, ranks in [1, r_max], zero padding, unit
    prototypes or a zero one for a zero ΔW). Anything else is a ValueError naming the file and, where one is at fault,
    the tensor.
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
            raw = (f.metadata() or {}).get(META_KEY)
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
    return modules, meta


__all__ = ["FORMAT_VERSION", "META_KEY", "read", "write"]
