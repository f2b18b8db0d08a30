"""Differences between the transformers versions this package supports (4.45 and later), and one PEFT import the
package keeps quiet."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator

import torch

# PEFT's LoRA dispatch asks these (peft.tuners.lora.model) whether to import bitsandbytes for its quantised layers.
_PEFT_BNB_CHECKS = ("is_bnb_available", "is_bnb_4bit_available")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``"cache"`` (transformers 5.x, where the old name is
    deprecated and then removed) or ``"past_key_values"`` (earlier versions). A PEFT model is asked through its
    base model: its own forward takes ``**kwargs`` and hands them on."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def peft_without_bitsandbytes() -> Iterator[None]:
    """While the package adds PEFT LoRA layers to a model of its own (synthetic adapters, the demo's PEFT Arrow model),
    keep PEFT from importing bitsandbytes when nothing has imported it yet.

    PEFT imports bitsandbytes whenever it is installed, to recognise quantised layers (in its LoRA dispatch and in
    ``create_arrow_model``'s layer check); importing bitsandbytes on a CPU with AVX512-BF16 and no kernel hub access
    logs "Failed to load CPU gemm_4bit_forward from kernels-community ...", which concerns 4-bit models only. A model
    that holds bitsandbytes layers was loaded through bitsandbytes, so while it is not imported the model has none:
    for the duration of the block, PEFT's two availability checks answer no and ``import bitsandbytes`` raises
    ImportError (which PEFT's layer check expects). Loading a 4-bit model later imports bitsandbytes, and its message
    shows there. When bitsandbytes is already imported, nothing changes.
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    try:
        import peft.tuners.lora.model as lora_model
    except ImportError:
        yield
        return
    saved = {name: getattr(lora_model, name) for name in _PEFT_BNB_CHECKS if hasattr(lora_model, name)}
    for name in saved:
        setattr(lora_model, name, _no_bitsandbytes)
    sys.modules["bitsandbytes"] = None  # an import of it raises ImportError (Python's way to block one module)
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        for name, check in saved.items():
            setattr(lora_model, name, check)


def _no_bitsandbytes() -> bool:
    return False


__all__ = ["cache_kwarg", "peft_without_bitsandbytes"]
