"""The routing options a served model carries in its HF config, and the architectures that read them (no vLLM import).

vLLM hands the model's HF config to every worker process, so the options travel there as one dict under
:data:`CONFIG_KEY`, set with ``hf_overrides`` (``LLM(..., hf_overrides=...)`` or ``vllm serve --hf-overrides``). The
same overrides swap the architecture for a routed one (:data:`ROUTED_ARCHITECTURES`): without the plugin installed,
vLLM then refuses the unknown architecture instead of quietly serving the base model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from genknowsub_fast.options import check_values

CONFIG_KEY = "genknowsub_fast"

# HF architecture -> the routed architecture registered by the plugin (genknowsub_fast.integrations.vllm.models).
ROUTED_ARCHITECTURES = {
    "Phi3ForCausalLM": "GenKnowSubPhi3ForCausalLM",
    "PhiForCausalLM": "GenKnowSubPhiForCausalLM",
}
BACKENDS = ("auto", "torch", "triton")
_KEYS = ("library", "top_k", "temperature", "mixing", "backend", "strict_base_model")


@dataclass(frozen=True)
class ServedOptions:
    """What a routed model needs besides its weights, as it travels in the HF config to vLLM's workers.

    ``library``: path of a saved LoraLibrary (``LoraLibrary.save``), readable by every worker. ``top_k`` /
    ``temperature`` / ``mixing``: None takes the library's routing defaults when a worker loads it
    (:meth:`~genknowsub_fast.LoraLibrary.routing_options`), as ``patch_model`` does; given values are checked here by
    the package's one routing check (:func:`genknowsub_fast.options.check_values`). ``backend``: as in ``patch_model``.
    ``strict_base_model``: refuse a model whose name identifies another base model than the library's adapters name
    (default False: a warning), as in ``patch_model``.
    """

    library: str
    top_k: int | None = None
    temperature: float | None = None
    mixing: str | None = None
    backend: str = "auto"
    strict_base_model: bool = False

    def __post_init__(self):
        if not isinstance(self.library, (str, os.PathLike)) or not os.fspath(self.library):
            raise ValueError(f"{CONFIG_KEY}.library must be the path of a saved LoraLibrary, got {self.library!r}")
        check_values(self.top_k, self.temperature, self.mixing, prefix=f"{CONFIG_KEY}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"{CONFIG_KEY}.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.strict_base_model, bool):
            raise ValueError(f"{CONFIG_KEY}.strict_base_model must be true or false, got {self.strict_base_model!r}")

    @classmethod
    def from_dict(cls, raw: object) -> ServedOptions:
        """Options from the dict under :data:`CONFIG_KEY`; ValueError names an unknown key or a bad value."""
        if not isinstance(raw, dict):
            raise ValueError(f"the {CONFIG_KEY!r} entry of the model config must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} option(s) {unknown}; expected some of {list(_KEYS)}")
        if "library" not in raw:
            raise ValueError(f"the {CONFIG_KEY!r} entry of the model config needs a 'library' path")
        return cls(**raw)

    @classmethod
    def from_config(cls, hf_config: object) -> ServedOptions:
        """Options from a model's HF config; ValueError when it has none (a routed architecture needs them)."""
        raw = getattr(hf_config, CONFIG_KEY, None)
        if raw is None:
            raise ValueError(
                f"this routed architecture needs routing options: pass hf_overrides={{'{CONFIG_KEY}': "
                "{'library': PATH, 'top_k': K, ...}} (genknowsub_fast.vllm.hf_overrides builds them)"
            )
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The JSON-able dict stored under :data:`CONFIG_KEY` (unset options, and strict_base_model when false, left
        out)."""
        d = asdict(self)
        d["library"] = os.fspath(self.library)
        return {k: v for k, v in d.items() if v is not None and not (k == "strict_base_model" and not v)}


def routed_architecture(architecture: str) -> str:
    """The routed architecture for an HF one; ValueError for an architecture the integration does not support."""
    if architecture in ROUTED_ARCHITECTURES.values():
        return architecture
    if architecture not in ROUTED_ARCHITECTURES:
        raise ValueError(
            f"serving GenKnowSub + Arrow with vLLM supports {sorted(ROUTED_ARCHITECTURES)}, not {architecture!r}"
        )
    return ROUTED_ARCHITECTURES[architecture]


__all__ = ["CONFIG_KEY", "ROUTED_ARCHITECTURES", "ServedOptions", "routed_architecture"]
