"""Reading LoRA adapters saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are mapped to the base model's module paths: ``base_model.model.<path>.lora_A.weight`` → ``<path>``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

from ..experts import all_finite
from . import tensor_file
from .naming import default_names, missing_config_message

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_E")
_CONV_KIND = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


class FileTensors(MutableMapping):
    """Tensors of one adapter file by module path, read from the file at each access and not kept (a build reads
    one module of every adapter at a time). Their dtype and shape come from the file's header; their values are
    checked (NaN, Inf) when read. Assigning a tensor keeps that one in memory instead."""

    def __init__(self, adapter: str, file: str, header: tensor_file.Header):
        self.adapter, self.file, self.header = adapter, file, header
        self._keys: dict[str, str] = {}  # module path → tensor name in the file
        self._memory: dict[str, torch.Tensor] = {}

    def add(self, path: str, key: str) -> None:
        self._keys[path] = key

    def shape(self, path: str) -> tuple[int, ...]:
        if path in self._memory:
            return tuple(self._memory[path].shape)
        return self.header.tensors[self._keys[path]].shape

    def dtype(self, path: str) -> torch.dtype:
        if path in self._memory:
            return self._memory[path].dtype
        return self.header.tensors[self._keys[path]].dtype

    def __getitem__(self, path: str) -> torch.Tensor:
        if path in self._memory:
            return self._memory[path]
        info = self.header.tensors[self._keys[path]]
        t = self.read_into(path, torch.empty(info.shape, dtype=info.dtype), check=False)
        self.check_finite(path, t)
        return t

    def read_into(self, path: str, out: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Read module ``path``'s tensor into ``out`` (contiguous, CPU, of its shape), converting the dtype if it
        differs; ``check``: refuse NaN or Inf (callers that read many tensors check once with :meth:`check_finite`)."""
        if path in self._memory:
            out.copy_(self._memory[path])
        else:
            key = self._keys[path]
            info = self.header.tensors[key]
            target = out if out.dtype == info.dtype else torch.empty(info.shape, dtype=info.dtype)
            try:
                fd = os.open(self.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                name = os.path.basename(self.file)
                raise ValueError(f"adapter {self.adapter!r}: {name} cannot be read ({exc})") from None
            try:
                tensor_file.read_into(fd, self.header.data_start + info.begin, target, self.file)
            except (OSError, ValueError) as exc:
                raise ValueError(f"adapter {self.adapter!r}: tensor {key!r} cannot be read ({exc})") from None
            finally:
                os.close(fd)
            if target is not out:
                out.copy_(target)
        if check:
            self.check_finite(path, out)
        return out

    def check_finite(self, path: str, t: torch.Tensor) -> None:
        """ValueError naming the adapter and tensor when ``t`` (module ``path``'s, as read) holds NaN or Inf."""
        if not all_finite(t):
            raise ValueError(f"adapter {self.adapter!r}: tensor {self._keys.get(path, path)!r} contains NaN or Inf")

    def __setitem__(self, path: str, value: torch.Tensor) -> None:
        self._memory[path] = value

    def __delitem__(self, path: str) -> None:
        self._memory.pop(path, None)
        self._keys.pop(path, None)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._keys, *self._memory]))

    def __len__(self) -> int:
        return len(set(self._keys) | set(self._memory))


def tensor_shape(tensors: Mapping[str, torch.Tensor], path: str) -> tuple[int, ...]:
    """The shape of ``tensors[path]`` without reading a file-backed tensor."""
    return tensors.shape(path) if isinstance(tensors, FileTensors) else tuple(tensors[path].shape)


def tensor_dtype(tensors: Mapping[str, torch.Tensor], path: str) -> torch.dtype:
    """The dtype of ``tensors[path]`` without reading a file-backed tensor."""
    return tensors.dtype(path) if isinstance(tensors, FileTensors) else tensors[path].dtype


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: per module path the factors A (r, d_in), B (d_out, r) and the scaling.

    ``a`` and ``b`` map module paths to tensors: dicts of tensors in memory, or :class:`FileTensors` that read each
    tensor from the adapter's file when it is used (``read_adapter(..., lazy=True)``).
    """

    name: str
    a: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    b: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    scaling: dict[str, float] = field(default_factory=dict)
    base_model_name: str | None = None
    base_model_class: str | None = None
    ignored_modules: list[str] = field(default_factory=list)  # modules_to_save left out (read_adapter's option)

    @property
    def module_paths(self) -> list[str]:
        return list(self.a)

    def rank(self, path: str) -> int:
        return int(tensor_shape(self.a, path)[0])

    def a_shape(self, path: str) -> tuple[int, ...]:
        """(r, d_in) of module ``path``'s A, without reading it."""
        return tensor_shape(self.a, path)

    def b_shape(self, path: str) -> tuple[int, ...]:
        """(d_out, r) of module ``path``'s B, without reading it."""
        return tensor_shape(self.b, path)

    def dtype(self, path: str) -> torch.dtype:
        """The dtype of module ``path``'s A, without reading it."""
        return tensor_dtype(self.a, path)


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
        raise ValueError(missing_config_message(path))
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter {path!r}: adapter_config.json cannot be read ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter {path!r}: adapter_config.json is not a JSON object")
    return cfg


