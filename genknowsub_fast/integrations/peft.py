"""PEFT Arrow models (``peft.create_arrow_model``): read their adapters, GenKnowSub state and prototypes into a
LoraLibrary, so that a patched PEFT model computes what PEFT computes.

PEFT's Arrow router does its work lazily, per layer, on that layer's first forward with the router active: it subtracts
the mean of the general adapters from the task adapters in place (GenKnowSub; for experts loaded after that forward,
only from them, the "pending" subtraction), then computes each expert's prototype with 15 steps of power iteration
from a random start (a fresh generator seeded with ``rng_seed`` per expert, or the global generator when the seed is
None) and keeps them in a non-persistent ``prototypes`` buffer. :func:`library_from_peft_model` runs exactly those two
steps of PEFT's own router (``gen_know_sub``, then ``build_prototypes``), in ``named_modules()`` order, which is what
PEFT's next forward would do; layers that already ran keep what they have. So:

- ``prototypes="peft"`` (the default) takes PEFT's prototypes (upcast to float32, exactly) and PEFT's subtracted
  factors: the patched model gives PEFT's outputs. PEFT's 15 steps do not converge when an expert's top two singular
  values are close; a warning then says how far PEFT's prototypes are from exact ones.
- ``prototypes="exact"`` takes the same subtracted factors with exact prototypes: Arrow as defined, which differs from
  PEFT's output where PEFT's power iteration has not converged.

Nothing here imports ``peft``: a PEFT Arrow layer is recognised by its attributes (``lora_arrow["arrow_router"]``,
``lora_A`` / ``lora_B`` / ``scaling`` dicts). Attributes this module needs and does not find raise a ValueError that
names the installed PEFT version.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..library import LoraLibrary
from ..library.adapters import LoraAdapter

ROUTER = "arrow_router"
PEFT_PROTOTYPES = ("peft", "exact")
# PEFT's prototypes count as converged when every one has |cos| >= this with the exact prototype.
CONVERGED_MIN_COS = 0.99
_ROUTER_ATTRS = (
    "task_adapter_names",
    "gks_adapter_names",
    "use_gks",
    "top_k",
    "temperature",
    "rng_seed",
    "_protos_ready",
    "gen_know_sub",
    "build_prototypes",
)


def arrow_router(module: nn.Module):
    """The PEFT Arrow router of a LoRA layer, or None when the module is not a PEFT Arrow layer."""
    arrow_dict = getattr(module, "lora_arrow", None)
    if not arrow_dict or ROUTER not in arrow_dict:
        return None
    return arrow_dict[ROUTER]


def is_peft_arrow_model(model: nn.Module) -> bool:
    """True when ``model`` has PEFT Arrow layers."""
    return any(arrow_router(m) is not None for m in model.modules())


def arrow_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every PEFT Arrow layer of ``model`` as (name, module), in ``named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if arrow_router(m) is not None]


def peft_version() -> str:
    """The installed PEFT version, for messages."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return "not installed"


def _check_router(name: str, router) -> None:
    missing = [a for a in _ROUTER_ATTRS if not hasattr(router, a)]
    if missing:
        raise ValueError(
            f"PEFT Arrow layer {name!r} has no {missing}: PEFT {peft_version()} keeps its Arrow router state "
            "differently from the PEFT versions this package reads (0.17 to 0.21)"
        )


def router_is_active(module: nn.Module) -> bool:
    """True when a PEFT Arrow layer runs its Arrow router and nothing else: the router is the only active adapter,
    adapters are enabled and nothing is merged (PEFT then computes base + Arrow delta)."""
    return module.active_adapters == [ROUTER] and not module.disable_adapters and not module.merged


