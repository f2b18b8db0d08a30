"""``make_llm``: a ``vllm.LLM`` whose model routes every token through a GenKnowSub + Arrow library.

vLLM builds the model in worker processes it spawns, so nothing can be handed to the model object directly: the
routing options go into the HF config with ``hf_overrides`` (together with the routed architecture, see ``options``)
and the plugin's model class reads them in each worker. A LoraLibrary object is saved to a temporary file for the
workers to read; the file lives as long as the returned LLM.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from importlib.metadata import entry_points

from genknowsub_fast.backends.packing import check_mixing
from genknowsub_fast.integrations.vllm.options import CONFIG_KEY, ServedOptions, routed_architecture
from genknowsub_fast.integrations.vllm.plugin import check_library, checked_here
from genknowsub_fast.library import LoraLibrary

PLUGIN_NAME = "genknowsub_fast"
PLUGIN_GROUP = "vllm.general_plugins"


def model_config(model: str | os.PathLike, trust_remote_code: bool = False):
    """A model's HF config (a local folder or a hub id available offline); ValueError when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.fspath(model), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError / ValueError / its own types for a missing config
        raise ValueError(f"cannot read the model config of {os.fspath(model)!r}: {exc}") from exc


def model_architecture(model: str | os.PathLike, trust_remote_code: bool = False, config=None) -> str:
    """The HF architecture named by a model's config (read from ``model`` unless ``config`` is given)."""
    cfg = config if config is not None else model_config(model, trust_remote_code)
    archs = list(getattr(cfg, "architectures", None) or [])
    if len(archs) != 1:
        raise ValueError(f"the config of {os.fspath(model)!r} names architectures {archs}; expected exactly one")
    return archs[0]


def hf_overrides(
    model: str | os.PathLike,
    library_path: str | os.PathLike,
    *,
    top_k: int | None = None,
    temperature: float | None = None,
    mixing: str | None = None,
    backend: str = "auto",
    trust_remote_code: bool = False,
    strict_base_model: bool = False,
) -> dict:
    """The ``hf_overrides`` that make vLLM serve ``model`` routed through the saved library at ``library_path``.

    Also what ``vllm serve MODEL --hf-overrides '<this dict as JSON>'`` takes. ValueError for an unsupported
    architecture, a missing library file or bad routing options. ``strict_base_model``: the server refuses a model
    whose name identifies another base model than the library's adapters name (default: a warning).
    """
    options = ServedOptions(os.fspath(library_path), top_k, temperature, mixing, backend, strict_base_model)
    if not os.path.isfile(options.library):
        raise ValueError(f"library file {options.library!r} does not exist")
    arch = routed_architecture(model_architecture(model, trust_remote_code))
    return {"architectures": [arch], CONFIG_KEY: options.to_dict()}


def check_plugin() -> None:
    """ValueError unless vLLM's worker processes will load this package's plugin (else they could not build the
    routed architecture)."""
    names = [ep.name for ep in entry_points(group=PLUGIN_GROUP)]
    if PLUGIN_NAME not in names:
        raise ValueError(
            f"the {PLUGIN_GROUP} entry point {PLUGIN_NAME!r} is not installed: install genknowsub-fast with pip "
            "(pip install -e . for a checkout) in the environment that runs vLLM"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        raise ValueError(f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME!r}; add it to route with vLLM")


def make_llm(
    model: str | os.PathLike,
    library: str | os.PathLike | LoraLibrary,
    *,
    top_k: int | None = None,
    temperature: float | None = None,
    mixing: str | None = None,
    strict_base_model: bool = False,
    **llm_kwargs,
):
    """A ``vllm.LLM`` serving ``model`` with every target linear layer routed through ``library`` (GenKnowSub +
    Arrow, per token), in vLLM's own layers and under its tensor parallelism.

    Args:
        model: a Phi-3 or Phi-2 checkpoint (local folder or hub id), as for ``vllm.LLM``.
        library: a LoraLibrary, or the path of one saved with ``LoraLibrary.save``.
        top_k: experts per token; temperature: routing softmax temperature (> 0); mixing: ``"output"`` or
            ``"weights"``. Each left as None takes the library's
            :meth:`~genknowsub_fast.LoraLibrary.routing_options` (its own options, else min(3, E), 1.0, "output"),
            as in ``patch_model``.
        strict_base_model: refuse a model whose name (``model``) identifies another base model than the one the
            library's adapters name, even when every shape fits; by default that is a warning (as in
            ``patch_model``).
        **llm_kwargs: passed to ``vllm.LLM`` (``dtype``, ``tensor_parallel_size``, ``max_model_len``, ...). An
            ``hf_overrides`` dict is merged with the routing overrides; it may not set their keys.

    Everything is checked before vLLM starts: ValueError names the problem. The library is checked against the
    model's config (model family, every module path and shape, the base model name) and a library for another model
    is refused in one line naming both, instead of failing inside vLLM's engine start-up.
    """
    if not isinstance(library, (str, os.PathLike, LoraLibrary)):
        raise ValueError(f"library must be a LoraLibrary or the path of a saved one, got {type(library).__name__}")
    user_overrides = llm_kwargs.pop("hf_overrides", None) or {}
    if not isinstance(user_overrides, dict):
        raise ValueError("make_llm merges hf_overrides with its own: pass a dict, not a callable")
    clash = sorted({"architectures", CONFIG_KEY} & set(user_overrides))
    if clash:
        raise ValueError(f"hf_overrides may not set {clash}: make_llm sets them")
    check_plugin()

    lib = library if isinstance(library, LoraLibrary) else LoraLibrary.load(library)
    routing = lib.routing_options(top_k, temperature, mixing)
    for experts in lib.modules.values():
        check_mixing(routing.mixing, experts.scaling, experts.ranks)
    trust_remote_code = bool(llm_kwargs.get("trust_remote_code", False))
    config = model_config(model, trust_remote_code)
    routed_architecture(model_architecture(model, config=config))  # a supported one, before the library is compared
    name = "the LoraLibrary given" if isinstance(library, LoraLibrary) else os.fspath(library)
    check_library(lib, config, model, name, strict_base_model)
    tmpdir = None
    if isinstance(library, LoraLibrary):
        tmpdir = tempfile.mkdtemp(prefix="genknowsub_fast_vllm_")
        path = os.path.join(tmpdir, "library.safetensors")
        library.save(path)
    else:
        path = os.path.abspath(os.fspath(library))
    try:
        overrides = hf_overrides(
            model,
            path,
            top_k=routing.top_k,
            temperature=routing.temperature,
            mixing=routing.mixing,
            trust_remote_code=trust_remote_code,
            strict_base_model=strict_base_model,
        )
        from vllm import LLM

        with checked_here(path, model):  # the plugin's own check (for servers) need not run again in this process
            llm = LLM(os.fspath(model), hf_overrides={**user_overrides, **overrides}, **llm_kwargs)
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    if tmpdir is not None:
        weakref.finalize(llm, shutil.rmtree, tmpdir, ignore_errors=True)
    return llm


__all__ = ["check_library", "check_plugin", "hf_overrides", "make_llm", "model_architecture", "model_config"]
