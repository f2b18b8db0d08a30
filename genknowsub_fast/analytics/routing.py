"""Routing statistics of a patched model: which experts each patched layer picks, how sure it is.

:func:`record_routing` is a context manager over a model patched by :func:`genknowsub_fast.patch_model`. While it is
open it counts, per patched module, how often each expert is selected (and selected first), the mean top-1 weight and
the mean entropy of the softmax weights over the k selected experts. It uses only the public patched-layer API
(:func:`genknowsub_fast.patched_layers` and each layer's ``recorder`` hook).

Recording computes each layer's routing a second time, with the layer's own runner (float32 scores, ties to the
lower index, as every backend): one extra (T, E) GEMM per patched layer while recording; outputs are unchanged.

Threads: only calls made by the thread that opened :func:`record_routing` are recorded; other threads running the
same model meanwhile are not counted.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..patching import PatchedLayer, patched_layers
from .common import json_float, layer_index, module_kind


@dataclass
class ModuleRouting:
    """Routing counts accumulated for one patched module."""

    path: str
    top_k: int
    temperature: float
    counts: torch.Tensor  # (E,) times each expert was among the top-k
    top1_counts: torch.Tensor  # (E,) times each expert was ranked first
    tokens: int = 0
    sum_top1_weight: float = 0.0
    sum_entropy: float = 0.0

    @property
    def layer(self) -> int | None:
        return layer_index(self.path)

    @property
    def mean_top1_weight(self) -> float:
        return self.sum_top1_weight / self.tokens if self.tokens else float("nan")

    @property
    def mean_entropy(self) -> float:
        """Mean entropy (nats) of the softmax weights over the k selected experts; at most log k."""
        return self.sum_entropy / self.tokens if self.tokens else float("nan")

    @property
    def usage(self) -> torch.Tensor:
        """Share of the token's k selections that went to each expert (sums to 1)."""
        total = self.counts.sum()
        return self.counts.double() / total if total > 0 else self.counts.double()

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "layer": self.layer,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "tokens": self.tokens,
            "counts": self.counts.tolist(),
            "top1_counts": self.top1_counts.tolist(),
            "mean_top1_weight": json_float(self.mean_top1_weight),
            "mean_entropy": json_float(self.mean_entropy),
        }


class RoutingStats:
    """Routing statistics per patched module, filled while :func:`record_routing` is active."""

    def __init__(self, expert_names: Sequence[str] | None = None):
        self.expert_names = list(expert_names) if expert_names is not None else None
        self.modules: dict[str, ModuleRouting] = {}

    def names(self, num_experts: int) -> list[str]:
        if self.expert_names is not None and len(self.expert_names) == num_experts:
            return self.expert_names
        return [f"expert_{i}" for i in range(num_experts)]

    @property
    def kinds(self) -> list[str]:
        """Module kinds (``qkv_proj``, ...) in first-seen order."""
        return list(dict.fromkeys(module_kind(p) for p in self.modules))

    def usage_matrix(self, kind: str | None = None) -> tuple[list[int | None], torch.Tensor]:
        """Layers and the (layers, E) usage share, averaged over the modules of each layer (or only ``kind``)."""
        by_layer: dict[int | None, list[torch.Tensor]] = {}
        for p, m in self.modules.items():
            if kind is None or module_kind(p) == kind:
                by_layer.setdefault(m.layer, []).append(m.usage)
        layers = sorted(by_layer, key=lambda x: -1 if x is None else x)
        if not layers:
            raise ValueError(f"no recorded module named {kind!r}")
        return layers, torch.stack([torch.stack(by_layer[layer]).mean(0) for layer in layers])

    def per_layer(self, attr: str, kind: str | None = None) -> tuple[list[int | None], list[float]]:
        """Layers and the mean of a :class:`ModuleRouting` attribute (e.g. ``mean_entropy``) per layer."""
        by_layer: dict[int | None, list[float]] = {}
        for p, m in self.modules.items():
            if (kind is None or module_kind(p) == kind) and m.tokens:
                by_layer.setdefault(m.layer, []).append(getattr(m, attr))
        layers = sorted(by_layer, key=lambda x: -1 if x is None else x)
        return layers, [sum(by_layer[layer]) / len(by_layer[layer]) for layer in layers]

    def table(self) -> str:
        """One row per module: tokens, mean top-1 weight, mean entropy (and its share of log k), usage per expert."""
        if not self.modules:
            return "no routing recorded"
        e = next(iter(self.modules.values())).counts.numel()
        # Expert columns as wide as their names (up to 12 characters; a longer name keeps its end, where names differ:
        # "expert_0" / "expert_1" cut to 7 characters all read "expert_").
        labels = [n if len(n) <= 12 else "…" + n[-11:] for n in self.names(e)]
        cw = max(7, *(len(n) for n in labels))
        w = max(len(p) for p in self.modules)
        head = f"{'module':<{w}}  {'tokens':>6}  {'top-1 w':>7}  {'entropy':>7}  {'/log k':>6}  "
        lines = [" " * len(head) + "usage % (share of the top-k selections) per expert",
                 head + " ".join(f"{n:>{cw}}" for n in labels)]  # fmt: skip
        for p, m in self.modules.items():
            norm = m.mean_entropy / math.log(m.top_k) if m.top_k > 1 else float("nan")
            usage = " ".join(f"{100 * u:>{cw}.1f}" for u in m.usage.tolist())
            lines.append(
                f"{p:<{w}}  {m.tokens:>6}  {m.mean_top1_weight:>7.3f}  {m.mean_entropy:>7.3f}  {norm:>6.2f}  " + usage
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"expert_names": self.expert_names, "modules": {p: m.to_dict() for p, m in self.modules.items()}}


