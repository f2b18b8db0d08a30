"""Which base model a set of adapters (or a library) belongs to, from the names Hugging Face and PEFT record.

Two forms are compared: the model family of a class name (``Phi3ForCausalLM`` and ``Phi3Model`` are both ``phi3``),
and the model a ``base_model_name_or_path`` identifies (a hub id ``org/name``, a Hugging Face cache snapshot
``.../models--org--name/snapshots/<rev>`` and a local folder called ``name`` all identify ``name``).
"""

from __future__ import annotations

import os
import re

_CLASS_SUFFIX = re.compile(r"(For[A-Za-z]+|LMHeadModel|Model)$")
_HF_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


def model_family(class_name: str | None) -> str | None:
    """``"Phi3ForCausalLM"`` → ``"phi3"``: the part of a HF class name shared by its heads and its bare model."""
    if not class_name:
        return None
    return _CLASS_SUFFIX.sub("", class_name).lower() or None


def model_id(name: str) -> str:
    """What a base model name identifies: the last path part, with a Hugging Face cache snapshot path
    (``.../models--org--name/snapshots/<rev>``) mapped to ``name`` like the hub id ``org/name``."""
    m = _HF_SNAPSHOT.search(name)
    if m:
        return m["name"]
    return os.path.basename(os.path.normpath(name))


__all__ = ["model_family", "model_id"]
