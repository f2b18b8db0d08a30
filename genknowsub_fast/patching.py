"""patch_model / unpatch_model / patched / patched_layers: run a model's target linear layers with Arrow-routed LoRA.

Patching is per instance and reversible (the Liger-Kernel / FlagGems style): a target module gets an instance-level
``forward`` that calls the layer's prepared runner (:class:`genknowsub_fast.runner.RoutedLinear`), and nothing else
changes: no parameters or buffers are added, so ``state_dict()`` keys and ``named_buffers()`` stay as they were, and
unpatching removes exactly what patching added. The runner packs the experts for the layer's device and dtype at
patch time, and packs again (once) if the model later moves to another device or dtype.

Patching and unpatching are atomic: one lock serialises them, so of two threads patching one model, the second gets
a clear ValueError and the model stays usable.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .experts import ModuleExperts
from .library import LoraLibrary, model_family
from .memory import check_device_fits, human_bytes
from .runner import RoutedLinear

# Linear layers that adapters usually target, per model family (Phi-3 fuses q/k/v and gate/up).
TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
}
_STATE = "_gkf_patch"
_LOCK = threading.RLock()

Recorder = Callable[["PatchedLayer", torch.Tensor], None]


@dataclass(eq=False)
class PatchedLayer:
    """The public view of one patched module (see :func:`patched_layers`).

    Attributes:
        name: the library's module path this layer runs (e.g. ``model.layers.0.self_attn.qkv_proj``).
        module: the patched module itself.
        runner: its prepared runner; ``runner.experts`` are the layer's experts and ``runner.packed`` their packed
            form for the current device and dtype.
        recorder: None, or a callable ``recorder(layer, x)`` called with every input before the layer runs (the
            routing analytics use it); set it to None to stop. It costs one ``is not None`` test per call when unset.
        expert_names: the library's expert names, in index order (what routing tables and plots label experts with).
    """

    name: str
    module: nn.Module
    runner: RoutedLinear
    recorder: Recorder | None = None
    expert_names: tuple[str, ...] = ()
    # How to run and how to undo (private).
    _linear: nn.Module | None = field(default=None, repr=False)  # layer holding W: one runner call for W + delta
    _transposed: bool = field(default=False, repr=False)  # _linear stores W as (d_in, d_out) (GPT-2 Conv1D)
    # A quantised base layer (bitsandbytes 4-bit): the experts run in this dtype (float32) and the delta is added to
    # the base output in it, rounded once (PEFT's and the original code's arithmetic on such bases).
    _delta_dtype: torch.dtype | None = field(default=None, repr=False)
    # Otherwise the base output comes from _base_call (a PEFT layer's base layer, or an instance forward the module
    # had), or, when that is None, from the class's forward; then the delta is added.
    _base_call: Callable | None = field(default=None, repr=False)
    _hooked: bool = field(default=False, repr=False)  # accelerate hook: the patched forward sits under _old_forward
    _saved_forward: object = field(default=None, repr=False)  # instance-level forward the module had before, if any

    @property
    def experts(self) -> ModuleExperts:
        return self.runner.experts

    @property
    def top_k(self) -> int:
        return self.runner.top_k

    @property
    def temperature(self) -> float:
        return self.runner.temperature

    @property
    def mixing(self) -> str:
        return self.runner.mixing

    @property
    def backend(self) -> str:
        """The backend asked for ("auto", "torch" or "triton"); ``runner.active_backend`` says what runs."""
        return self.runner.backend

    @property
    def fused(self) -> bool:
        """True when the layer is a plain nn.Linear or a GPT-2 Conv1D and one runner call computes
        ``x Wᵀ + b + delta``; False when the module's own forward computes the base output (quantised layers, ...)
        and the delta is added to it."""
        return self._linear is not None

    @property
    def options(self) -> dict:
        """The routing options as a dict (top_k, temperature, mixing, backend)."""
        return {"top_k": self.top_k, "temperature": self.temperature, "mixing": self.mixing, "backend": self.backend}


class _PatchedForward:
    """The instance-level forward of a patched module: an object rather than a bound method, so a patched model can be
    pickled (``torch.save(model)``) and deep-copied."""

    __slots__ = ("layer",)

    def __init__(self, layer: PatchedLayer):
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        if layer.recorder is not None:
            layer.recorder(layer, x)
        lin = layer._linear
        if lin is not None:
            # The parameters straight from the module's dict, which is what lin.weight returns when they are
            # registered, without nn.Module.__getattr__'s slow path (docs/design.md, "What a call costs").
            # Otherwise (torch.nn.utils.weight_norm makes weight a plain attribute) the attributes.
            params = lin._parameters
            if "weight" in params and "bias" in params:
                weight, bias = params["weight"], params["bias"]
            else:
                weight, bias = lin.weight, lin.bias
            # Conv1D computes addmm(b, x, W) with W (d_in, d_out); F.linear(x, W.t(), b) is the same addmm, bit for bit.
            return layer.runner(x, weight.t() if layer._transposed else weight, bias)
        call = layer._base_call
        if call is None:
            base = type(layer.module).forward(layer.module, x, *args, **kwargs)
        else:
            base = call(x, *args, **kwargs)
        dt = layer._delta_dtype
        if dt is not None:
            return (base.to(dt) + layer.runner(x.to(dt))).to(base.dtype)
        return base + layer.runner(x).to(base.dtype)

    def __getstate__(self):
        return self.layer

    def __setstate__(self, layer):
        self.layer = layer


class _PeftArrowForward(_PatchedForward):
    """The patched forward of a PEFT Arrow layer: routed while PEFT's Arrow router is the layer's only active adapter,
    and PEFT's own forward otherwise (after ``set_adapter("task_0")``, ``disable_adapter()``, a mixed-batch call), so
    the patched model computes what PEFT computes in every adapter state, and PEFT's training path keeps working.

    ``active`` is the integration's ``router_is_active``: three PEFT properties read per call (their cost is in
    docs/design.md, "What a call costs").
    """

    __slots__ = ("active",)

    def __init__(self, layer: PatchedLayer, active: Callable[[nn.Module], bool]):
        super().__init__(layer)
        self.active = active

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.layer.module
        if kwargs or not self.active(module):
            saved = self.layer._saved_forward
            return saved(x, *args, **kwargs) if saved is not None else type(module).forward(module, x, *args, **kwargs)
        return _PatchedForward.__call__(self, x, *args, **kwargs)

    def __getstate__(self):
        return (self.layer, self.active)

    def __setstate__(self, state):
        self.layer, self.active = state


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _is_peft_arrow_layer(module: nn.Module) -> bool:
    arrow = getattr(module, "lora_arrow", None)
    return _is_peft_lora_layer(module) and arrow is not None and "arrow_router" in arrow


def _inner_layer(module: nn.Module) -> nn.Module:
    """The layer that holds the weight: the module itself, or a PEFT LoRA layer's base layer."""
    return module.base_layer if _is_peft_lora_layer(module) else module


