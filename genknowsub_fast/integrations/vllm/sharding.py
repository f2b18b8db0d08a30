"""Tensor-parallel maths of routed LoRA, in plain torch (no vLLM import): what one rank holds and computes.

Column-parallel layers (vLLM's ``ColumnParallelLinear`` and its fused forms ``MergedColumnParallelLinear`` for
gate/up and ``QKVParallelLinear`` for q/k/v): x is replicated, each rank computes some rows of the output. A fused
layer's local output is the concatenation, part by part, of that rank's shard of each part (``[q_shard, k_shard,
v_shard]``, ``[gate_shard, up_shard]``), not a contiguous slice of the full output. The routed delta of a rank is the
same rows of the full delta, so the rank keeps A and the prototypes whole and slices B's rows the same way.

Row-parallel layers (``RowParallelLinear``): x is split along d_in, each rank computes a partial output that vLLM
all-reduces (the bias is added by rank 0 only). The routing scores ``x·p`` are sums over d_in, so each rank computes
partial scores over its columns, and the E signed scores are all-reduced before top-k: every rank then picks the same
experts with the same weights. The shrink ``A x`` is partial too; the delta is linear in it, so each rank adds its
partial delta to its partial output and the layer's existing all-reduce sums them.

:class:`ShardedRouting` is the per-layer object both the vLLM layers and the pure-torch simulation in the tests run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from genknowsub_fast.experts import ModuleExperts


@dataclass(frozen=True)
class PartShard:
    """One part of a column-parallel layer (q, k, v, gate, up, or the whole layer) as held by one rank.

    ``full_offset``/``full_size``: where the part sits in the unsharded output. ``shard_start``/``shard_size``: the
    rows of the part this rank holds (relative to the part). ``local_offset``: where they sit in the rank's output.
    """

    full_offset: int
    full_size: int
    shard_start: int
    shard_size: int
    local_offset: int


def column_layout(
    full_sizes: Sequence[int], shard_sizes: Sequence[int], shard_indices: Sequence[int]
) -> list[PartShard]:
    """The local output layout of a column-parallel layer: part p holds rows ``[i_p·s_p, (i_p+1)·s_p)`` of part p.

    ValueError if a shard runs past its part.
    """
    if not (len(full_sizes) == len(shard_sizes) == len(shard_indices)) or not full_sizes:
        raise ValueError(f"one shard size and index per part: {full_sizes}, {shard_sizes}, {shard_indices}")
    parts, full_off, local_off = [], 0, 0
    for full, size, idx in zip(full_sizes, shard_sizes, shard_indices):
        start = idx * size
        if size <= 0 or start < 0 or start + size > full:
            raise ValueError(f"shard {idx} of size {size} does not fit in a part of {full} rows")
        parts.append(PartShard(full_off, full, start, size, local_off))
        full_off += full
        local_off += size
    return parts


def even_column_layout(full_sizes: Sequence[int], tp_rank: int, tp_size: int) -> list[PartShard]:
    """``ColumnParallelLinear`` / ``MergedColumnParallelLinear``: every part split evenly over the ranks."""
    _check_rank(tp_rank, tp_size)
    for s in full_sizes:
        if s % tp_size:
            raise ValueError(f"a part of {s} rows does not split over {tp_size} ranks")
    return column_layout(full_sizes, [s // tp_size for s in full_sizes], [tp_rank] * len(full_sizes))


def qkv_column_layout(
    head_size: int, v_head_size: int, num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int
) -> list[PartShard]:
    """``QKVParallelLinear``: query heads split over the ranks; key/value heads split too, or, with fewer key/value
    heads than ranks, each rank holds one key/value head, shared by ``tp_size / num_kv_heads`` consecutive ranks."""
    _check_rank(tp_rank, tp_size)
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} query heads do not split over {tp_size} ranks")
    if tp_size >= num_kv_heads:
        if tp_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} key/value heads cannot be replicated evenly over {tp_size} ranks")
        kv_local, kv_index = 1, tp_rank // (tp_size // num_kv_heads)
    else:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} key/value heads do not split over {tp_size} ranks")
        kv_local, kv_index = num_kv_heads // tp_size, tp_rank
    q_local = num_heads // tp_size
    return column_layout(
        [num_heads * head_size, num_kv_heads * head_size, num_kv_heads * v_head_size],
        [q_local * head_size, kv_local * head_size, kv_local * v_head_size],
        [tp_rank, kv_index, kv_index],
    )


def row_columns(d_in: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``RowParallelLinear``: the input columns ``[start, stop)`` one rank holds."""
    _check_rank(tp_rank, tp_size)
    if d_in % tp_size:
        raise ValueError(f"d_in={d_in} does not split over {tp_size} ranks")
    size = d_in // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def _check_rank(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")


