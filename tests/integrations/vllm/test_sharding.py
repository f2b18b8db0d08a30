"""Pure-torch simulation of 1, 2 and 4 tensor-parallel ranks against the unsharded routed layer (no vLLM needed).

Each rank's base weight is sharded the way vLLM's weight loaders shard it (written out here independently of
genknowsub_fast's layout functions); the rank's routed delta comes from the sharding module. Column-parallel outputs
are reassembled from the ranks' local outputs; row-parallel outputs are summed after the scores were all-reduced.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genknowsub_fast import reference
from genknowsub_fast.experts import ModuleExperts
from genknowsub_fast.integrations.vllm.sharding import (
    RoutedPart,
    ShardedRouting,
    column_layout,
    even_column_layout,
    qkv_column_layout,
    row_columns,
    slice_columns,
    slice_rows,
)
from genknowsub_fast.ops import prepare
from tests.routing_cases import make_case
from tests.tolerances import assert_close_to_reference

E, R, T, K, TEMP = 6, 4, 9, 2, 0.7
DTYPES = [torch.float32, torch.bfloat16]


class Module:
    """A float64 routed linear module: base weight, bias, experts, and an input whose routing is unambiguous."""

    def __init__(self, d_in: int, d_out: int, seed: int, x: torch.Tensor | None = None, shared_scaling=False):
        case = make_case(T, E, R, d_in, d_out, seed=seed, shared_scaling=shared_scaling)
        g = torch.Generator().manual_seed(seed + 100)
        self.x = case.x if x is None else x
        self.w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
        self.bias = torch.randn(d_out, generator=g, dtype=torch.float64)
        self.experts = ModuleExperts(case.a, case.b, case.scaling, case.prototypes, case.ranks)

    def ref64(self, mixing: str) -> torch.Tensor:
        e = self.experts
        return reference.routed_lora(self.x, e.a, e.b, e.scaling, e.prototypes, K, TEMP, mixing, self.w, self.bias)

    def unsharded(self, dtype: torch.dtype, mixing: str) -> torch.Tensor:
        runner = prepare(self.experts.to(dtype=dtype), K, TEMP, mixing, dtype=dtype)
        x = self.x.to(dtype)
        y = F.linear(x, self.w.to(dtype), self.bias.to(dtype))
        return runner.add_delta_(y, x)


def _runner(experts: ModuleExperts, dtype: torch.dtype, mixing: str):
    return prepare(experts.to(dtype=dtype), K, TEMP, mixing, dtype=dtype)


def _check(ours, module_or_modules, dtype, mixing, what):
    mods = module_or_modules if isinstance(module_or_modules, list) else [module_or_modules]
    ref64 = torch.cat([m.ref64(mixing) for m in mods], dim=1)
    same = torch.cat([m.unsharded(dtype, mixing) for m in mods], dim=1)
    assert_close_to_reference(ours, ref64, same, dtype, what)


def _vllm_rows_even(full_sizes, rank, tp):
    """Rows of each part that vLLM's MergedColumnParallelLinear / ColumnParallelLinear loader puts on ``rank``."""
    out, off = [], 0
    for s in full_sizes:
        n = s // tp
        out.append(torch.arange(off + rank * n, off + (rank + 1) * n))
        off += s
    return torch.cat(out)


