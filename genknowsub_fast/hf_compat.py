"""Differences between the transformers versions this package supports (4.45 and later)."""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``"cache"`` (transformers 5.x, where the old name is
    deprecated and then removed) or ``"past_key_values"`` (earlier versions). A PEFT model is asked through its
    base model: its own forward takes ``**kwargs`` and hands them on."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


__all__ = ["cache_kwarg"]