def _is_conv1d(layer: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (transformers.pytorch_utils): y = x W + b with W stored (d_in, d_out)."""
    return type(layer).__name__ == "Conv1D" and isinstance(getattr(layer, "weight", None), torch.Tensor)


def _module_device(module: nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in _inner_layer(module).parameters(recurse=False):
        return p.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    w = getattr(_inner_layer(module), "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return default


def _is_quantised(module: nn.Module) -> bool:
    """A base layer whose weight is stored as integers (bitsandbytes 4-bit / 8-bit)."""
    w = getattr(_inner_layer(module), "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_floating_point()


def _find_targets(model: nn.Module, library: LoraLibrary) -> dict[str, tuple[str, nn.Module]]:
    """Map each library module path to (name, module) of ``model`` (exact path, PEFT's prefix, or a unique suffix)."""
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
            found[path] = (hit, named[hit])
    if not found:
        family = model_family(type(getattr(model, "get_base_model", lambda: model)()).__name__)
        hint = f" ({family} models usually target {TARGETS[family]})" if family in TARGETS else ""
        raise ValueError(
            f"the library's module names match nothing in the model: e.g. {list(library.modules)[:3]}{hint}"
        )
    if missing:
        raise ValueError(f"{len(missing)} library modules are not in the model, e.g. {missing[:3]}")
    return found


def layer_shape(module: nn.Module) -> tuple[int | None, int | None]:
    """(d_in, d_out) of a target layer: nn.Linear-like layers, GPT-2 Conv1D (weight stored (d_in, d_out)), or any
    layer with a 2-D (d_out, d_in) weight; (None, None) when unknown (e.g. some quantised layers)."""
    inner = _inner_layer(module)
    if _is_conv1d(inner):
        d_in, d_out = inner.weight.shape
        return int(d_in), int(d_out)
    d_in, d_out = getattr(inner, "in_features", None), getattr(inner, "out_features", None)
    if d_in is None and isinstance(getattr(inner, "weight", None), torch.Tensor) and inner.weight.dim() == 2:
        d_out, d_in = inner.weight.shape
    return d_in, d_out


def _check_shapes(path: str, module: nn.Module, experts: ModuleExperts) -> None:
    d_in, d_out = layer_shape(module)
    if (d_in, d_out) != (None, None) and (d_in != experts.d_in or d_out != experts.d_out):
        raise ValueError(
            f"module {path!r} is {d_in}→{d_out} but the library's experts are {experts.d_in}→{experts.d_out}: "
            "adapters for another base model?"
        )


class BaseModelWarning(UserWarning):
    """The library's adapters name another base model than the model's own name, though every shape fits: the experts
    may belong to another model of the same shapes. ``strict_base_model=True`` refuses such a model instead."""


def model_name(model: nn.Module) -> str | None:
    """The name or path a Hugging Face model was loaded from (its config's ``_name_or_path``), or None."""
    base = getattr(model, "get_base_model", lambda: model)()
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def check_base_model_name(library: LoraLibrary, name: str | None, strict: bool = False) -> None:
    """Compare the base model the library's adapters name with ``name`` (a model's name or path) where both are known,
    as :func:`genknowsub_fast.library.base_model.model_id` identifies them (a hub id ``org/x``, a cache snapshot of it
    and a folder called ``x`` are one model): a :class:`BaseModelWarning` when they differ, or with ``strict`` a
    ValueError."""
    from .library.base_model import model_id

    lib_name = library.base_model_name
    if not (lib_name and name) or model_id(lib_name).lower() == model_id(name).lower():
        return
    if strict:
        raise ValueError(
            f"the library was built from adapters trained on {lib_name!r}, and the model is {name!r} "
            "(strict_base_model=True refuses another base model name, even with the same shapes)"
        )
    warnings.warn(
        f"the library was built from adapters trained on {lib_name!r}, but the model is {name!r}; every shape fits, so "
        "it is used. If it is another model of the same shapes, the experts do not belong to it "
        "(strict_base_model=True refuses this); if it is the same model under another name, build the library with "
        f"base_model_name={name!r} (command line: --base-model-name) to record that",
        BaseModelWarning,
        stacklevel=4,
    )


def check_fits(
    model: nn.Module,
    library: LoraLibrary,
    strict_base_model: bool = False,
    name: str | None = None,
) -> dict[str, tuple[str, nn.Module]]:
    """ValueError unless ``library`` fits ``model``: the same model family where both say, every library module found
    in the model with the experts' (d_in, d_out); then the base model names compared (:func:`check_base_model_name`;
    the model's name is ``name`` when given, else :func:`model_name`). Returns library module path → (name, module)
    in the model. Works on a model on the meta device (no memory): :func:`check_fits_config` checks a model's config
    that way before the model is loaded."""
    base = getattr(model, "get_base_model", lambda: model)()
    fam_model, fam_lib = model_family(type(base).__name__), model_family(library.base_model_class)
    if fam_model and fam_lib and fam_model != fam_lib and fam_lib in TARGETS and fam_model in TARGETS:
        raise ValueError(f"the library was built for a {library.base_model_class}, not a {type(base).__name__}")
    targets = _find_targets(model, library)
    for path, (_, module) in targets.items():
        _check_shapes(path, module, library.modules[path])
    check_base_model_name(library, name or model_name(model), strict_base_model)
    return targets


def check_fits_config(
    config, library: LoraLibrary, strict_base_model: bool = False, what: str = "the model", name: str | None = None
) -> None:
    """:func:`check_fits` on the model a Hugging Face config describes, built on the meta device from the config alone
    (module names and shapes, no weights, no memory): what ``eval`` and ``make_llm`` check before loading a model.
    ``config`` is a ``transformers.PretrainedConfig`` (its ``_name_or_path`` is the model's name)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an architecture transformers cannot build from its config alone
        raise ValueError(f"cannot build {what} from its config to check the library: {exc}") from exc
    check_fits(model, library, strict_base_model, name)


def _check_room(library: LoraLibrary, targets: dict[str, tuple[str, nn.Module]]) -> None:
    """ValueError (one line, with the sizes) when the experts that patching must pack for the layers' devices and
    dtypes would not fit there; experts already packed where and as a layer runs cost nothing."""
    need: dict[torch.device, int] = {}
    for path, (_, module) in targets.items():
        experts = library.modules[path]
        device = _module_device(module)
        dtype = torch.float32 if _is_quantised(module) else _module_dtype(module, library.dtype)
        if device.type == "meta" or (experts.is_packed and experts.device == device and experts.dtype == dtype):
            continue
        need[device] = need.get(device, 0) + experts.nbytes * dtype.itemsize // experts.dtype.itemsize
    for device, n in need.items():
        lib = f"{str(library.dtype).replace('torch.', '')} on {library.device}"
        check_device_fits(n, device, f"patching packs {human_bytes(n)} of experts (from a library in {lib})")


def patch_model(
    model: nn.Module,
    library: LoraLibrary | str | os.PathLike | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    mixing: str | None = None,
    backend: str = "auto",
    prototypes: str | None = None,
    strict_base_model: bool = False,
) -> nn.Module:
    """Route the model's target layers through the library's experts with Arrow (+ GenKnowSub); returns ``model``.

    Args:
        model: a HF model (Phi-3, Phi-2, GPT-2, or any model whose adapters target linear layers), or a PEFT model made
            by ``peft.create_arrow_model`` (then ``library`` may be None: its adapters and ArrowConfig are used).
        library: the experts, or the path of a library saved with ``LoraLibrary.save``; None only for a PEFT Arrow
            model.
        top_k: experts per token (default: the library's routing default, else min(3, number of experts)).
        temperature: softmax temperature > 0 (default: the library's routing default, else 1.0).
        mixing: ``"output"`` (PEFT's Arrow; the default) or ``"weights"`` (per-token merged A and B, one shared
            scaling).
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.
        prototypes: only with a PEFT Arrow model and ``library=None``: ``"peft"`` (PEFT's own prototypes and
            GenKnowSub state, so the outputs are PEFT's) or ``"exact"`` (exact Arrow prototypes of the same experts);
            None (default) is ``"peft"`` with a warning where PEFT's prototypes are far from exact. See
            :func:`genknowsub_fast.integrations.peft.library_from_peft_model`.
        strict_base_model: refuse (ValueError) a model whose name (``config._name_or_path``) identifies another base
            model than the one the library's adapters name, even when every shape fits; by default that is a
            :class:`BaseModelWarning` and the model is patched. Nothing is compared where either name is unknown.

    A PEFT Arrow model must run its Arrow router when it is patched (``model.set_adapter("arrow_router")``). Once
    patched, a layer whose PEFT adapter state changes (``set_adapter``, ``disable_adapter()``) runs PEFT's own forward.
    The patched model holds a copy of the adapters as they were at patch time: patch again after changing them.

    Patching a PEFT Arrow model reads PEFT's subtracted experts without changing the model's adapter weights: its
    ``save_pretrained`` writes what it wrote before patching (PEFT's GenKnowSub, which subtracts in place, runs on
    PEFT's own next forward, as without patching).

    Every check runs before any module is patched. A model already patched raises ValueError.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _LOCK:
        if is_patched(model):
            raise ValueError("model is already patched; call genknowsub_fast.unpatch_model(model) first")
        peft_integration = None
        if any(_is_peft_arrow_layer(m) for m in model.modules()):
            from .integrations import peft as peft_integration

            peft_integration.check_router_active(model)
        if library is None:
            if peft_integration is None:
                raise ValueError(
                    "library is None, which needs a PEFT Arrow model (from peft.create_arrow_model); "
                    "pass a LoraLibrary for any other model"
                )
            library = peft_integration.library_from_peft_model(model, prototypes)
        elif prototypes is not None:
            raise ValueError(
                "prototypes= chooses the prototypes of a PEFT Arrow model patched without a library; "
                "a LoraLibrary brings its own (see LoraLibrary.from_adapters(prototypes=...))"
            )
        if isinstance(library, (str, os.PathLike)):  # a saved library, as make_llm and the eval command take it
            library = LoraLibrary.load(library)
        if not isinstance(library, LoraLibrary):
            raise ValueError(f"library must be a LoraLibrary or the path of a saved one, got {type(library).__name__}")
        targets = check_fits(model, library, strict_base_model)
        options = library.routing_options(top_k, temperature, mixing)
        _check_room(library, targets)

        layers = []
        for path, (_, module) in targets.items():
            experts = library.modules[path]
            if _is_peft_lora_layer(module) and not getattr(module, "lora_arrow", None):
                raise ValueError(
                    f"module {path!r} is a PEFT LoRA layer with its own active adapters; merge_and_unload() it first"
                )
            runner = RoutedLinear(experts, options, backend, name=path)
            # On a quantised base the experts run in float32, as PEFT (its adapters stay float32) and the original
            # code do, so the delta is not rounded to the model dtype before it is added.
            quantised = _is_quantised(module)
            dtype = torch.float32 if quantised else _module_dtype(module, library.dtype)
            runner.prepare(_module_device(module), dtype)
            inner = _inner_layer(module)
            layer = PatchedLayer(
                path,
                module,
                runner,
                expert_names=tuple(library.expert_names),
                _delta_dtype=torch.float32 if quantised else None,
            )
            if type(inner) is nn.Linear or _is_conv1d(inner):
                layer._linear = inner
                layer._transposed = _is_conv1d(inner)
            layers.append(layer)

        for layer in layers:
            module = layer.module
            layer._hooked = hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
            slot = "_old_forward" if layer._hooked else "forward"
            layer._saved_forward = module.__dict__.get(slot)
            if layer._linear is None:
                inner = _inner_layer(module)
                layer._base_call = inner if inner is not module else module.__dict__.get(slot)
            module.__dict__[_STATE] = layer
            if _is_peft_arrow_layer(module):
                module.__dict__[slot] = _PeftArrowForward(layer, peft_integration.router_is_active)
            else:
                module.__dict__[slot] = _PatchedForward(layer)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: every patched module gets its original forward back, bit for bit; returns model.

    Raises ValueError when the model is not patched.
    """
    with _LOCK:
        layers = [m.__dict__[_STATE] for m in model.modules() if _STATE in m.__dict__]
        if not layers:
            raise ValueError("model is not patched by genknowsub_fast")
        for layer in layers:
            module = layer.module
            slot = "_old_forward" if layer._hooked else "forward"
            if layer._saved_forward is None:
                module.__dict__.pop(slot, None)
            else:
                module.__dict__[slot] = layer._saved_forward
            del module.__dict__[_STATE]
    return model


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` has modules patched by :func:`patch_model`."""
    return any(_STATE in m.__dict__ for m in model.modules())


def patched_layers(model: nn.Module) -> dict[str, PatchedLayer]:
    """Every patched module of ``model``, by its name in ``model.named_modules()``, as a :class:`PatchedLayer`
    (experts, options, runner and the recorder hook). Empty when the model is not patched."""
    return {n: m.__dict__[_STATE] for n, m in model.named_modules() if _STATE in m.__dict__}


@contextlib.contextmanager
def patched(model: nn.Module, library: LoraLibrary | None = None, **kwargs) -> Iterator[nn.Module]:
    """Context manager: ``patch_model(model, library, **kwargs)`` on entry, :func:`unpatch_model` on exit.

    If the block unpatches the model itself, the exit leaves it as it is.
    """
    patch_model(model, library, **kwargs)
    try:
        yield model
    finally:
        with _LOCK:
            if is_patched(model):
                unpatch_model(model)


__all__ = [
    "BaseModelWarning",
    "check_base_model_name",
    "check_fits",
    "check_fits_config",
    "model_name",
    "patch_model",
    "unpatch_model",
    "patched",
    "is_patched",
    "patched_layers",
    "layer_shape",
    "PatchedLayer",
    "TARGETS",
]