def slice_rows(experts: ModuleExperts, parts: Sequence[PartShard], relative: bool = False) -> ModuleExperts:
    """The experts of the rows ``parts`` select, in local order: B's rows sliced, A and prototypes kept.

    ``relative``: the parts' rows are counted from the start of each part (a module that is one part of a fused
    layer); otherwise from ``full_offset`` (a module that is the whole fused layer).
    """
    rows = torch.cat(
        [torch.arange(p.shard_start, p.shard_start + p.shard_size) + (0 if relative else p.full_offset) for p in parts]
    )
    if int(rows.max()) >= experts.d_out:
        raise ValueError(f"rows up to {int(rows.max())} asked of experts with d_out={experts.d_out}")
    return ModuleExperts(
        experts.a,
        experts.b.index_select(1, rows.to(experts.b.device)),
        experts.scaling,
        experts.prototypes,
        experts.ranks,
    )


def slice_columns(experts: ModuleExperts, start: int, stop: int) -> ModuleExperts:
    """The experts seen by the rank holding input columns ``[start, stop)``: A's and the prototypes' columns."""
    if not 0 <= start < stop <= experts.d_in:
        raise ValueError(f"columns [{start}, {stop}) asked of experts with d_in={experts.d_in}")
    return ModuleExperts(
        experts.a[:, :, start:stop].contiguous(),
        experts.b,
        experts.scaling,
        experts.prototypes[:, start:stop].contiguous(),
        experts.ranks,
    )


@dataclass
class RoutedPart:
    """A prepared runner and the columns ``[offset, offset + runner.d_out)`` of the layer's local output it writes."""

    runner: object
    offset: int
    name: str


class ShardedRouting:
    """The routed delta of one (possibly sharded, possibly fused) linear layer on one rank.

    ``parts``: one runner per library module feeding the layer (one, or one per q/k/v when the library has separate
    q/k/v modules and the layer fuses them). ``partial_scores``: the layer is row-parallel over more than one rank, so
    the routing scores must be all-reduced: call :meth:`route_scores`, sum over ranks, pass the sum to
    :meth:`add_delta_`.
    """

    def __init__(self, parts: Sequence[RoutedPart], d_out: int, partial_scores: bool):
        if not parts:
            raise ValueError("a routed layer needs at least one part")
        if partial_scores and len(parts) != 1:
            raise ValueError("a row-parallel layer is fed by exactly one library module")
        for p in parts:
            if p.offset < 0 or p.offset + p.runner.d_out > d_out:
                raise ValueError(f"{p.name}: columns [{p.offset}, {p.offset + p.runner.d_out}) exceed d_out={d_out}")
        self.parts = list(parts)
        self.d_out = d_out
        self.partial_scores = partial_scores
        self.whole = len(parts) == 1 and parts[0].offset == 0 and parts[0].runner.d_out == d_out

    @property
    def num_experts(self) -> int:
        return int(self.parts[0].runner.num_experts)

    def route_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 signed scores of this rank's columns of x (a partial sum when the layer is row-parallel)."""
        return self.parts[0].runner.route_scores(x.reshape(-1, x.shape[-1]))

    def add_delta_(self, y: torch.Tensor, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``y += delta`` in place; y (..., d_out) is the layer's local output, x (..., d_in_local) its input."""
        if self.partial_scores and scores is None:
            raise ValueError("a row-parallel layer needs the all-reduced routing scores")
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y2 = y.view(-1, self.d_out)
        if self.whole and y2.is_contiguous():
            self.parts[0].runner.add_delta_(y2, x2, scores=scores)
            return y
        # A fused layer fed by several modules (or a strided output): the runners add into whole contiguous rows, so
        # each module's columns are copied out, get their delta (one rounding, as in place) and are copied back.
        for p in self.parts:
            cols = slice(p.offset, p.offset + p.runner.d_out)
            seg = y2[:, cols].contiguous()
            p.runner.add_delta_(seg, x2, scores=scores)
            y2[:, cols] = seg
        return y

    def forward_delta_(
        self, y: torch.Tensor, x: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        """:meth:`add_delta_` with the scores all-reduced by ``all_reduce`` when the layer is row-parallel."""
        scores = None
        if self.partial_scores:
            if all_reduce is None:
                raise ValueError("a row-parallel layer needs an all-reduce for its routing scores")
            scores = all_reduce(self.route_scores(x))
        return self.add_delta_(y, x, scores)


__all__ = [
    "PartShard",
    "RoutedPart",
    "ShardedRouting",
    "column_layout",
    "even_column_layout",
    "qkv_column_layout",
    "row_columns",
    "slice_columns",
    "slice_rows",
]
