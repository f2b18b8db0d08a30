"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

It only registers the routed architectures by name (their modules are imported lazily, when a model uses one), so it
costs nothing for models that do not ask for routing and may run any number of times.
"""

from __future__ import annotations

from genknowsub_fast.integrations.vllm.options import ROUTED_ARCHITECTURES

_MODULE = "genknowsub_fast.integrations.vllm.models"


def register() -> None:
    """Register every routed architecture with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch in ROUTED_ARCHITECTURES.values():
        if arch not in known:
            ModelRegistry.register_model(arch, f"{_MODULE}:{arch}")


__all__ = ["register"]
