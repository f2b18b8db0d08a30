"""The routing options a served model carries in its HF config, and the architectures that read them (no vLLM import).

vLLM hands the model's HF config to every worker process, so the options travel there as one dict under
:data:`CONFIG_KEY`, set with ``hf_overrides`` (``LLM(..., hf_overrides=...)`` or ``vllm serve --hf-overrides``). The
same overrides swap the architecture for a routed one (:data:`ROUTED_ARCHITECTURES`): without the plugin installed,
vLLM then refuses the unknown architecture instead of quietly serving the base model.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from genknowsub_fast.backends.packing import MIXING_MODES

CONFIG_KEY = "genknowsub_fast"

# HF architecture -> the routed architecture registered by the plugin (genknowsub_fast.integrations.vllm.models).
ROUTED_ARCHITECTURES = {
    "Phi3ForCausalLM": "GenKnowSubPhi3ForCausalLM",
    "PhiForCausalLM": "GenKnowSubPhiForCausalLM",
}
BACKENDS = ("auto", "torch", "triton")
_KEYS = ("library", "top_k", "temperature", "mixing", "backend")


@dataclass(frozen=True)
class RoutingOptions:
    """What a routed model needs besides its weights.

    ``library``: path of a saved LoraLibrary (``LoraLibrary.save``), readable by every worker. ``top_k`` /
    ``temperature``: None takes the library's routing defaults (else min(3, E) and 1.0), as ``patch_model`` does.
    """

    library: str
    top_k: int | None = None
    temperature: float | None = None
    mixing: str = "output"
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.library, (str, os.PathLike)) or not os.fspath(self.library):
            raise ValueError(f"{CONFIG_KEY}.library must be the path of a saved LoraLibrary, got {self.library!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)):
            raise ValueError(f"{CONFIG_KEY}.top_k must be an integer, got {self.top_k!r}")
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float))
            and not isinstance(self.temperature, bool)
            and math.isfinite(self.temperature)
            and self.temperature > 0
        ):
            raise ValueError(f"{CONFIG_KEY}.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"{CONFIG_KEY}.mixing must be one of {MIXING_MODES}, got {self.mixing!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{CONFIG_KEY}.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, raw: object) -> RoutingOptions:
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
    def from_config(cls, hf_config: object) -> RoutingOptions:
        """Options from a model's HF config; ValueError when it has none (a routed architecture needs them)."""
        raw = getattr(hf_config, CONFIG_KEY, None)
        if raw is None:
            raise ValueError(
                f"this routed architecture needs routing options: pass hf_overrides={{'{CONFIG_KEY}': "
                "{'library': PATH, 'top_k': K, ...}} (genknowsub_fast.vllm.hf_overrides builds them)"
            )
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The JSON-able dict stored under :data:`CONFIG_KEY` (unset options left out)."""
        d = asdict(self)
        d["library"] = os.fspath(self.library)
        return {k: v for k, v in d.items() if v is not None}


def routed_architecture(architecture: str) -> str:
    """The routed architecture for an HF one; ValueError for an architecture the integration does not support."""
    if architecture in ROUTED_ARCHITECTURES.values():
        return architecture
    if architecture not in ROUTED_ARCHITECTURES:
        raise ValueError(
            f"serving GenKnowSub + Arrow with vLLM supports {sorted(ROUTED_ARCHITECTURES)}, not {architecture!r}"
        )
    return ROUTED_ARCHITECTURES[architecture]


__all__ = ["CONFIG_KEY", "ROUTED_ARCHITECTURES", "RoutingOptions", "routed_architecture"]