def check_router_active(model: nn.Module) -> None:
    """ValueError unless every PEFT Arrow layer of ``model`` runs its Arrow router alone (see
    :func:`router_is_active`).

    In any other state PEFT runs plain LoRA (or the base layer) with no routing, so there is nothing to accelerate, and
    its result there depends on history (whether GenKnowSub was already applied in place).
    """
    for name, module in arrow_layers(model):
        if not router_is_active(module):
            state = (
                "adapters are disabled"
                if module.disable_adapters
                else "adapters are merged"
                if module.merged
                else f"the active adapters are {module.active_adapters}"
            )
            raise ValueError(
                f"PEFT Arrow layer {name!r} does not run its Arrow router ({state}): patching replaces the router. "
                f'Call model.set_adapter("{ROUTER}") (and leave disable_adapter() / merging) before patching.'
            )


def materialise(model: nn.Module, build_prototypes: bool = True) -> None:
    """Run PEFT's own lazy steps on every Arrow layer now, in ``named_modules()`` order: GenKnowSub (including the
    pending subtraction of experts loaded after a forward) and, with ``build_prototypes``, the prototypes.

    This is what PEFT's next forward with the router active does, and it changes the model the same way. With
    ``rng_seed=None`` PEFT draws the start vectors from the global generator; drawing them here, in module order, gives
    what PEFT's own first forward would draw when the layers run in that order and nothing else draws in between.
    """
    for name, module in arrow_layers(model):
        router = arrow_router(module)
        _check_router(name, router)
        router.gen_know_sub(module.lora_A, module.lora_B)
        if build_prototypes:
            router.build_prototypes(module.lora_A, module.lora_B)


def _inactive_lora_modules(model: nn.Module, names: set[str]) -> list[str]:
    """PEFT LoRA layers without an Arrow router (embeddings, convolutions) that hold LoRA of the task adapters."""
    out = []
    for n, m in model.named_modules():
        if arrow_router(m) is not None or not hasattr(m, "base_layer"):
            continue
        held = set(getattr(m, "lora_A", {}) or {}) | set(getattr(m, "lora_embedding_A", {}) or {})
        if held & names:
            out.append(f"{n.removeprefix('base_model.model.')} ({type(m.base_layer).__name__})")
    return out


def _compare_prototypes(lib: LoraLibrary, peft_protos: dict[str, torch.Tensor]) -> tuple[float, int, int, str]:
    """min |cos| of PEFT's prototypes against the exact ones over (module, expert) pairs with a non-zero ΔW, how many
    pairs are below :data:`CONVERGED_MIN_COS`, how many were compared, and the worst pair."""
    worst, below, total, where = 1.0, 0, 0, ""
    for path, m in lib.modules.items():
        exact = m.prototypes.to(torch.float64)
        peft = peft_protos[path].to(torch.float64)
        norms = exact.norm(dim=1) * peft.norm(dim=1)
        ok = norms > 0
        cos = torch.where(ok, (exact * peft).sum(1).abs() / norms.clamp_min(1e-300), torch.ones_like(norms))
        total += int(ok.sum())
        below += int((cos[ok] < CONVERGED_MIN_COS).sum())
        c, e = cos.min(0)
        if float(c) < worst:
            worst, where = float(c), f"{path}, expert {lib.expert_names[int(e)]!r}"
    return worst, below, total, where


