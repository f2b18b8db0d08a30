"""Validation of a library's contents: expert names, the file metadata and every module's five tensors.

:meth:`genknowsub_fast.LoraLibrary.load` runs these on whatever a file holds, so that an edited or damaged
file (a NaN scaling, an int32 tensor, a zeroed or rescaled prototype, a rank outside [1, r_max], non-zero padding,
duplicate names, garbage metadata) is refused with a ValueError naming the file and the tensor, instead of loading and
giving wrong or NaN logits later. Each check costs O(size of the tensors) plus r×r Gram products; no ΔW is formed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..backends.packing import STORED_NAMES, StoredLayoutError, from_stored
from ..experts import ModuleExperts, all_finite
from .gks import GKS_MODES
from .layer_prototypes import PROTOTYPE_SCOPES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TENSOR_KEYS = ("A", "B", "scaling", "prototypes", "ranks")
PROTOTYPE_METHODS = ("exact", "power", "svd", "peft")  # "peft": PEFT's own power-iteration prototypes
_ALIGN = re.compile(r"\.align\.\d+")  # filler tensors that page-align a version 2 file's packed tensors


def check_float_dtype(dtype: object) -> None:
    """ValueError unless ``dtype`` is None or a dtype a library may be stored in."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES):
        raise ValueError(f"a library's dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")


