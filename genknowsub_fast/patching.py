"""patch_model / unpatch_model / patched: run a model's target linear layers with Arrow-routed LoRA experts.

Patching is per instance and reversible (the Liger-Kernel / FlagGems style): a target module gets an instance-level
``forward`` and two non-persistent buffers holding its packed experts, so ``state_dict()`` keys do not change, the
buffers follow ``model.to()`` / ``.half()``, and unpatching deletes exactly what patching added.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .backends import torch_ops
from .backends.packing import PackedExperts, check_mixing, pack_experts
from .library import LoraLibrary, ModuleExperts, model_family

# Linear layers that adapters usually target, per model family (Phi-3 fuses q/k/v and gate/up).
TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
}
_STATE = "_gkf_patch"
_BUF_ROUTE = "_gkf_route_shrink"
_BUF_B = "_gkf_b_t"


@dataclass
class _Patch:
    """What patching added to one module, and how to take it back."""

    name: str
    num_experts: int
    rank: int
    mixing: str
    top_k: int
    temperature: float
    backend: str
    fused: bool  # True: base GEMM + in-place delta; False: delta added to the module's own output
    hooked: bool  # accelerate hook present: the patched forward sits under the hook as _old_forward
    saved_forward: object = None  # instance-level forward (or _old_forward) the module had before, if any
    saved_call: object = None  # the module's own forward, called by the non-fused path (quantised layers, Conv1D)
    recorder: object = field(default=None, repr=False)
    cpu_op: object = field(default=None, repr=False)  # the compiled CPU kernel when it can serve this layer
    inner: object = field(default=None, repr=False)  # the nn.Linear holding the weight, for the cpu_op path


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _inner_linear(module: nn.Module) -> nn.Module:
    """The layer that holds the weight: the module itself, or a PEFT LoRA layer's base layer."""
    return module.base_layer if _is_peft_lora_layer(module) else module


