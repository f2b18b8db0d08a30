"""The dispatch table: regimes for the benchmark shapes, block-size invariants the kernels rely on, the decode grid
filling the GPU, cached plans, launches per call, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from genknowsub_fast.triton_kernels import dispatch, launch
from genknowsub_fast.triton_kernels.dispatch import MIN_DOT, MODE_DENSE, MODE_ROUTE, choose_plan

H100 = ((9, 0), 132)
A100 = ((8, 0), 108)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("t", [1, 16, 17, 256, 4096])
def test_benchmark_regimes(t):
    """Decode up to T = 16; beyond, E=10 r=4 (E·r = 40) is dense and E=64 r=8 grouped."""
    for (e, r), prefill in (((10, 4), "dense"), ((64, 8), "grouped")):
        regime = choose_plan(t, e, r, 3, 3072, 3072, torch.bfloat16, *H100).regime
        assert regime == ("decode" if t <= dispatch.DECODE_MAX_T else prefill)


GRID = list(
    itertools.product(
        [0, 1, 7, 16, 33, 256, 4096],  # T
        [(1, 1), (3, 7), (10, 4), (16, 4), (64, 8), (8, 32)],  # (E, r)
        [1, 3],  # k (clamped to E)
        [torch.float16, torch.bfloat16, torch.float32],
        [None, A100, H100],
        [False, True],  # caller-given scores
    )
)


def test_plan_invariants():
    """Every plan over a grid of (T, E, r, k, dtype, device, scores) keeps the invariants the kernels rely on."""
    for t, er, k, dtype, dev, scores in GRID:
        _check_plan(t, er, min(k, er[0]), dtype, dev, scores)


def _check_plan(t, er, k, dtype, dev, scores):
    e, r = er
    cap, sms = dev if dev else (None, None)
    p = choose_plan(t, e, r, k, 3072, 5000, dtype, cap, sms, scores)
    if p.regime == "decode":
        d = p.decode
        assert all(_pow2(b) for b in (d.block_t, d.block_n, d.block_e, d.block_r, d.block_kk, d.split_chunk)), d
        assert d.shrink_block_t >= MIN_DOT and d.block_c >= MIN_DOT and d.shrink_block_k >= MIN_DOT
        assert d.block_e >= e and d.block_r >= r and d.block_kk >= k and d.block_t >= min(max(t, 1), 16)
        assert (d.n_p_blocks == 0) == scores and d.n_a_blocks * d.block_c >= e * r
        assert d.k_per_split % d.shrink_block_k == 0 and (d.k_splits - 1) * d.k_per_split < 3072
        assert d.block_t * d.block_r * d.block_n <= dispatch.ACC_ELEMS_MAX
        width = max(0 if scores else d.block_e, d.block_kk * d.block_r)
        assert d.split_chunk * d.block_t * width <= dispatch.DECODE_TILE_MAX or d.split_chunk == 1
        if sms is None:
            assert d.k_splits == 1
        else:
            per_split = d.block_t * ((0 if scores else d.block_e) + d.block_kk * d.block_r) * 4
            assert d.k_splits * per_split <= dispatch.WS_READ_MAX or d.k_splits == 1
        return
    ro = p.route
    assert all(_pow2(b) for b in (ro.block_t, ro.block_k, ro.block_e, ro.block_ea, ro.block_r, ro.block_kk)), p
    assert _pow2(ro.split_chunk)
    # tl.dot operands: every dot dimension >= 16 (shapes below 16 fail on GPUs though the interpreter runs them).
    assert ro.block_t >= MIN_DOT and ro.block_k >= MIN_DOT and ro.block_e >= MIN_DOT
    assert ro.block_e >= e and ro.block_ea >= e and ro.block_r >= r and ro.block_kk >= k
    assert ro.pieces == (1 if dtype == torch.float32 else 3)
    na = ro.block_ea * ro.block_r if ro.mode == MODE_DENSE else 0
    if ro.mode == MODE_DENSE:
        assert na >= MIN_DOT
    assert ro.block_t * (ro.block_e + 2 * na) <= dispatch.ACC_ELEMS_MAX or ro.block_t == MIN_DOT
    elt = torch.empty((), dtype=dtype).element_size()
    if ro.num_stages == 3:
        assert 3 * (ro.block_t + ro.block_e + na) * ro.block_k * elt <= dispatch.smem_limit(cap)
    if sms is None:
        assert ro.split_k == 1
    else:
        n_tblocks = max(1, -(-t // ro.block_t))
        assert ro.split_k == 1 or n_tblocks * (ro.split_k - 1) < sms
    if p.regime == "dense":
        ex = p.expand
        assert ro.mode == MODE_DENSE and not ex.fuse_base
        assert min(ex.block_t, ex.block_n, ex.block_kc) >= MIN_DOT
    else:
        g = p.grouped
        assert ro.mode == MODE_ROUTE
        assert min(g.block_m, g.block_k, g.block_n, g.block_r) >= MIN_DOT and g.block_r >= r
        assert g.fp32_accumulate == (dtype == torch.bfloat16 and cap is not None and cap < (9, 0))


@pytest.mark.parametrize("shape", [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)])
@pytest.mark.parametrize("er", [(10, 4), (64, 8)])
def test_decode_grid_fills_the_gpu_at_t1(shape, er):
    """At T = 1 the shrink runs at least one CTA per two SMs, each over a slice of d_in."""
    d_in, d_out = shape
    for cap, sms in (H100, A100):
        p = choose_plan(1, *er, 3, d_in, d_out, torch.bfloat16, cap, sms).decode
        grid = p.shrink_grid(1)
        assert grid[0] * grid[1] * grid[2] >= sms / 2, (grid, sms)
        assert p.k_per_split < d_in
        assert p.expand_grid(1, d_out)[0] * p.block_n >= d_out


def test_plans_are_cached():
    a = choose_plan(1, 10, 4, 3, 3072, 3072, torch.bfloat16, *H100)
    assert choose_plan(1, 10, 4, 3, 3072, 3072, torch.bfloat16, *H100) is a
    assert choose_plan.cache_info().hits >= 1


def _launches(t, e, r, scores=False, fuse=None):
    from genknowsub_fast.triton_kernels.linear import add_delta_

    meta = torch.device("meta")
    d_in, d_out, dt = 1024, 384, torch.bfloat16
    p = choose_plan(t, e, r, 3, d_in, d_out, dt, *H100, scores, None, None, fuse)
    new = lambda *s, dtype=dt: torch.empty(*s, device=meta, dtype=dtype)  # noqa: E731
    sc = new(t, e, dtype=torch.float32) if scores else None
    with launch.recording() as rec:
        add_delta_(
            new(t, d_out), new(t, d_in), new(e, d_in, dtype=torch.float32), new(e, 3 * d_in), 1.0, new(e * r, d_in),
            new(e, r, d_out), 3, 1.0, False, p, True, sc, new(d_out, d_in), None,
        )  # fmt: skip
    return [ln.name for ln in rec]


def test_launches_per_call():
    """Decode: 2 kernels; dense: route + expand; grouped: route + alignment + grouped shrink + grouped expand; the
    route pass adds its finalising program when split over d_in."""
    assert _launches(1, 10, 4) == ["_decode_shrink_kernel", "_decode_expand_kernel"]
    assert _launches(16, 64, 8, scores=True) == ["_decode_shrink_kernel", "_decode_expand_kernel"]
    assert _launches(16384, 10, 4) == ["_route_shrink_kernel", "_expand_dense_kernel"]
    assert _launches(16384, 10, 4, fuse=True) == ["_route_shrink_kernel", "_expand_dense_kernel"]
    assert _launches(64, 10, 4) == ["_route_shrink_kernel"] * 2 + ["_expand_dense_kernel"]
    grouped = ["_route_shrink_kernel", "_align_kernel", "_grouped_shrink_kernel", "_grouped_expand_kernel"]
    assert _launches(16384, 64, 8) == grouped


def test_overrides_and_bad_input():
    p = choose_plan(1, 64, 8, 3, 3072, 3072, torch.float16, None, None, False, "grouped", 5)
    assert p.regime == "grouped" and p.route.split_k == 5
    fused = choose_plan(300, 10, 4, 3, 3072, 3072, torch.float16, None, None, False, "dense", None, True)
    assert fused.expand.fuse_base
    with pytest.raises(ValueError, match="regime"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.float32, None, None, False, "fast")
    with pytest.raises(ValueError, match="split"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.float32, None, None, False, None, 0)
    with pytest.raises(ValueError, match="fuse_base"):
        choose_plan(400, 64, 8, 2, 16, 8, torch.float32, None, None, False, "grouped", None, True)
    with pytest.raises(ValueError, match="top_k"):
        choose_plan(4, 3, 2, 4, 16, 8, torch.float32, None, None)
    with pytest.raises(ValueError, match="rank"):
        choose_plan(4, 3, 0, 2, 16, 8, torch.float32, None, None)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.int8, None, None)
