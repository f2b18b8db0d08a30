"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

It registers the routed architectures by name (their modules are imported lazily, when a model uses one), so it costs
nothing for models that do not ask for routing and may run any number of times. It also registers a check of the
library against the model's config for those architectures, which vLLM runs when it reads the model's configuration
(in the server's own process, before the engine starts): a library for another model is refused there in one line
naming both, instead of failing inside the engine's start-up with the cause among its log lines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from genknowsub_fast.integrations.vllm.options import ROUTED_ARCHITECTURES

if TYPE_CHECKING:
    from genknowsub_fast.library import LoraLibrary

_MODULE = "genknowsub_fast.integrations.vllm.models"
# (library path, model) pairs make_llm has checked in this process, so vLLM's configuration step does not check again.
_CHECKED: set[tuple[str, str]] = set()


def register() -> None:
    """Register every routed architecture with vLLM's model registry, and the library check (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch in ROUTED_ARCHITECTURES.values():
        if arch not in known:
            ModelRegistry.register_model(arch, f"{_MODULE}:{arch}")
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # a vLLM without per-architecture config checks: the workers' own checks still run
        return
    for arch in ROUTED_ARCHITECTURES.values():
        MODELS_CONFIG_MAP.setdefault(arch, LibraryCheck)


class LibraryCheck:
    """vLLM's per-architecture configuration hook (``MODELS_CONFIG_MAP``) for the routed architectures: the library
    named in the model's config is checked against that config before anything is built."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        try:
            check_served_model(model_config.hf_config, model_config.model)
        except ValueError as exc:
            # vLLM reports this error inside its validation error's traceback; the one line goes to its log as well.
            from vllm.logger import init_logger

            init_logger("vllm.genknowsub_fast").error("genknowsub_fast: %s", exc)
            raise

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        return


def check_served_model(hf_config, model: str) -> None:
    """ValueError in one line unless the library named by ``hf_config``'s routing options fits the model it describes
    (see :func:`check_library`)."""
    from genknowsub_fast.integrations.vllm.options import ServedOptions
    from genknowsub_fast.library import LoraLibrary

    options = ServedOptions.from_config(hf_config)
    if (os.fspath(options.library), os.fspath(model)) in _CHECKED:
        return
    library = LoraLibrary.load(options.library)
    check_library(library, hf_config, model, os.fspath(options.library), options.strict_base_model)


def check_library(
    library: LoraLibrary,
    config,
    model: str | os.PathLike,
    library_name: str,
    strict_base_model: bool = False,
) -> None:
    """ValueError in one line naming both, unless ``library`` fits the model ``config`` describes: model family, every
    library module present with the experts' shapes (on a meta-device model built from the config, as
    :func:`genknowsub_fast.patching.check_fits_config`); the base model names compared where both are known (a
    :class:`~genknowsub_fast.patching.BaseModelWarning`, or with ``strict_base_model`` a ValueError). What
    ``make_llm`` and the server (:class:`LibraryCheck`) check before vLLM's engine starts."""
    from genknowsub_fast.patching import check_fits_config

    what = f"model {os.fspath(model)!r}"
    try:
        check_fits_config(config, library, strict_base_model, what=what, name=os.fspath(model))
    except ValueError as exc:
        raise ValueError(f"library {library_name!r} does not fit {what}: {exc}") from None


@contextlib.contextmanager
def checked_here(library: str | os.PathLike, model: str | os.PathLike) -> Iterator[None]:
    """While the block runs, :func:`check_served_model` skips this library and model (make_llm checked them)."""
    key = (os.fspath(library), os.fspath(model))
    _CHECKED.add(key)
    try:
        yield
    finally:
        _CHECKED.discard(key)


__all__ = ["LibraryCheck", "check_library", "check_served_model", "checked_here", "register"]