def _module_device(module: nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    inner = _inner_linear(module)
    for p in inner.parameters(recurse=False):
        return p.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    w = getattr(_inner_linear(module), "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return default


def _find_targets(model: nn.Module, library: LoraLibrary) -> dict[str, nn.Module]:
    """Map each library module path to a module of ``model`` (exact path, PEFT's prefix, or a unique suffix)."""
    named = dict(model.named_modules())
    found, missing = {}, []
    for path in library.modules:
        cands = [path, f"base_model.model.{path}"]
        hit = next((c for c in cands if c in named), None)
        if hit is None:
            parts = path.split(".")
            for i in range(1, len(parts)):
                tail = ".".join(parts[i:])
                matches = [n for n in named if n == tail or n.endswith("." + tail)]
                if len(matches) == 1:
                    hit = matches[0]
                    break
        if hit is None:
            missing.append(path)
        else:
            found[path] = named[hit]
    if not found:
        family = model_family(type(getattr(model, "get_base_model", lambda: model)()).__name__)
        hint = f" ({family} models usually target {TARGETS[family]})" if family in TARGETS else ""
        raise ValueError(
            f"the library's module names match nothing in the model: e.g. {list(library.modules)[:3]}{hint}"
        )
    if missing:
        raise ValueError(f"{len(missing)} library modules are not in the model, e.g. {missing[:3]}")
    return found


def _check_shapes(path: str, module: nn.Module, experts: ModuleExperts) -> None:
    inner = _inner_linear(module)
    d_in = getattr(inner, "in_features", None)
    d_out = getattr(inner, "out_features", None)
    if d_in is None and isinstance(getattr(inner, "weight", None), torch.Tensor) and inner.weight.dim() == 2:
        d_out, d_in = inner.weight.shape
    if (d_in, d_out) != (None, None) and (d_in != experts.d_in or d_out != experts.d_out):
        raise ValueError(
            f"module {path!r} is {d_in}→{d_out} but the library's experts are {experts.d_in}→{experts.d_out}: "
            "adapters for another base model?"
        )


def _routed_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward of a patched layer: base output plus the Arrow-routed LoRA delta."""
    st: _Patch = self.__dict__[_STATE]
    route_shrink, b_t = self._buffers[_BUF_ROUTE], self._buffers[_BUF_B]
    if st.cpu_op is not None and st.recorder is None:
        # Decode hot path on the CPU: straight to the base GEMM + compiled kernel. Going through ops.routed_linear cost
        # ~10 µs more per layer in Python (hidden-256 Phi-3, T=1: 40 → 37-39 µs per patched layer; unpatched 23 µs).
        # After model.to()/.half() the tensor check fails and the call falls through to ops.routed_linear.
        inner = st.inner  # cached: _inner_linear's hasattr probes on an nn.Module cost ~3 µs a call
        w = inner.weight
        if torch_ops.cpu_kernel_takes(x, w, route_shrink, b_t):
            x2 = x.reshape(-1, x.shape[-1])
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            y = F.linear(x2, w, inner.bias)
            e = st.num_experts
            protos, a = route_shrink[:e], route_shrink[e:].view(e, st.rank, -1)
            st.cpu_op(y, x2, protos, a, b_t, st.top_k, st.temperature, st.mixing == "weights", None)
            return y.view(*x.shape[:-1], y.shape[-1])
    packed = PackedExperts(route_shrink, b_t, st.num_experts, st.rank, st.mixing)
    if st.recorder is not None:
        st.recorder.record(st.name, x, packed, st.top_k, st.temperature)
    if st.fused:
        inner = _inner_linear(self)
        return ops.routed_linear(x, packed, st.top_k, st.temperature, inner.weight, inner.bias, st.backend)
    base = _inner_linear(self)(x, *args, **kwargs) if _is_peft_lora_layer(self) else st.saved_call(x, *args, **kwargs)
    xd = x if x.dtype == packed.route_shrink.dtype else x.to(packed.route_shrink.dtype)
    delta = ops.routed_linear(xd, packed, st.top_k, st.temperature, None, None, st.backend)
    return base + delta.to(base.dtype)


def patch_model(
    model: nn.Module,
    library: LoraLibrary | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    mixing: str = "output",
    backend: str = "auto",
) -> nn.Module:
    """Route the model's target layers through the library's experts with Arrow (+ GenKnowSub); returns ``model``.

    Args:
        model: a HF model (Phi-3, Phi-2, or any model whose adapters target linear layers), or a PEFT model made by
            ``peft.create_arrow_model`` (then ``library`` may be None: its adapters and ArrowConfig are used).
        library: the experts; None only for a PEFT Arrow model.
        top_k: experts per token (default: the library's routing default, else 3).
        temperature: softmax temperature > 0 (default: the library's routing default, else 1.0).
        mixing: ``"output"`` (PEFT's Arrow) or ``"weights"`` (per-token merged A and B, one shared scaling).
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.

    Every check runs before any module is touched. A model already patched raises ValueError.
    """
    if library is None:
        library = LoraLibrary.from_peft_model(model)
    if not isinstance(library, LoraLibrary):
        raise ValueError(f"library must be a LoraLibrary, got {type(library).__name__}")
    top_k = int(library.routing.get("top_k", 3)) if top_k is None else top_k
    temperature = float(library.routing.get("temperature", 1.0)) if temperature is None else temperature
    ops._check_routing_args(top_k, temperature, library.num_experts)
    if any(_STATE in m.__dict__ for m in model.modules()):
        raise ValueError("model is already patched; call genknowsub_fast.unpatch_model(model) first")
    base = getattr(model, "get_base_model", lambda: model)()
    fam_model, fam_lib = model_family(type(base).__name__), model_family(library.base_model_class)
    if fam_model and fam_lib and fam_model != fam_lib and fam_lib in TARGETS and fam_model in TARGETS:
        raise ValueError(f"the library was built for a {library.base_model_class}, not a {type(base).__name__}")
    targets = _find_targets(model, library)
    plans = []
    for path, module in targets.items():
        experts = library.modules[path]
        _check_shapes(path, module, experts)
        check_mixing(mixing, experts.scaling, experts.ranks)
        if _is_peft_lora_layer(module) and not getattr(module, "lora_arrow", None):
            raise ValueError(
                f"module {path!r} is a PEFT LoRA layer with its own active adapters; merge_and_unload() it first"
            )
        device = _module_device(module)
        run_backend = ops.resolve_backend(backend, device)
        inner = _inner_linear(module)
        fused = type(inner) is nn.Linear
        plans.append((path, module, experts, device, run_backend, fused))

    for path, module, experts, device, run_backend, fused in plans:
        dtype = _module_dtype(module, library.dtype)
        packed = pack_experts(
            experts.a, experts.b, experts.scaling, experts.prototypes, mixing, experts.ranks, dtype=dtype, device=device
        )
        hooked = hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
        slot = "_old_forward" if hooked else "forward"
        st = _Patch(
            name=path,
            num_experts=packed.num_experts,
            rank=packed.rank,
            mixing=mixing,
            top_k=top_k,
            temperature=float(temperature),
            backend=run_backend,
            fused=fused,
            hooked=hooked,
            saved_forward=module.__dict__.get(slot),
        )
        st.saved_call = (
            module.__dict__[slot] if slot in module.__dict__ else types.MethodType(type(module).forward, module)
        )
        if fused and run_backend == "torch" and packed.route_shrink.device.type == "cpu":
            st.cpu_op, st.inner = torch_ops.fused_op(), _inner_linear(module)
        module.register_buffer(_BUF_ROUTE, packed.route_shrink, persistent=False)
        module.register_buffer(_BUF_B, packed.b_t, persistent=False)
        module.__dict__[_STATE] = st
        setattr(module, slot, types.MethodType(_routed_forward, module))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: every patched module gets its original forward back, bit for bit; returns model.

    Raises ValueError when the model is not patched.
    """
    patched_modules = [m for m in model.modules() if _STATE in m.__dict__]
    if not patched_modules:
        raise ValueError("model is not patched by genknowsub_fast")
    for m in patched_modules:
        st: _Patch = m.__dict__.pop(_STATE)
        slot = "_old_forward" if st.hooked else "forward"
        if st.saved_forward is None:
            m.__dict__.pop(slot, None)
        else:
            m.__dict__[slot] = st.saved_forward
        for buf in (_BUF_ROUTE, _BUF_B):
            m._buffers.pop(buf, None)
            m._non_persistent_buffers_set.discard(buf)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` has modules patched by :func:`patch_model`."""
    return any(_STATE in m.__dict__ for m in model.modules())


@contextlib.contextmanager
def patched(model: nn.Module, library: LoraLibrary | None = None, **kwargs) -> Iterator[nn.Module]:
    """Context manager: ``patch_model(model, library, **kwargs)`` on entry, :func:`unpatch_model` on exit."""
    patch_model(model, library, **kwargs)
    try:
        yield model
    finally:
        unpatch_model(model)


def patched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module of every patched module in ``model``."""
    return {n: m for n, m in model.named_modules() if _STATE in m.__dict__}


__all__ = ["patch_model", "unpatch_model", "patched", "is_patched", "patched_modules", "TARGETS"]