def library_from_peft_model(model: nn.Module, prototypes: str = "peft") -> LoraLibrary:
    """Build a library from a model made by ``peft.create_arrow_model`` (task / gks adapters + ArrowConfig).

    Args:
        model: the PEFT Arrow model.
        prototypes: ``"peft"`` (default): PEFT's own prototypes, so that a model patched with the library gives PEFT's
            outputs; ``"exact"``: exact prototypes of the same experts (Arrow as defined).

    PEFT's lazy GenKnowSub (and, for ``"peft"``, its prototype step) runs first on layers that have not run it yet,
    exactly as PEFT's next forward would (see :func:`materialise`); the library then holds the subtracted factors and
    records the general adapters' names. The ArrowConfig's ``top_k`` and ``router_temperature`` become the library's
    default routing. Warns once when PEFT's prototypes are far from exact (min |cos| < 0.99), and once when embedding
    or convolution LoRA of the task adapters is present (PEFT's router ignores it, and so does the library).
    """
    if prototypes not in PEFT_PROTOTYPES:
        raise ValueError(f"prototypes must be one of {PEFT_PROTOTYPES} for a PEFT Arrow model, got {prototypes!r}")
    layers = arrow_layers(model)
    if not layers:
        raise ValueError("model has no PEFT Arrow layers (expected a model made by peft.create_arrow_model)")
    materialise(model, build_prototypes=prototypes == "peft")

    first_name, first = layers[0]
    router0 = arrow_router(first)
    task_names = list(router0.task_adapter_names)
    gks_names = list(router0.gks_adapter_names or []) if router0.use_gks else []
    tasks = {n: LoraAdapter(name=n) for n in task_names}
    general = {n: LoraAdapter(name=n) for n in gks_names}
    peft_protos: dict[str, torch.Tensor] = {}
    for name, module in layers:
        router = arrow_router(module)
        if list(router.task_adapter_names) != task_names:
            raise ValueError(
                f"PEFT Arrow layers disagree on their experts: {first_name!r} has {task_names}, {name!r} has "
                f"{list(router.task_adapter_names)}; a library needs the same experts in every layer"
            )
        path = name.removeprefix("base_model.model.")
        for group in (tasks, general):
            for n, ad in group.items():
                if n not in module.lora_A or n not in module.lora_B:
                    raise ValueError(f"PEFT Arrow layer {name!r} has no adapter {n!r}")
                ad.a[path] = module.lora_A[n].weight.detach()
                ad.b[path] = module.lora_B[n].weight.detach()
                ad.scaling[path] = float(module.scaling[n])
                if not torch.isfinite(ad.a[path]).all() or not torch.isfinite(ad.b[path]).all():
                    raise ValueError(f"adapter {n!r}, module {path!r}: weights contain NaN or Inf")
        if prototypes == "peft":
            p = getattr(router, "prototypes", None)
            d_in = module.lora_A[task_names[0]].weight.shape[1]
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != (len(task_names), d_in):
                raise ValueError(
                    f"PEFT Arrow layer {name!r}: no prototypes buffer of shape (experts, d_in) after its prototype "
                    f"step (PEFT {peft_version()})"
                )
            peft_protos[path] = p.detach().to(device="cpu", dtype=torch.float32)

    inactive = _inactive_lora_modules(model, set(task_names))
    if inactive:
        warnings.warn(
            f"{len(inactive)} module(s) hold LoRA of the task adapters that PEFT's Arrow router does not route "
            f"({', '.join(inactive[:4])}{', ...' if len(inactive) > 4 else ''}): that LoRA is inactive under the "
            "router in PEFT, and the library leaves it out as well",
            stacklevel=3,
        )
    lib = LoraLibrary.from_loaded(
        [tasks[n] for n in task_names],
        [general[n] for n in gks_names],
        "param" if gks_names else None,
        "exact",
        routing={"top_k": int(router0.top_k), "temperature": float(router0.temperature)},
        already_subtracted={n.removeprefix("base_model.model.") for n, _ in layers},
    )
    if prototypes == "peft":
        worst, below, total, where = _compare_prototypes(lib, peft_protos)
        for path, m in lib.modules.items():
            m.prototypes = peft_protos[path].to(m.a.dtype)
        lib.prototype_method = "peft"
        if below:
            warnings.warn(
                f"PEFT's Arrow prototypes (15 steps of power iteration) are far from the exact ones: min |cos| "
                f"{worst:.4f} ({where}); {below} of {total} (module, expert) pairs are below {CONVERGED_MIN_COS}. "
                'The patched model reproduces PEFT\'s outputs; for exact Arrow use prototypes="exact" '
                '(patch_model(model, prototypes="exact") or LoraLibrary.from_peft_model(model, prototypes="exact")).',
                stacklevel=3,
            )
    base = getattr(model, "get_base_model", lambda: model)()
    lib.base_model_class = lib.base_model_class or type(base).__name__
    return lib


__all__ = [
    "arrow_router",
    "arrow_layers",
    "is_peft_arrow_model",
    "router_is_active",
    "check_router_active",
    "materialise",
    "library_from_peft_model",
    "peft_version",
    "PEFT_PROTOTYPES",
    "CONVERGED_MIN_COS",
]
