"""PEFT Arrow models (``peft.create_arrow_model``): read their adapters and ArrowConfig into a LoraLibrary.

Nothing here imports ``peft``: a PEFT Arrow layer is recognised by its attributes (``lora_arrow["arrow_router"]``,
``lora_A`` / ``lora_B`` / ``scaling`` dicts), so this module works with any PEFT version that has those.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..library import LoraLibrary


def arrow_router(module: nn.Module):
    """The PEFT Arrow router of a LoRA layer, or None when the module is not a PEFT Arrow layer."""
    arrow_dict = getattr(module, "lora_arrow", None)
    if not arrow_dict or "arrow_router" not in arrow_dict:
        return None
    return arrow_dict["arrow_router"]


def is_peft_arrow_model(model: nn.Module) -> bool:
    """True when ``model`` has PEFT Arrow layers."""
    return any(arrow_router(m) is not None for m in model.modules())


def library_from_peft_model(model: nn.Module, prototypes: str = "exact") -> LoraLibrary:
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
        router = arrow_router(module)
        if router is None:
            continue
        arrow = router
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
    lib = LoraLibrary.from_loaded(
        [tasks[n] for n in arrow.task_adapter_names],
        [general[n] for n in (arrow.gks_adapter_names or [])] if gks else [],
        gks,
        prototypes,
        rng_seed=arrow.rng_seed,
        routing={"top_k": int(arrow.top_k), "temperature": float(arrow.temperature)},
        already_subtracted=done,
    )
    lib.base_model_class = lib.base_model_class or type(base).__name__
    return lib


__all__ = ["arrow_router", "is_peft_arrow_model", "library_from_peft_model"]
