"""The routed delta as two torch custom ops, for vLLM's torch.compile / CUDA-graph path (no vLLM import).

Under torch.compile the routed layers call these ops instead of the runners' Python: Dynamo sees one opaque op per
layer (no graph break, nothing of the plan caches traced), and the row-parallel score all-reduce stays between them as
vLLM's own all-reduce op, visible to vLLM's compile passes. In eager mode the layers call the runners directly (a
custom-op dispatch costs a few microseconds a call). The ops find their layer by a string key in a process-wide
registry that holds the layers weakly: a layer dies with its vLLM module.
"""

from __future__ import annotations

import weakref

import torch

from .sharding import ShardedRouting

_LAYERS: weakref.WeakValueDictionary[str, ShardedRouting] = weakref.WeakValueDictionary()


def register_layer(routing: ShardedRouting, key: str) -> str:
    """Register ``routing`` under ``key`` (replacing an older layer of that key) and return the key.

    vLLM keeps compiled graphs on disk and reloads them in later processes, with the keys baked in as constants, so a
    key must name the same layer in every process: the caller derives it from the layer's path and everything the
    compiled graph is cached by (the routing options, dtype, device), never from a per-process counter.
    """
    _LAYERS[key] = routing
    return key


def layer(key: str) -> ShardedRouting:
    """The registered layer of ``key``."""
    try:
        return _LAYERS[key]
    except KeyError:
        raise ValueError(f"no routed layer is registered as {key!r} in this process") from None


@torch.library.custom_op("genknowsub_fast_vllm::route_scores", mutates_args=())
def route_scores(x: torch.Tensor, key: str) -> torch.Tensor:
    """(T, E) float32 signed routing scores of layer ``key`` (partial sums on a row-parallel rank)."""
    return layer(key).route_scores(x)


@route_scores.register_fake
def _route_scores_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    num_tokens = x.numel() // x.shape[-1]
    return x.new_empty((num_tokens, layer(key).num_experts), dtype=torch.float32)


@torch.library.custom_op("genknowsub_fast_vllm::add_routed_delta_", mutates_args=("y",))
def add_routed_delta_(y: torch.Tensor, x: torch.Tensor, scores: torch.Tensor | None, key: str) -> None:
    """``y += delta`` of layer ``key`` in place (``scores``: the all-reduced routing scores of a row-parallel rank)."""
    layer(key).add_delta_(y, x, scores)


@add_routed_delta_.register_fake
def _add_routed_delta_fake(y: torch.Tensor, x: torch.Tensor, scores: torch.Tensor | None, key: str) -> None:
    return None


__all__ = ["add_routed_delta_", "layer", "register_layer", "route_scores"]
