"""genknowsub_fast: GenKnowSub + Arrow routed-LoRA inference at base-model speed.

    import genknowsub_fast as gkf
    lib = gkf.LoraLibrary.from_adapters(task_dirs, general_adapters=general_dirs, gks="param")
    gkf.patch_model(model, lib, top_k=3)

Importing the package is cheap: each public name loads its module on first use (PEP 562), so building a library does
not import patching, analytics, Triton or the compiled extension.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name → module that defines it (relative to this package)
_EXPORTS = {
    "LoraLibrary": "library",
    "ModuleExperts": "experts",
    "RoutingOptions": "options",
    "arrow_prototypes": "ops",
    "arrow_route": "ops",
    "routed_lora": "ops",
    "prepare": "ops",
    "RoutedLinear": "runner",
    "patch_model": "patching",
    "unpatch_model": "patching",
    "patched": "patching",
    "is_patched": "patching",
    "patched_layers": "patching",
    "PatchedLayer": "patching",
    "library_stats": "analytics",
    "compare_gks": "analytics",
    "record_routing": "analytics",
}
# public submodule name → its module (relative to this package)
_SUBMODULES = {
    "ops": "ops",
    "options": "options",
    "reference": "reference",
    "gks": "library.gks",
    "library": "library",
    "analytics": "analytics",
    "evaluate": "evaluate",
    "integrations": "integrations",
    "synthetic": "synthetic",
    "testing": "testing",
}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