def _vllm_rows_qkv(head, heads, kv_heads, rank, tp):
    """Rows QKVParallelLinear's loader puts on ``rank``: q by rank, k/v by ``rank // replicas`` (one head each when
    there are fewer key/value heads than ranks)."""
    q_n = heads // tp * head
    replicas = max(1, tp // kv_heads)
    kv_n = max(1, kv_heads // tp) * head
    kv_rank = rank // replicas
    q_total, kv_total = heads * head, kv_heads * head
    return torch.cat(
        [
            torch.arange(rank * q_n, (rank + 1) * q_n),
            q_total + torch.arange(kv_rank * kv_n, (kv_rank + 1) * kv_n),
            q_total + kv_total + torch.arange(kv_rank * kv_n, (kv_rank + 1) * kv_n),
        ]
    )


def _run_column(mod: Module, rows_of, layout_of, tp, dtype, mixing):
    """Run each rank of a column-parallel layer fed by one whole module; reassemble the full output."""
    d_out = mod.w.shape[0]
    full = torch.full((T, d_out), float("nan"), dtype=dtype)
    x = mod.x.to(dtype)
    for rank in range(tp):
        rows = rows_of(rank)
        y = F.linear(x, mod.w[rows].to(dtype), mod.bias[rows].to(dtype))
        layout = layout_of(rank)
        routing = ShardedRouting(
            [RoutedPart(_runner(slice_rows(mod.experts, layout), dtype, mixing), 0, "m")],
            y.shape[1],
            partial_scores=False,
        )
        routing.forward_delta_(y, x, all_reduce=None)
        full[:, rows] = y
    assert not torch.isnan(full).any(), "every output row must be produced by some rank"
    return full


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_column_parallel_plain(tp, dtype, mixing):
    mod = Module(24, 40, seed=1, shared_scaling=mixing == "weights")
    ours = _run_column(
        mod, lambda r: _vllm_rows_even([40], r, tp), lambda r: even_column_layout([40], r, tp), tp, dtype, mixing
    )
    _check(ours, mod, dtype, mixing, f"column tp={tp}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_column_gate_up(tp, dtype):
    """Phi-3's gate_up_proj: one library module over a fused [gate | up] layer; each rank holds a shard of both."""
    inter = 16
    mod = Module(24, 2 * inter, seed=2)
    ours = _run_column(
        mod,
        lambda r: _vllm_rows_even([inter, inter], r, tp),
        lambda r: even_column_layout([inter, inter], r, tp),
        tp,
        dtype,
        "output",
    )
    _check(ours, mod, dtype, "output", f"gate_up tp={tp}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_qkv_fused_module(tp, heads, kv_heads, dtype):
    """Phi-3's qkv_proj: one library module over [q | k | v]; with 2 key/value heads and 4 ranks, each key/value head
    is replicated on 2 ranks."""
    head = 4
    d_out = (heads + 2 * kv_heads) * head
    mod = Module(24, d_out, seed=3)
    ours = _run_column(
        mod,
        lambda r: _vllm_rows_qkv(head, heads, kv_heads, r, tp),
        lambda r: qkv_column_layout(head, head, heads, kv_heads, r, tp),
        tp,
        dtype,
        "output",
    )
    _check(ours, mod, dtype, "output", f"qkv tp={tp} heads={heads}/{kv_heads}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_from_separate_modules(tp, dtype):
    """Phi-2: vLLM fuses q/k/v into one layer but the library has q_proj, k_proj, v_proj, each with its own experts and
    prototypes, all routing the same input; each module's delta goes into its own columns of the rank's output."""
    head, heads, kv_heads, d_in = 4, 4, 2, 24
    q = Module(d_in, heads * head, seed=4)
    k = Module(d_in, kv_heads * head, seed=5, x=q.x)
    v = Module(d_in, kv_heads * head, seed=6, x=q.x)
    w = torch.cat([q.w, k.w, v.w])
    bias = torch.cat([q.bias, k.bias, v.bias])
    x = q.x.to(dtype)
    full = torch.full((T, w.shape[0]), float("nan"), dtype=dtype)
    for rank in range(tp):
        rows = _vllm_rows_qkv(head, heads, kv_heads, rank, tp)
        y = F.linear(x, w[rows].to(dtype), bias[rows].to(dtype))
        layout = qkv_column_layout(head, head, heads, kv_heads, rank, tp)
        parts = [
            RoutedPart(_runner(slice_rows(m.experts, [p], relative=True), dtype, "output"), p.local_offset, n)
            for m, p, n in zip((q, k, v), layout, "qkv")
        ]
        ShardedRouting(parts, y.shape[1], partial_scores=False).forward_delta_(y, x, all_reduce=None)
        full[:, rows] = y
    assert not torch.isnan(full).any()
    _check(full, [q, k, v], dtype, "output", f"separate q/k/v tp={tp}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_row_parallel_all_reduced_scores(tp, dtype, mixing):
    """o_proj / down_proj / dense / fc2: partial scores summed over ranks before top-k, partial deltas summed by the
    layer's own all-reduce, bias from rank 0 only."""
    d_in, d_out = 32, 20
    mod = Module(d_in, d_out, seed=7, shared_scaling=mixing == "weights")
    x = mod.x.to(dtype)
    ranks = []
    for rank in range(tp):
        lo, hi = row_columns(d_in, rank, tp)
        runner = _runner(slice_columns(mod.experts, lo, hi), dtype, mixing)
        routing = ShardedRouting([RoutedPart(runner, 0, "m")], d_out, partial_scores=tp > 1)
        ranks.append((routing, x[:, lo:hi].contiguous(), lo, hi))
    partial = [routing.route_scores(xr) for routing, xr, _, _ in ranks]
    scores = torch.stack(partial).sum(0)  # what the all-reduce gives every rank
    full_runner = _runner(mod.experts, dtype, mixing)
    _, idx_full = full_runner.route(x)
    _, idx_sharded = torch.topk(scores.abs(), K, dim=-1)
    assert torch.equal(idx_sharded, idx_full), "the all-reduced scores must pick the unsharded layer's experts"
    out = torch.zeros(T, d_out, dtype=dtype)
    for rank, (routing, xr, lo, hi) in enumerate(ranks):
        y = F.linear(xr, mod.w[:, lo:hi].to(dtype), mod.bias.to(dtype) if rank == 0 else None)
        routing.add_delta_(y, xr, scores if tp > 1 else None)
        out += y.to(dtype)  # the layer's output all-reduce
    _check(out, mod, dtype, mixing, f"row tp={tp}")


def test_partial_scores_alone_would_route_differently():
    """Why the scores are all-reduced: routing each rank on its own columns picks other experts for some tokens."""
    d_in, tp = 32, 4
    mod = Module(d_in, 20, seed=7)
    _, idx_full = prepare(mod.experts.to(dtype=torch.float32), K, TEMP).route(mod.x.float())
    lo, hi = row_columns(d_in, 0, tp)
    local = prepare(slice_columns(mod.experts, lo, hi).to(dtype=torch.float32), K, TEMP)
    _, idx_local = local.route(mod.x[:, lo:hi].float().contiguous())
    assert not torch.equal(idx_local, idx_full)


def test_bad_layouts_are_value_errors():
    with pytest.raises(ValueError, match="does not split"):
        even_column_layout([10], 0, 4)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        row_columns(8, 2, 2)
    with pytest.raises(ValueError, match="replicated evenly"):
        qkv_column_layout(4, 4, 6, 4, 0, 6)
    with pytest.raises(ValueError, match="does not fit"):
        column_layout([8], [4], [2])
    mod = Module(8, 12, seed=0)
    with pytest.raises(ValueError, match="columns"):
        slice_columns(mod.experts, 4, 9)
    runner = prepare(mod.experts.to(dtype=torch.float32), K, TEMP)
    with pytest.raises(ValueError, match="all-reduced"):
        ShardedRouting([RoutedPart(runner, 0, "m")], 12, partial_scores=True).add_delta_(
            torch.zeros(T, 12), mod.x.float()
        )
    with pytest.raises(ValueError, match="exceed"):
        ShardedRouting([RoutedPart(runner, 4, "m")], 12, partial_scores=False)
