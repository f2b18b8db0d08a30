"""Loader of the optional compiled extension (csrc/): ops registered under ``torch.ops.genknowsub_fast_C``.

``load()`` loads ``genknowsub_fast._C`` (a shared library of torch ops) when setup.py built it and it is not older
than csrc/; otherwise it JIT-builds the sources of csrc/ with ``torch.utils.cpp_extension.load`` into a cache
directory (``$GENKNOWSUB_FAST_CACHE`` or ``~/.cache/genknowsub_fast/<hash of the sources and the torch version>``),
guarded by a file lock so concurrent processes build once, with the flags of build_rule.py (the same as setup.py's).
``GENKNOWSUB_FAST_EXTENSION=off`` forces the pure-torch fallback. When the extension cannot be loaded, one single-line
warning names the reason and the callers run their torch path.

Ops (CPU; the prototype ops also on CUDA when built with CUDA):

- ``arrow_prototypes(Tensor a, Tensor b) -> (Tensor, Tensor)``
- ``arrow_prototypes_batched(Tensor[] a, Tensor[] b) -> (Tensor[], Tensor[])``
- ``routed_lora_delta_(Tensor(a!) y, Tensor x, Tensor prototypes, Tensor a, Tensor b_t, int top_k,
  float temperature, bool weights_mixing, Tensor? scores=None, Tensor? screen=None) -> ()``: x (..., d_in) and y
  (..., d_out) with the same leading shape; scores (T, E) with T the number of rows; screen: a bfloat16 copy of the
  prototypes (rows of norm at most 1.001) for screened routing (cpu_kernel.screen_prototypes)
- ``cpu_isa(str request="") -> str``: the instruction set the CPU kernels use ("scalar", "avx2", "avx512"); a name
  (or "auto") forces it. ``GENKNOWSUB_FAST_CPU_ISA`` sets it for the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path

import torch

from . import build_rule

NAMESPACE = "genknowsub_fast_C"
ENV_SWITCH = build_rule.EXTENSION_SWITCH
ENV_CACHE = "GENKNOWSUB_FAST_CACHE"
OPS = ("arrow_prototypes", "arrow_prototypes_batched", "routed_lora_delta_", "cpu_isa")

_JIT_NAME = "genknowsub_fast_C_jit"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str once load() has run; "library": path when loaded
_warned = False
_fakes_registered = False


def csrc_dir() -> Path | None:
    """The csrc/ directory of a source checkout (editable install), or None when the sources are not shipped."""
    d = Path(__file__).resolve().parents[2] / "csrc"
    return d if d.is_dir() else None


def cpu_sources() -> list[Path]:
    """The C++ sources of the CPU build, or [] without a source checkout."""
    d = csrc_dir()
    return [] if d is None else build_rule.cpu_sources(d)


def _cache_dir(sources: list[Path]) -> Path:
    root = os.environ.get(ENV_CACHE)
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(" ".join(build_rule.cxx_flags()).encode())
    d = csrc_dir()
    for p in sorted(sources + (list(d.glob("*.h")) if d is not None else [])):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    tag = h.hexdigest()[:16]
    base = Path(root) if root else Path.home() / ".cache" / "genknowsub_fast"
    return base / tag


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (fcntl on POSIX; no lock elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stale(lib: Path) -> bool:
    """True when a source checkout's csrc/ has files newer than the built library (an editable install not rebuilt)."""
    d = csrc_dir()
    if d is None:
        return False
    try:
        built = lib.stat().st_mtime
        return any(p.stat().st_mtime > built for p in d.iterdir() if p.suffix in (".cpp", ".h", ".cu"))
    except OSError:
        return False


def _registered() -> bool:
    return all(hasattr(getattr(torch.ops, NAMESPACE), op) for op in OPS)


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = cpu_sources()
    if not sources:
        raise RuntimeError("no compiled module and no csrc/ sources to build")
    build_dir = _cache_dir(sources)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "build.lock"):
        cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(p) for p in sources],
            extra_cflags=build_rule.cxx_flags(),
            extra_ldflags=build_rule.link_flags(),
            extra_include_paths=[str(csrc_dir())],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    _state["library"] = str(build_dir / f"{_JIT_NAME}.so")


def _try_load() -> tuple[bool, str]:
    if build_rule.extension_disabled():
        return False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    errors = []
    spec = importlib.util.find_spec("genknowsub_fast._C")
    if spec is None or not spec.origin:
        errors.append("genknowsub_fast._C not built")
    elif _stale(Path(spec.origin)):
        errors.append("genknowsub_fast._C is older than the csrc/ sources (rebuild with pip install -e .)")
    else:
        try:  # a library of torch ops, not a Python module: load it the way torch.ops does
            torch.ops.load_library(spec.origin)
            _state["library"] = spec.origin
        except OSError as exc:
            errors.append(f"genknowsub_fast._C did not load ({exc})")
    if not _registered():
        try:
            _jit_build()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
            msg = str(exc).strip().splitlines()
            errors.append(f"JIT build failed: {type(exc).__name__}: {msg[-1] if msg else ''}")
    if _registered():
        _register_fakes()
        return True, "loaded"
    return False, "; ".join(errors) or "ops not registered"


def load() -> bool:
    """True when the ops are registered (building them on first use if needed); False means: use the torch path."""
    global _warned
    with _lock:
        if "ok" not in _state:
            ok, reason = _try_load()
            _state["ok"], _state["reason"] = ok, reason
        ok = bool(_state["ok"])
        if not ok and not _warned:
            _warned = True
            reason = " ".join(str(_state["reason"]).split())
            warnings.warn(
                "genknowsub_fast: compiled extension unavailable, routed layers and prototypes use the PyTorch paths "
                f"({reason})",
                RuntimeWarning,
                stacklevel=3,
            )
    return ok


def status() -> tuple[bool, str]:
    """(loaded, reason) after trying to load."""
    ok = load()
    return ok, str(_state["reason"])


def library_path() -> str | None:
    """The file of the loaded extension (setup.py's build or the JIT build), or None when it is not loaded."""
    return str(_state["library"]) if load() and "library" in _state else None


def has_op(name: str) -> bool:
    """True when ``torch.ops.genknowsub_fast_C.<name>`` is registered (loading the extension if needed)."""
    return load() and hasattr(getattr(torch.ops, NAMESPACE), name)


def has_cuda_kernels() -> bool:
    """True when the prototype ops have a CUDA kernel (the extension was built with CUDA)."""
    if not load():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::arrow_prototypes", "CUDA")


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can go through the ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    def _proto_fake(a, b):
        return a.new_empty(a.shape[0], a.shape[2]), a.new_empty(a.shape[0], dtype=torch.bool)

    def _batched_fake(a_list, b_list):
        outs = [_proto_fake(a, b) for a, b in zip(a_list, b_list, strict=True)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def _routed_fake(y, x, prototypes, a, b_t, top_k, temperature, weights_mixing, scores=None, screen=None):
        return None

    for name, fn in (
        ("arrow_prototypes", _proto_fake),
        ("arrow_prototypes_batched", _batched_fake),
        ("routed_lora_delta_", _routed_fake),
    ):
        try:
            torch.library.register_fake(f"{NAMESPACE}::{name}", fn)
        except RuntimeError as exc:  # already registered (e.g. a second loader in the same process)
            if "already" not in str(exc):
                raise


__all__ = ["load", "status", "has_op", "has_cuda_kernels", "library_path", "cpu_sources", "csrc_dir", "OPS"]
