"""RoutingOptions: how a layer routes (top_k, temperature, mixing), decided and validated once per user call.

Every entry point (``patch_model``, ``ops.prepare``, ``make_llm``, the ``eval`` and ``inspect`` commands, the lm-eval
model) calls :func:`resolve_routing` exactly once with what the user gave, and passes the resulting value down
unchanged: the runner, the backends and the vLLM layers take a :class:`RoutingOptions` and never re-derive a default.

This module imports nothing heavy (no torch): the command line resolves options before it loads a model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

MIXING_MODES = ("output", "weights")
# Arrow's default number of experts per token (PEFT's ArrowConfig.top_k), capped at the number of experts.
DEFAULT_TOP_K = 3
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MIXING = "output"


def check_values(
    top_k: object = None, temperature: object = None, mixing: object = None, prefix: str = ""
) -> tuple[int | None, float | None, str | None]:
    """The given values checked and normalised (``int``, ``float``, ``str``); None stays None.

    The one copy of the routing checks: :class:`RoutingOptions` and configurations that keep some options unset until
    a library is known (the vLLM integration's served-model options) both call it. ``prefix`` starts each message
    (e.g. the config key the values came from).
    """
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or int(top_k) < 1:
            raise ValueError(f"{prefix}top_k must be an integer >= 1, got {top_k!r}")
        top_k = int(top_k)
    if temperature is not None:
        ok = not isinstance(temperature, bool) and isinstance(temperature, numbers.Real)
        if not (ok and math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"{prefix}temperature must be a finite number > 0, got {temperature!r}")
        temperature = float(temperature)
    if mixing is not None and mixing not in MIXING_MODES:
        raise ValueError(f"{prefix}mixing must be one of {MIXING_MODES}, got {mixing!r}")
    return top_k, temperature, mixing


@dataclass(frozen=True)
class RoutingOptions:
    """Validated Arrow routing options.

    Attributes:
        top_k: experts per token, an integer >= 1 (a layer with fewer experts refuses it, see :meth:`check_experts`).
        temperature: softmax temperature, a finite number > 0.
        mixing: ``"output"`` (PEFT's Arrow: weighted sum of the selected experts' outputs) or ``"weights"`` (the
            original code's per-token merged A and B; every expert must share one rank and scaling).

    Construction checks every field (ValueError naming the field); numpy integers and floats are accepted and stored
    as ``int`` / ``float``. Build one with :func:`resolve_routing` to get the package's defaults.
    """

    top_k: int
    temperature: float = DEFAULT_TEMPERATURE
    mixing: str = DEFAULT_MIXING

    def __post_init__(self) -> None:
        for name in ("top_k", "temperature", "mixing"):
            if getattr(self, name) is None:  # check_values leaves None alone; options are complete
                raise ValueError(f"{name} must be given, got None (resolve_routing fills in the defaults)")
        top_k, temperature, _ = check_values(self.top_k, self.temperature, self.mixing)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "temperature", temperature)

    def check_experts(self, num_experts: int) -> RoutingOptions:
        """self, or ValueError when ``top_k`` exceeds ``num_experts`` (the experts of one layer or library)."""
        if self.top_k > num_experts:
            raise ValueError(
                f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {self.top_k}"
            )
        return self

    def as_dict(self) -> dict:
        """``{"top_k": ..., "temperature": ..., "mixing": ...}`` (for JSON outputs and messages)."""
        return {"top_k": self.top_k, "temperature": self.temperature, "mixing": self.mixing}


def resolve_routing(
    num_experts: int,
    top_k: object = None,
    temperature: object = None,
    mixing: object = None,
    defaults: Mapping | None = None,
) -> RoutingOptions:
    """The one place where routing defaults are decided; returns validated options for ``num_experts`` experts.

    Each argument left as None takes, in order: the value in ``defaults`` (a library's own routing options, carried
    from a PEFT Arrow model's ArrowConfig), then the package default: ``top_k = min(3, num_experts)``,
    ``temperature = 1.0``, ``mixing = "output"``. ValueError for a value out of range, naming it.
    """
    defaults = defaults or {}
    if top_k is None:
        top_k = defaults.get("top_k", min(DEFAULT_TOP_K, num_experts))
    if temperature is None:
        temperature = defaults.get("temperature", DEFAULT_TEMPERATURE)
    if mixing is None:
        mixing = defaults.get("mixing", DEFAULT_MIXING)
    return RoutingOptions(top_k, temperature, mixing).check_experts(num_experts)


__all__ = ["RoutingOptions", "resolve_routing", "check_values", "MIXING_MODES", "DEFAULT_TOP_K"]
