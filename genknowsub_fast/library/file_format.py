"""The library file: one safetensors file with JSON metadata; format version 2 stores each module's experts in the
layout the kernels read, so that loading maps them (the table is in docs/design.md, section 4).

:func:`write` takes a library's modules and metadata and writes them atomically; :func:`write_streamed` writes
modules as a build produces them; :func:`read` checks everything a file holds (:mod:`.file_checks`) before returning
it, mapping version 2 files and reading version 1 files (five plain tensors per module, packed once when read).
Neither knows how a library is built or used.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Callable

import torch

from ..backends.packing import STORED_NAMES, pack_experts, stored_tensors
from ..experts import ModuleExperts
from ..memory import check_fits, human_bytes
from ..paths import check_input_file, write_atomically
from . import file_checks as checks
from . import tensor_file
from .tensor_file import write_at

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
META_KEY = "genknowsub_fast"
SMALL_NAMES = ("scaling", "ranks")  # stored beside the packed tensors, read into memory

# (name → (dtype, shape), layout) of one module's packed tensors: what a file reserves for it before it is written
StoredSpecs = tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict]


def stored_specs(
    num_experts: int, rank: int, d_in: int, d_out: int, dtype: torch.dtype, prototype_dtype: torch.dtype | None = None
) -> StoredSpecs:
    """The dtypes, shapes and layout of the packed tensors a file stores for one module (the CPU packing in
    ``dtype``), found by packing one zero expert."""
    one = pack_experts(
        torch.zeros(1, rank, d_in, dtype=dtype),
        torch.zeros(1, d_out, rank, dtype=dtype),
        torch.ones(1),
        torch.zeros(1, d_in, dtype=prototype_dtype or dtype),
        dtype=dtype,
    )
    tensors, layout = stored_tensors(one)
    return {k: (t.dtype, (num_experts, *t.shape[1:])) for k, t in tensors.items()}, layout


def _check_target(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"library file {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"library file {path!r}: directory {parent!r} does not exist")


def _module_specs(path: str, specs: StoredSpecs, e: int):
    tensors, _ = specs
    for name in SMALL_NAMES:
        yield f"{path}/{name}", torch.float32 if name == "scaling" else torch.int64, (e,), False
    for name in STORED_NAMES:
        dtype, shape = tensors[name]
        yield f"{path}/{name}", dtype, shape, True


def write_streamed(
    path: str | os.PathLike,
    specs: dict[str, StoredSpecs],
    meta: dict,
    produce: Callable[[Callable[[str, ModuleExperts], None]], None],
) -> None:
    """Write a library whose modules (in the order of ``specs``: module path → its packed tensors' dtypes, shapes
    and layout) come from ``produce(emit)``, which calls ``emit(module_path, experts)`` once per module, in order; each
    module is written as it comes and need not be kept.

    The file is written under a temporary name in the same directory and renamed into place, so a failed write
    leaves any older file as it was; it gets the permissions of any newly created file (0o666 less the umask).
    ValueError when the directory does not exist or ``path`` is a directory, before anything is written.
    """
    path = os.fspath(path)
    _check_target(path)
    e = len(meta["expert_names"])
    full = {"format_version": FORMAT_VERSION, **meta, "packed": {p: s[1] for p, s in specs.items()}}
    entries = [spec for p, s in specs.items() for spec in _module_specs(p, s, e)]
    header, offsets, size = tensor_file.plan_layout(entries, {META_KEY: json.dumps(full)})
    expected = {key: (dtype, tuple(shape)) for key, dtype, shape, _ in entries}
    order = list(specs)

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, size)  # the filler between aligned tensors reads as zeros
            os.pwrite(fd, header, 0)
            seen = []

            def emit(module: str, experts: ModuleExperts) -> None:
                if len(seen) >= len(order) or module != order[len(seen)]:
                    raise ValueError(f"module {module!r} written out of order (expected {order[len(seen):][:1]})")
                seen.append(module)
                packed = experts.packed_for("cpu", experts.dtype)
                tensors, layout = stored_tensors(packed)
                if layout != specs[module][1]:
                    raise ValueError(f"module {module!r}: layout {layout} differs from the planned {specs[module][1]}")
                tensors = {**tensors, "scaling": experts.scaling, "ranks": experts.ranks}
                for name, t in tensors.items():
                    key = f"{module}/{name}"
                    t = t.detach().to("cpu").contiguous()
                    if (t.dtype, tuple(t.shape)) != expected[key]:
                        raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, planned {expected[key]}")
                    write_at(fd, offsets[key], t)

            produce(emit)
            if len(seen) != len(order):
                raise ValueError(f"{len(order) - len(seen)} modules were not written")
        finally:
            os.close(fd)

    write_atomically(path, write)


def write(path: str | os.PathLike, modules: dict[str, ModuleExperts], meta: dict) -> None:
    """Write ``modules`` and ``meta`` (the JSON metadata, ``format_version`` and the packed layouts added here) to
    ``path``, module by module (experts that are not packed for the CPU are packed one module at a time).

    The file is written under a temporary name in the same directory and renamed into place, so a failed write
    leaves any older file as it was; it gets the permissions of any newly created file (0o666 less the umask).
    ValueError when the directory does not exist or ``path`` is a directory, before anything is written.
    """
    specs = {
        p: stored_specs(m.num_experts, m.rank, m.d_in, m.d_out, m.dtype, m.prototypes.dtype) for p, m in modules.items()
    }

    def produce(emit):
        for p, m in modules.items():
            emit(p, m)

    write_streamed(path, specs, meta, produce)


def read(path: str | os.PathLike, mmap: bool | None = None) -> tuple[dict[str, ModuleExperts], dict, str]:
    """(modules, metadata, storage) of a library file: packed modules (:meth:`ModuleExperts.from_packed`) on the CPU.

    ``mmap``: None maps a version 2 file where it can be protected against being rewritten in place while in use (a
    read lease, see :mod:`.tensor_file`), else reads it into memory with a warning saying why; True maps it even
    unprotected; False reads it into memory. ``storage`` says what was done: ``"mapped"``, ``"mapped, unprotected"``
    or ``"memory"`` (always for version 1 files, which are packed when read).

    Everything in the file is checked before it is used (:mod:`.file_checks`): the metadata, and per module the
    dtype, shape and values of its tensors (finite, ranks in [1, r_max], zero padding, unit prototypes or a zero one
    for a zero ΔW). Anything else is a ValueError naming the file and, where one is at fault, the tensor. A library
    larger than the memory this process may still use is refused before anything is read.
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
    check_input_file(path, "library file")  # missing, or a FIFO / socket / device (which would not be read)
    if mmap not in (None, True, False):
        raise ValueError(f"mmap must be None, True or False, got {mmap!r}")
    where = f"library {path!r}"
    try:
        mapped, header = tensor_file.open_for_mapping(path)
    except ValueError as exc:
        raise ValueError(f"cannot read library {path!r}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read library {path!r}: {exc.strerror or exc}") from None
    try:
        meta = _metadata(header, path, where)
        check_fits(header.file_size, f"library {path!r} needs {human_bytes(header.file_size)}",
                   "free memory or load a smaller library")  # fmt: skip
        if meta["format_version"] == 1:
            return _read_v1(mapped, header, meta, where), meta, "memory"
        return _read_v2(mapped, header, meta, where, mmap)
    finally:
        mapped.finish()


