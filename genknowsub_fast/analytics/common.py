"""Small helpers shared by the analytics modules: module paths and JSON-safe numbers."""

from __future__ import annotations

import math
import re

_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(path: str) -> int | None:
    """``model.layers.7.mlp.down_proj`` → 7 (the first dotted integer in the path), or None."""
    m = _LAYER.search(f".{path}.")
    return int(m.group(1)) if m else None


def module_kind(path: str) -> str:
    """``model.layers.7.mlp.down_proj`` → ``down_proj``."""
    return path.rsplit(".", 1)[-1]


def json_float(v: float) -> float | None:
    """``v`` as a float, or None for NaN and Inf (JSON has neither)."""
    return None if math.isnan(v) or math.isinf(v) else float(v)
