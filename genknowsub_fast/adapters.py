"""Reading LoRA adapters saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are mapped to the base model's module paths: ``base_model.model.<path>.lora_A.weight`` → ``<path>``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_E")
_CONV_KIND = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: per module path the factors A (r, d_in), B (d_out, r) and the scaling."""

    name: str
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling: dict[str, float] = field(default_factory=dict)
    base_model_name: str | None = None
    base_model_class: str | None = None

    @property
    def module_paths(self) -> list[str]:
        return list(self.a)

    def rank(self, path: str) -> int:
        return int(self.a[path].shape[0])


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path or a dotted suffix of it (regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory. Raises ValueError on anything this package cannot use.

    Args:
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also accept a pickled ``adapter_model.bin`` (unsafe: loading it runs arbitrary code).
        name: expert name; defaults to the directory's name.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"adapter path {path!r} is not a directory")
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"adapter {path!r} has no adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter {path!r} is a {peft_type} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise ValueError(f"adapter {path!r} uses DoRA, which Arrow routing does not support")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter {path!r} trains biases (bias={cfg['bias']!r}); only bias='none' is supported")

    st_path = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st_path):
        state = load_file(st_path)
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(
                f"adapter {path!r} is a pickled adapter_model.bin; loading pickles can run arbitrary code. "
                "Convert it to safetensors, or pass allow_pickle=True if you trust it."
            )
        state = torch.load(bin_path, map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"adapter {path!r} has no adapter_model.safetensors")

    adapter = LoraAdapter(name=name or os.path.basename(os.path.normpath(path)))
    adapter.base_model_name = cfg.get("base_model_name_or_path") or None
    adapter.base_model_class = (cfg.get("auto_mapping") or {}).get("base_model_class")
    for key, tensor in state.items():
        emb = _EMBEDDING_KEY.match(key)
        if emb is not None:
            raise ValueError(
                f"adapter {path!r}: module {emb['path']!r} is an embedding LoRA ({key!r}); Arrow routes linear "
                "layers only (PEFT's Arrow ignores embedding LoRA): train the adapters on linear layers"
            )
        if any(tag in key for tag in _UNSUPPORTED):
            raise ValueError(f"adapter {path!r} holds {key!r}: only LoRA on linear layers is supported")
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {path!r}: unexpected tensor {key!r} (not a lora_A / lora_B weight)")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter {path!r}: tensor {key!r} contains NaN or Inf")
        if tensor.dim() in _CONV_KIND:
            raise ValueError(
                f"adapter {path!r}: module {m['path']!r} is a {_CONV_KIND[tensor.dim()]} (convolution) LoRA "
                f"(lora_{m['factor']} weight of shape {tuple(tensor.shape)}); Arrow routes linear layers only"
            )
        target = adapter.a if m["factor"] == "A" else adapter.b
        target[m["path"]] = tensor
    if not adapter.a:
        raise ValueError(f"adapter {path!r} holds no LoRA weights")
    if set(adapter.a) != set(adapter.b):
        missing = sorted(set(adapter.a) ^ set(adapter.b))
        raise ValueError(f"adapter {path!r}: modules with only one of lora_A / lora_B: {missing}")

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    for p in adapter.a:
        a, b = adapter.a[p], adapter.b[p]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {path!r}, module {p!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
        r = int(a.shape[0])
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), p, r_default))
        if r_cfg != r:
            raise ValueError(f"adapter {path!r}, module {p!r}: config says rank {r_cfg}, weights have rank {r}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), p, alpha_default))
        adapter.scaling[p] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return adapter