def _metadata(header: tensor_file.Header, path: str, where: str) -> dict:
    raw = header.metadata.get(META_KEY)
    if raw is None:
        raise ValueError(f"{path!r} is a safetensors file but not a genknowsub_fast library")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata is not a JSON object")
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise ValueError(f"{where} has library format {version!r}, this version reads {list(READ_VERSIONS)}")
    checks.check_metadata(meta, where)
    return meta


def _read_v2(mapped: tensor_file.MappedFile, header: tensor_file.Header, meta: dict, where: str, mmap: bool | None):
    layouts = checks.check_packed_layouts(meta, where)
    checks.check_tensor_keys(list(header.tensors), meta["module_paths"], where, version=2)
    for key, info in header.tensors.items():
        if info.dtype is None:
            raise ValueError(f"{where}: tensor {key!r} has a dtype this reader does not know")
    storage = "memory"
    if mmap is not False:
        if mapped.take_lease():
            storage = "mapped"
            # The header was read before the lease: a file rewritten in between (by a writer gone since) is not
            # the one checked.
            if not tensor_file.read_header(mapped.fd, mapped.path).same_layout(header):
                raise ValueError(f"{where} was rewritten while it was being opened; load it again")
        elif mmap:
            storage = "mapped, unprotected"
        else:
            warnings.warn(
                f"{where} is read into memory instead of mapped: a mapping cannot be protected against the file being "
                f"rewritten while in use ({mapped.why_unprotected}); pass mmap=True to map it anyway, mmap=False to "
                "read it without this warning",
                stacklevel=4,
            )
    e, method = len(meta["expert_names"]), meta.get("prototype_method", "exact")
    modules = {}
    for p in meta["module_paths"]:
        tensors = {}
        for name in (*STORED_NAMES, *SMALL_NAMES):
            key = f"{p}/{name}"
            info = header.tensors[key]
            if storage != "memory" and name in STORED_NAMES and info.nbytes:
                try:
                    tensors[name] = mapped.map_tensor(header.data_start + info.begin, info.dtype, info.shape)
                except OSError as exc:
                    if exc.errno == errno.ESTALE:
                        raise ValueError(f"{where} was rewritten while it was being loaded; load it again") from None
                    raise
            else:
                tensors[name] = tensor_file.read_tensor(mapped.fd, header, key, mapped.path)
        modules[p] = checks.check_packed_module(tensors, layouts[p], e, method, f"{where}: tensor '{p}")
    return modules, meta, storage


def _read_v1(mapped: tensor_file.MappedFile, header: tensor_file.Header, meta: dict, where: str):
    """Version 1: five plain tensors per module, read into memory (never mapped) and packed once, module by module,
    so that the library holds the packed form only."""
    checks.check_tensor_keys(list(header.tensors), meta["module_paths"], where, version=1)
    for key, info in header.tensors.items():
        if info.dtype is None:
            raise ValueError(f"{where}: tensor {key!r} has a dtype this reader does not know")
    e, method = len(meta["expert_names"]), meta.get("prototype_method", "exact")
    modules = {}
    for p in meta["module_paths"]:
        t = {k: tensor_file.read_tensor(mapped.fd, header, f"{p}/{k}", mapped.path) for k in checks.TENSOR_KEYS}
        raw = checks.check_module_tensors(t, e, method, f"{where}: tensor '{p}")
        modules[p] = raw.packed_copy()
        del raw, t
    warnings.warn(
        f"{where} is in library format 1, which is packed when loaded; save it again (LoraLibrary.save) to have "
        "it mapped as it is",
        stacklevel=4,
    )
    return modules


__all__ = ["FORMAT_VERSION", "READ_VERSIONS", "META_KEY", "read", "write", "write_streamed"]
