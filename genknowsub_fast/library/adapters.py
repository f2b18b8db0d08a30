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

from ..experts import all_finite

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
    ignored_modules: list[str] = field(default_factory=list)  # modules_to_save left out (read_adapter's option)

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


class PickledAdapterError(ValueError):
    """An adapter is a pickled ``adapter_model.bin`` and pickles were not allowed (the command line names its own
    flag for this, so it catches this class)."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"adapter {path!r} is a pickled adapter_model.bin; loading pickles can run arbitrary code. "
            "Convert it to safetensors, or pass allow_pickle=True if you trust it."
        )


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"adapter {path!r} has no adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter {path!r}: adapter_config.json cannot be read ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter {path!r}: adapter_config.json is not a JSON object")
    return cfg


def _read_state(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The adapter's tensors; every read error becomes a ValueError naming the adapter directory."""
    st_path = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st_path):
        try:
            return load_file(st_path)
        except Exception as exc:  # safetensors raises its own error types on truncated or corrupt files
            raise ValueError(f"adapter {path!r}: adapter_model.safetensors cannot be read ({exc})") from None
    if not os.path.isfile(bin_path):
        raise ValueError(f"adapter {path!r} has no adapter_model.safetensors")
    if not allow_pickle:
        raise PickledAdapterError(path)
    # A state dict is tensors under string keys, which torch's restricted unpickler reads; anything else in the file
    # (a payload that would run code) is refused rather than executed.
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"adapter {path!r}: adapter_model.bin is not a plain state dict of tensors ({first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"adapter {path!r}: adapter_model.bin is not a dict of tensors")
    return state


def _saved_module(key: str, modules_to_save: list[str]) -> str | None:
    """The module path of ``key`` when it is a full-module tensor PEFT saved for ``modules_to_save``, else None."""
    path = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
    path = re.sub(r"\.modules_to_save\.[^.]+$", "", path)
    for name in modules_to_save:
        if path == name or path.endswith("." + name):
            return path
    return None


def read_adapter(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    name: str | None = None,
    ignore_modules_to_save: bool = False,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory. Raises ValueError on anything this package cannot use.

    Args:
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also accept a pickled ``adapter_model.bin``. It is read with ``torch.load(weights_only=True)``,
            which accepts tensors and plain containers only, so a file holding anything else is refused, not run.
        name: expert name; defaults to the directory's name.
        ignore_modules_to_save: leave out the full-module tensors an adapter saved for its ``modules_to_save`` (e.g.
            a fine-tuned ``lm_head``), listing them in :attr:`LoraAdapter.ignored_modules`; Arrow routes LoRA factors
            only, so without this such an adapter is refused.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"adapter path {path!r} is not a directory")
    cfg = _read_config(path)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter {path!r} is a {peft_type} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise ValueError(f"adapter {path!r} uses DoRA, which Arrow routing does not support")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter {path!r} trains biases (bias={cfg['bias']!r}); only bias='none' is supported")
    state = _read_state(path, allow_pickle)
    modules_to_save = [str(m) for m in cfg.get("modules_to_save") or []]

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
            saved = _saved_module(key, modules_to_save)
            if saved is None:
                raise ValueError(f"adapter {path!r}: unexpected tensor {key!r} (not a lora_A / lora_B weight)")
            if not ignore_modules_to_save:
                raise ValueError(
                    f"adapter {path!r} also saves the whole module {saved!r} (modules_to_save={modules_to_save}); "
                    "Arrow routes LoRA factors only: pass ignore_modules_to_save=True (command line: "
                    "--ignore-modules-to-save) to leave such modules out (the model then keeps its own weights there)"
                )
            if saved not in adapter.ignored_modules:
                adapter.ignored_modules.append(saved)
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"adapter {path!r}: tensor {key!r} is {what}; LoRA factors are floating-point")
        if not all_finite(tensor):
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
