"""Routed LoRA inside vLLM's own linear layers: find the layers a library targets, shard its experts, wrap the layers.

The delta is added in the layer's ``quant_method.apply``: vLLM's linear layers call it for the local matmul (column
shard, or row-parallel partial product with the bias on rank 0 only) and then all-gather or all-reduce its output
themselves. So a wrapped ``apply`` that adds this rank's delta to that local output needs no other change to vLLM:
row-parallel partial deltas are summed by the layer's existing all-reduce, column shards are gathered as before. The
wrapper forwards everything else (weight creation, post-load processing) to the method it wraps.

Library modules map to vLLM modules by path. A module vLLM fuses (Phi-2's q/k/v in one ``qkv_proj``) is found through
the model's ``packed_modules_mapping`` and writes its own columns of the fused output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.models.utils import PPMissingLayer

from genknowsub_fast.experts import ModuleExperts
from genknowsub_fast.integrations.vllm import custom_ops
from genknowsub_fast.integrations.vllm.options import ServedOptions
from genknowsub_fast.integrations.vllm.sharding import (
    PartShard,
    RoutedPart,
    ShardedRouting,
    even_column_layout,
    qkv_column_layout,
    row_columns,
    slice_columns,
    slice_rows,
)
from genknowsub_fast.library import LoraLibrary
from genknowsub_fast.options import RoutingOptions
from genknowsub_fast.runner import RoutedLinear


class RoutedLinearMethod(LinearMethodBase):
    """A vLLM linear method that runs the wrapped one, then adds this rank's routed LoRA delta to its output."""

    def __init__(self, inner: LinearMethodBase, routing: ShardedRouting, key: str):
        self.inner = inner
        self.routing = routing  # the registry holds layers weakly: this reference keeps the layer alive
        self.key = key

    # vLLM reads these class-level flags of a quant method; the wrapped method's values hold.
    @property
    def requires_device_loading(self) -> bool:
        return self.inner.requires_device_loading

    @property
    def uses_meta_device(self) -> bool:
        return self.inner.uses_meta_device

    @property
    def supports_pre_processed_weights(self) -> bool:
        return self.inner.supports_pre_processed_weights

    def create_weights(self, layer: nn.Module, *args, **kwargs):
        return self.inner.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.inner.apply(layer, x, bias)
        if torch.compiler.is_compiling():
            scores = None
            if self.routing.partial_scores:
                scores = tensor_model_parallel_all_reduce(custom_ops.route_scores(x, self.key))
            custom_ops.add_routed_delta_(y, x, scores, self.key)
            return y
        return self.routing.forward_delta_(y, x, tensor_model_parallel_all_reduce)

    def __getattr__(self, name: str):
        # Anything else a caller asks of the quant method (quantisation-specific helpers) is the wrapped method's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _column_layout(layer: LinearBase) -> list[PartShard]:
    """The local output layout of a column-parallel (or replicated) vLLM linear layer on this rank."""
    if isinstance(layer, QKVParallelLinear):
        return qkv_column_layout(
            layer.head_size,
            layer.v_head_size,
            layer.total_num_heads,
            layer.total_num_kv_heads,
            layer.tp_rank,
            layer.tp_size,
        )
    if isinstance(layer, MergedColumnParallelLinear):
        return even_column_layout(list(layer.output_sizes), layer.tp_rank, layer.tp_size)
    if isinstance(layer, ColumnParallelLinear):
        return even_column_layout([layer.output_size], layer.tp_rank, layer.tp_size)
    return even_column_layout([layer.output_size], 0, 1)


def build_routing(
    layer: LinearBase,
    members: Sequence[tuple[str, int | None]],
    library: LoraLibrary,
    routing: RoutingOptions,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
) -> ShardedRouting:
    """This rank's routed delta of ``layer``, fed by the library modules ``members`` (path, fused part or None)."""

    def runner(experts: ModuleExperts, path: str):
        return RoutedLinear(experts, routing, backend, device=device, dtype=dtype, name=path)

    if isinstance(layer, RowParallelLinear):
        if len(members) != 1 or members[0][1] is not None:
            raise ValueError(f"row-parallel layer {layer.prefix!r} is fed by {[m for m, _ in members]}")
        path = members[0][0]
        experts = library.modules[path]
        _check_dims(path, experts, layer.input_size, layer.output_size)
        lo, hi = row_columns(layer.input_size, layer.tp_rank, layer.tp_size)
        local = experts if layer.tp_size == 1 else slice_columns(experts, lo, hi)
        parts = [RoutedPart(runner(local, path), 0, path)]
        return ShardedRouting(parts, layer.output_size, layer.tp_size > 1)
    if not isinstance(layer, (ColumnParallelLinear, ReplicatedLinear)):
        raise ValueError(f"layer {layer.prefix!r} is a {type(layer).__name__}, not a linear layer this supports")
    layout = _column_layout(layer)
    d_out_local = sum(p.shard_size for p in layout)
    parts = []
    for path, index in members:
        experts = library.modules[path]
        if index is None:
            _check_dims(path, experts, layer.input_size, sum(p.full_size for p in layout))
            parts.append(RoutedPart(runner(slice_rows(experts, layout), path), 0, path))
        else:
            part = layout[index]
            _check_dims(path, experts, layer.input_size, part.full_size)
            parts.append(RoutedPart(runner(slice_rows(experts, [part], relative=True), path), part.local_offset, path))
    return ShardedRouting(parts, d_out_local, partial_scores=False)