def check_names(names: object, what: str, allow_empty: bool = False) -> list[str]:
    """``names`` as a list of distinct non-empty strings; ValueError naming ``what`` otherwise."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be a list of non-empty strings, got {names!r}")
    if not names and not allow_empty:
        raise ValueError(f"{what} is empty")
    seen: set[str] = set()
    dup = [n for n in names if n in seen or seen.add(n)]
    if dup:
        raise ValueError(f"{what} has duplicates: {sorted(set(dup))} (every expert needs its own name)")
    return list(names)


def prototype_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of a stored unit prototype may be in ``dtype``.

    Rounding each entry of a unit vector to ``dtype`` changes its norm by at most the unit roundoff (eps/2); 4·eps
    leaves room for the rounding of the computation itself, with a floor of 1e-4 for float32/float64. Largest
    deviation measured on synthetic Phi-3 'tiny' and 'small' libraries (rank 8; exact, power and svd prototypes):
    9.5e-8 in float32, 8.4e-5 in float16, 7.9e-4 in bfloat16, against tolerances of 1e-4, 3.9e-3 and 3.1e-2. An
    edited prototype (rescaled, or another vector) is off by far more.
    """
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def check_metadata(meta: object, where: str) -> dict:
    """The metadata of a library file, checked field by field (``where`` prefixes every message)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata is not a JSON object")
    for key in ("expert_names", "module_paths"):
        if key not in meta:
            raise ValueError(f"{where}: metadata has no {key!r}")
    try:
        check_names(meta["expert_names"], "expert_names")
        check_names(meta["module_paths"], "module_paths")
        check_names(meta.get("general_names", []), "general_names", allow_empty=True)
        check_names(meta.get("added_names", []), "added_names", allow_empty=True)
    except ValueError as exc:
        raise ValueError(f"{where}: metadata {exc}") from None
    gks = meta.get("gks")
    if gks is not None and gks not in GKS_MODES:
        raise ValueError(f"{where}: metadata gks must be null or one of {GKS_MODES}, got {gks!r}")
    for key in ("base_model_class", "base_model_name"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: metadata {key} must be a string or null, got {value!r}")
    method = meta.get("prototype_method", "exact")
    if method not in PROTOTYPE_METHODS:
        raise ValueError(f"{where}: metadata prototype_method must be one of {PROTOTYPE_METHODS}, got {method!r}")
    scope = meta.get("prototype_scope", "module")
    if scope not in PROTOTYPE_SCOPES:
        raise ValueError(f"{where}: metadata prototype_scope must be one of {PROTOTYPE_SCOPES}, got {scope!r}")
    routing = meta.get("routing") or {}
    if not isinstance(routing, dict) or set(routing) - {"top_k", "temperature"}:
        raise ValueError(f"{where}: metadata routing must be an object with top_k and/or temperature, got {routing!r}")
    e = len(meta["expert_names"])
    top_k, temperature = routing.get("top_k", 1), routing.get("temperature", 1.0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"{where}: metadata routing top_k must be an integer in [1, {e}], got {top_k!r}")
    ok = not isinstance(temperature, bool) and isinstance(temperature, (int, float))
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: metadata routing temperature must be a finite number > 0, got {temperature!r}")
    return meta


def check_module_tensors(
    tensors: dict[str, torch.Tensor], num_experts: int, prototype_method: str, where: str
) -> ModuleExperts:
    """One module's tensors (``A``, ``B``, ``scaling``, ``prototypes``, ``ranks``) as a ModuleExperts, or ValueError.

    ``where`` names the module in the messages (e.g. ``library 'x.safetensors': tensor 'model.layers.0.o_proj``);
    each message appends ``/<key>`` and what is wrong.
    """
    a, b, scaling, protos, ranks = (tensors[k] for k in TENSOR_KEYS)

    def fail(key: str, msg: str) -> ValueError:
        return ValueError(f"{where}/{key}' {msg}")

    for key, t in (("A", a), ("B", b), ("prototypes", protos)):
        if t.dtype not in FLOAT_DTYPES:
            raise fail(key, f"has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
    if b.dtype != a.dtype:
        raise fail("B", f"has dtype {b.dtype} but A has {a.dtype}")
    if scaling.dtype != torch.float32:
        raise fail("scaling", f"has dtype {scaling.dtype}; expected torch.float32")
    if ranks.dtype != torch.int64:
        raise fail("ranks", f"has dtype {ranks.dtype}; expected torch.int64")

    e = num_experts
    if a.dim() != 3 or a.shape[0] != e or min(a.shape) < 1:
        raise fail("A", f"has shape {tuple(a.shape)}; expected ({e}, r, d_in)")
    _, r, d_in = a.shape
    if b.dim() != 3 or b.shape[0] != e or b.shape[2] != r or b.shape[1] < 1:
        raise fail("B", f"has shape {tuple(b.shape)}; expected ({e}, d_out, {r}) to chain with A {tuple(a.shape)}")
    if scaling.shape != (e,):
        raise fail("scaling", f"has shape {tuple(scaling.shape)}; expected ({e},)")
    if protos.shape != (e, d_in):
        raise fail("prototypes", f"has shape {tuple(protos.shape)}; expected ({e}, {d_in})")
    if ranks.shape != (e,):
        raise fail("ranks", f"has shape {tuple(ranks.shape)}; expected ({e},)")

    for key, t in (("A", a), ("B", b), ("scaling", scaling), ("prototypes", protos)):
        if not all_finite(t):
            raise fail(key, "contains NaN or Inf")
    bad = ((ranks < 1) | (ranks > r)).nonzero().flatten().tolist()
    if bad:
        raise fail("ranks", f"has {[int(ranks[i]) for i in bad]} for experts {bad}; each rank must be in [1, {r}]")
    pad = torch.arange(r, device=ranks.device)[None, :] >= ranks[:, None]  # (E, r): rows past each expert's rank
    if bool(pad.any()):
        if bool((a.masked_select(pad[:, :, None]) != 0).any()):
            raise fail("A", "has non-zero padding rows (rows past an expert's rank must be zero)")
        if bool((b.masked_select(pad[:, None, :]) != 0).any()):
            raise fail("B", "has non-zero padding columns (columns past an expert's rank must be zero)")
    _check_prototypes(a, b, protos, prototype_method, lambda msg: fail("prototypes", msg))
    return ModuleExperts(a, b, scaling, protos, ranks)


def _check_prototypes(a, b, protos, method: str, fail) -> None:
    """Unit rows (power iteration: norm in (0, 1], its damped normalisation gives slightly less than 1 for tiny ΔW),
    or a zero row for an expert whose ΔW is zero. Packed prototypes are float32 copies of prototypes rounded to the
    library's dtype, so the tolerance is the coarser of the two dtypes'."""
    tol = max(prototype_tolerance(protos.dtype), prototype_tolerance(a.dtype))
    norms = protos.to(torch.float64).norm(dim=1)
    zero = norms == 0
    too_long = norms > 1 + tol
    too_short = ~zero & (norms < 1 - tol) if method not in ("power", "peft") else torch.zeros_like(zero)
    off = (too_long | too_short).nonzero().flatten().tolist()
    if off:
        raise fail(f"rows {off} have norms {[round(float(norms[i]), 6) for i in off]}; prototypes are unit vectors")
    if bool(zero.any()):
        # ‖B A‖_F² = Σ (BᵀB) ⊙ (A Aᵀ), from r×r Grams. ΔW counts as zero when it is below the rounding of the
        # factors' own norms in their dtype (8·eps relative), as the prototype solver decides.
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        gram = ((b64.transpose(1, 2) @ b64) * (a64 @ a64.transpose(1, 2))).sum((1, 2)).clamp_min(0)
        scale = a64.square().sum((1, 2)) * b64.square().sum((1, 2))
        rel = 8 * torch.finfo(a.dtype).eps
        live = (zero & (gram > rel**2 * scale)).nonzero().flatten().tolist()
        if live:
            raise fail(f"rows {live} are zero but those experts' ΔW = B·A is not (a prototype must be a unit vector)")


def check_packed_layouts(meta: dict, where: str) -> dict[str, dict]:
    """The ``packed`` entry of a version 2 file's metadata: one layout object per module path."""
    layouts = meta.get("packed")
    if not isinstance(layouts, dict) or not all(isinstance(v, dict) for v in layouts.values()):
        raise ValueError(f"{where}: metadata has no 'packed' object of per-module layouts")
    missing = [p for p in meta["module_paths"] if p not in layouts]
    if missing:
        raise ValueError(f"{where}: metadata 'packed' has no layout for module {missing[0]!r}")
    return layouts


def check_packed_module(
    tensors: dict[str, torch.Tensor], layout: dict, num_experts: int, prototype_method: str, where: str
) -> ModuleExperts:
    """One module's tensors of a version 2 file (the packed ``prototypes``, ``a``, ``b_t``, and ``scaling``,
    ``ranks``) as packed ModuleExperts viewing them, or ValueError naming the tensor (``where`` as in
    :func:`check_module_tensors`).

    The same checks as version 1's, on the packed form: B's zero padding is checked on the rows of ``b_t`` (which
    hold ``s·Bᵀ``), and a zero prototype needs a zero ``b_tᵀ a`` (ΔW times the scaling). Every byte of the packed
    tensors is read once (finite values), the row padding of ``b_t`` included.
    """
    scaling, ranks = tensors["scaling"], tensors["ranks"]

    def fail(key: str, msg: str) -> ValueError:
        return ValueError(f"{where}/{key}' {msg}")

    e = num_experts
    a = tensors["a"]
    if a.dim() != 3 or a.shape[0] != e:
        raise fail("a", f"has shape {tuple(a.shape)}; expected ({e}, r, d_in)")
    if scaling.dtype != torch.float32:
        raise fail("scaling", f"has dtype {scaling.dtype}; expected torch.float32")
    if ranks.dtype != torch.int64:
        raise fail("ranks", f"has dtype {ranks.dtype}; expected torch.int64")
    if scaling.shape != (e,):
        raise fail("scaling", f"has shape {tuple(scaling.shape)}; expected ({e},)")
    if ranks.shape != (e,):
        raise fail("ranks", f"has shape {tuple(ranks.shape)}; expected ({e},)")
    try:
        packed = from_stored({k: tensors[k] for k in STORED_NAMES}, layout)
    except StoredLayoutError as exc:
        raise fail(exc.key, exc.message) from None
    for key in STORED_NAMES:
        if not all_finite(tensors[key]):
            raise fail(key, "contains NaN or Inf")
    if not all_finite(scaling):
        raise fail("scaling", "contains NaN or Inf")
    r = packed.rank
    bad = ((ranks < 1) | (ranks > r)).nonzero().flatten().tolist()
    if bad:
        raise fail("ranks", f"has {[int(ranks[i]) for i in bad]} for experts {bad}; each rank must be in [1, {r}]")
    pad = torch.arange(r)[None, :] >= ranks[:, None]  # (E, r): rows past each expert's rank
    if bool(pad.any()):
        if bool((packed.a.masked_select(pad[:, :, None]) != 0).any()):
            raise fail("a", "has non-zero padding rows (rows past an expert's rank must be zero)")
        if bool((packed.b_t.masked_select(pad[:, :, None]) != 0).any()):
            raise fail("b_t", "has non-zero padding rows (rows past an expert's rank must be zero)")
    _check_prototypes(packed.a, packed.b_t.transpose(1, 2), packed.prototypes, prototype_method,
                      lambda msg: fail("prototypes", msg))  # fmt: skip
    return ModuleExperts.from_packed(packed, scaling, ranks)


def check_tensor_keys(keys: Sequence[str], module_paths: Sequence[str], where: str, version: int = 1) -> None:
    """Every module has its tensors (version 1: :data:`TENSOR_KEYS`; version 2: the packed tensors, scaling and
    ranks) and the file holds nothing else (version 2: but the ``.align.<n>`` filler of its layout)."""
    names = TENSOR_KEYS if version == 1 else (*STORED_NAMES, "scaling", "ranks")
    have = {k for k in keys if not (version == 2 and _ALIGN.fullmatch(k))}
    want = {f"{p}/{k}" for p in module_paths for k in names}
    missing = sorted(want - have)
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = sorted(have - want)
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r} (not listed in the metadata's module_paths)")


__all__ = [
    "FLOAT_DTYPES",
    "TENSOR_KEYS",
    "check_float_dtype",
    "check_names",
    "check_metadata",
    "check_module_tensors",
    "check_packed_layouts",
    "check_packed_module",
    "check_tensor_keys",
    "prototype_tolerance",
]