def _read_state(path: str, allow_pickle: bool) -> dict[str, torch.Tensor] | tensor_file.Header:
    """The adapter's tensors in memory (a pickled ``adapter_model.bin``), or the header of its safetensors file;
    every read error becomes a ValueError naming the adapter directory."""
    st_path = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st_path):
        try:
            fd = os.open(st_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                return tensor_file.read_header(fd, st_path)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
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
    lazy: bool = False,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory. Raises ValueError on anything this package cannot use.

    Args:
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also accept a pickled ``adapter_model.bin``. It is read with ``torch.load(weights_only=True)``,
            which accepts tensors and plain containers only, so a file holding anything else is refused, not run.
        name: expert name; defaults to the directory's name, or for a Trainer checkpoint (``run/checkpoint-17``)
            the run directory's name (see :mod:`genknowsub_fast.library.naming`).
        ignore_modules_to_save: leave out the full-module tensors an adapter saved for its ``modules_to_save`` (e.g.
            a fine-tuned ``lm_head``), listing them in :attr:`LoraAdapter.ignored_modules`; Arrow routes LoRA factors
            only, so without this such an adapter is refused.
        lazy: read only the file's header now (names, dtypes, shapes: every check but the values) and each factor
            when it is used (:class:`FileTensors`, which checks its values then); a pickled ``.bin`` is read whole.
            Without it every factor is read, checked (NaN, Inf) and kept in memory.
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

    adapter = LoraAdapter(name=name or default_names([path])[0])
    adapter.base_model_name = cfg.get("base_model_name_or_path") or None
    adapter.base_model_class = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if isinstance(state, tensor_file.Header):
        file = os.path.join(path, "adapter_model.safetensors")
        adapter.a, adapter.b = FileTensors(path, file, state), FileTensors(path, file, state)
        # (key, dtype or None, shape) from the header; None: a dtype this reader does not know (not a float)
        entries = [(k, info.dtype, info.shape) for k, info in state.tensors.items()]
    else:
        entries = [(k, t.dtype if isinstance(t, torch.Tensor) else None, t) for k, t in state.items()]
    for key, dtype, tensor in entries:
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
        if dtype is None or not dtype.is_floating_point:
            what = dtype if dtype is not None else "of a dtype that is not a float" if isinstance(tensor, tuple) else (
                type(tensor).__name__)  # fmt: skip
            raise ValueError(f"adapter {path!r}: tensor {key!r} is {what}; LoRA factors are floating-point")
        shape = tuple(tensor) if isinstance(tensor, tuple) else tuple(tensor.shape)
        if len(shape) in _CONV_KIND:
            raise ValueError(
                f"adapter {path!r}: module {m['path']!r} is a {_CONV_KIND[len(shape)]} (convolution) LoRA "
                f"(lora_{m['factor']} weight of shape {shape}); Arrow routes linear layers only"
            )
        target = adapter.a if m["factor"] == "A" else adapter.b
        if isinstance(target, FileTensors):
            target.add(m["path"], key)
        else:
            if not all_finite(tensor):
                raise ValueError(f"adapter {path!r}: tensor {key!r} contains NaN or Inf")
            target[m["path"]] = tensor
    if not adapter.a:
        raise ValueError(f"adapter {path!r} holds no LoRA weights")
    if set(adapter.a) != set(adapter.b):
        missing = sorted(set(adapter.a) ^ set(adapter.b))
        raise ValueError(f"adapter {path!r}: modules with only one of lora_A / lora_B: {missing}")

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    for p in adapter.a:
        a, b = adapter.a_shape(p), adapter.b_shape(p)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(f"adapter {path!r}, module {p!r}: A {a} and B {b} do not chain")
        r = int(a[0])
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), p, r_default))
        if r_cfg != r:
            raise ValueError(f"adapter {path!r}, module {p!r}: config says rank {r_cfg}, weights have rank {r}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), p, alpha_default))
        adapter.scaling[p] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if not lazy and isinstance(adapter.a, FileTensors):
        adapter.a = {p: adapter.a[p] for p in adapter.a}  # reading checks the values
        adapter.b = {p: adapter.b[p] for p in adapter.b}
    return adapter