def _check_dims(path: str, experts: ModuleExperts, d_in: int, d_out: int) -> None:
    if (experts.d_in, experts.d_out) != (d_in, d_out):
        raise ValueError(
            f"library module {path!r} is {experts.d_in}→{experts.d_out} but the model's layer is {d_in}→{d_out}: "
            "adapters for another base model?"
        )


def _resolve(model: nn.Module, library: LoraLibrary) -> tuple[dict[str, list[tuple[str, int | None]]], list[str]]:
    """Map each library module to (vLLM layer path, fused part index or None); also the paths on other pipeline
    stages (skipped). ValueError lists the modules found nowhere."""
    named = dict(model.named_modules())
    packed = getattr(model, "packed_modules_mapping", None) or {}
    groups: dict[str, list[tuple[str, int | None]]] = {}
    elsewhere, missing = [], []
    for path in library.modules:
        if _on_other_stage(named, path):
            elsewhere.append(path)
            continue
        if isinstance(named.get(path), LinearBase):
            groups.setdefault(path, []).append((path, None))
            continue
        parent, _, short = path.rpartition(".")
        hit = None
        for fused, subs in packed.items():
            target = f"{parent}.{fused}" if parent else fused
            if short in subs and isinstance(named.get(target), LinearBase):
                hit = (target, subs.index(short) if len(subs) > 1 else None)
                break
        if hit is None:
            missing.append(path)
        else:
            groups.setdefault(hit[0], []).append((path, hit[1]))
    if missing:
        raise ValueError(
            f"{len(missing)} library modules match no linear layer of the vLLM model, e.g. {missing[:3]} "
            f"(its linear layers look like {[n for n, m in named.items() if isinstance(m, LinearBase)][:4]})"
        )
    return groups, elsewhere


def _on_other_stage(named: dict[str, nn.Module], path: str) -> bool:
    parts = path.split(".")
    return any(isinstance(named.get(".".join(parts[:i])), PPMissingLayer) for i in range(1, len(parts) + 1))


def attach_routing(
    model: nn.Module, options: ServedOptions, device: torch.device | str, dtype: torch.dtype
) -> dict[str, ShardedRouting]:
    """Route ``model``'s target layers through the library named by ``options``; returns layer path → routing.

    Every library module is resolved and checked before any layer is touched. Attaching again replaces the previous
    routing (the wrapped method is unwrapped first).
    """
    library = LoraLibrary.load(options.library)
    routing = library.routing_options(options.top_k, options.temperature, options.mixing)
    groups, _ = _resolve(model, library)
    if not groups:
        raise ValueError("no library module is on this pipeline stage's layers")
    device = torch.device(device)
    settings = {
        **options.to_dict(),
        **routing.as_dict(),
        "dtype": str(dtype),
        "device": str(device),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    built = {}
    for layer_path, members in groups.items():
        layer = model.get_submodule(layer_path)
        built[layer_path] = build_routing(layer, members, library, routing, options.backend, device, dtype)
    for layer_path, sharded in built.items():
        layer = model.get_submodule(layer_path)
        inner = layer.quant_method
        if isinstance(inner, RoutedLinearMethod):
            inner = inner.inner
        layer.quant_method = RoutedLinearMethod(
            inner, sharded, custom_ops.register_layer(sharded, f"{digest}:{layer_path}")
        )
    return built


def routed_layers(model: nn.Module) -> dict[str, ShardedRouting]:
    """Layer path → routing of every routed layer of a vLLM model."""
    return {
        n: m.quant_method.routing
        for n, m in model.named_modules()
        if isinstance(getattr(m, "quant_method", None), RoutedLinearMethod)
    }


__all__ = ["RoutedLinearMethod", "attach_routing", "build_routing", "routed_layers"]