class RoutingRecorder:
    """The callable :func:`record_routing` sets as every patched layer's ``recorder``: routes the layer's input with the
    layer's runner and adds the result to the stats. Calls from threads other than the owner are ignored."""

    def __init__(self, stats: RoutingStats, owner: int | None = None):
        self.stats = stats
        self.owner = threading.get_ident() if owner is None else owner

    @torch.no_grad()
    def __call__(self, layer: PatchedLayer, x: torch.Tensor) -> None:
        if threading.get_ident() != self.owner:
            return
        runner = layer.runner
        x2 = x.detach().reshape(-1, x.shape[-1])
        m = self.stats.modules.get(layer.name)
        if m is None:
            zeros = torch.zeros(runner.num_experts, dtype=torch.int64, device=x2.device)
            m = self.stats.modules[layer.name] = ModuleRouting(
                layer.name, runner.top_k, runner.temperature, zeros, zeros.clone()
            )
        if x2.shape[0] == 0:
            return
        w, idx = runner.route(x2)
        e = runner.num_experts
        m.counts += torch.bincount(idx.flatten(), minlength=e).to(m.counts.device)
        m.top1_counts += torch.bincount(idx[:, 0], minlength=e).to(m.counts.device)
        w = w.double()
        m.tokens += x2.shape[0]
        m.sum_top1_weight += float(w[:, 0].sum())
        m.sum_entropy += float(-(w * w.clamp_min(1e-300).log()).sum())


@contextlib.contextmanager
def record_routing(
    model: torch.nn.Module, expert_names: Sequence[str] | None = None, stats: RoutingStats | None = None
) -> Iterator[RoutingStats]:
    """Record the routing of every patched module of ``model`` while the block runs; yields the :class:`RoutingStats`.

    ``expert_names`` label the experts in tables and plots (default: the names of the library the model was patched
    with; ``expert_0``, ... only where the patched layers do not share one list of names); ``stats`` continues an
    earlier recording, which must have been made with the same top_k and temperature on every module (else
    ValueError: counts of different routings do not add up).

    Only the calling thread's forward passes are recorded. On exit every recorder is removed.
    """
    layers = list(patched_layers(model).values())
    if not layers:
        raise ValueError("record_routing needs a model patched by genknowsub_fast.patch_model")
    if any(layer.recorder is not None for layer in layers):
        raise ValueError("routing is already being recorded on this model")
    if expert_names is None:
        known = {layer.expert_names for layer in layers}
        if len(known) == 1 and next(iter(known)):
            expert_names = list(next(iter(known)))
    if stats is None:
        stats = RoutingStats(expert_names)
    elif stats.expert_names is None and expert_names is not None:
        stats.expert_names = list(expert_names)
    for layer in layers:
        old = stats.modules.get(layer.name)
        if old is not None and (old.top_k, old.temperature) != (layer.top_k, layer.temperature):
            raise ValueError(
                f"stats of {layer.name!r} were recorded with top_k={old.top_k}, temperature={old.temperature}; the "
                f"model now routes with top_k={layer.top_k}, temperature={layer.temperature}: start a new recording"
            )
    recorder = RoutingRecorder(stats)
    for layer in layers:
        layer.recorder = recorder
    try:
        yield stats
    finally:
        for layer in layers:
            layer.recorder = None


__all__ = ["ModuleRouting", "RoutingStats", "RoutingRecorder", "record_routing"]
