"""The dispatch table: regimes for the benchmark and cost-model shapes, block-size invariants the kernels rely on, the
decode grids filling the GPU at T = 1 and T = 16 (E = 256 included), the one plan cache, launches per call, and bad
input."""

from __future__ import annotations

import itertools

import pytest
import torch
from genknowsub_fast.triton_kernels import dispatch
from genknowsub_fast.triton_kernels.dispatch import MIN_DOT, MODE_DENSE, MODE_ROUTE, LayerSpec, choose_plan, plan_for

H100 = ((9, 0), 132)
A100 = ((8, 0), 108)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("t", [1, 16, 17, 256, 4096])
def test_benchmark_regimes(t):
    """Decode up to T = 16; beyond, dense while the padded E·r block is at most 256 columns, grouped above."""
    for (e, r), prefill in (((10, 4), "dense"), ((64, 8), "grouped"), ((10, 16), "dense"), ((256, 16), "grouped")):
        regime = choose_plan(t, e, r, 3, 3072, 3072, torch.bfloat16, *H100).regime
        assert regime == ("decode" if t <= dispatch.DECODE_MAX_T else prefill), (e, r, t)
    assert dispatch.dense_columns(10, 16) == 256 and dispatch.dense_columns(64, 8) == 512


GRID = list(
    itertools.product(
        [0, 1, 7, 16, 33, 256, 4096],  # T
        [(1, 1), (3, 7), (10, 4), (16, 4), (64, 8), (8, 32), (256, 16)],  # (E, r)
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
    d_in = 3072
    p = choose_plan(t, e, r, k, d_in, 5000, dtype, cap, sms, scores)
    if p.regime == "decode":
        d = p.decode
        assert all(_pow2(b) for b in (d.block_e, d.block_r, d.block_kk, d.block_n, d.route_block_e)), d
        assert all(_pow2(b) for b in (d.route_chunk, d.shrink_chunk)), d
        assert d.block_e >= e and d.block_r >= r and d.block_kk >= k and d.block_kr == d.block_kk * d.block_r
        # The partial-score rows are exactly BLOCK_E wide (the shrink reads them without a column mask).
        assert d.route_cols == d.block_e and d.route_block_e >= MIN_DOT and d.route_block_k >= MIN_DOT
        assert (d.route_splits == 0) == scores
        for splits, kps, bk in ((d.route_splits, d.route_k_per_split, d.route_block_k),
                                (d.shrink_splits, d.shrink_k_per_split, d.shrink_block_k)):  # fmt: skip
            if splits:
                assert kps % bk == 0 and kps % 16 == 0 and (splits - 1) * kps < d_in <= splits * kps
        assert d.route_chunk * d.block_e >= dispatch.MIN_TILE or d.route_chunk >= d.route_splits
        assert d.route_chunk * d.block_e <= dispatch.ACC_ELEMS_MAX or d.route_chunk * d.block_e <= dispatch.MIN_TILE
        assert d.block_kr * d.block_n <= dispatch.DECODE_EXPAND_TILE or d.block_n == MIN_DOT
        if sms is None:
            assert d.route_splits in (0, 1) and d.shrink_splits == 1
        elif not scores:
            # Each shrink program re-reads its token's partial scores from every route slice: bounded per token.
            assert d.route_splits * d.block_e * 4 <= dispatch.ROUTE_PARTIALS_MAX or d.route_splits == 1
        return
    ro = p.route
    assert all(_pow2(b) for b in (ro.block_t, ro.block_k, ro.block_e, ro.block_ea, ro.block_r, ro.block_kk)), p
    assert _pow2(ro.split_chunk) and _pow2(ro.score_chunk)
    # tl.dot operands: every dot dimension >= 16 (shapes below 16 fail on GPUs though the interpreter runs them).
    assert ro.block_t >= MIN_DOT and ro.block_k >= MIN_DOT and ro.block_e >= MIN_DOT
    assert ro.block_e >= e and ro.block_ea >= e and ro.block_r >= r and ro.block_kk >= k
    assert ro.pieces == (1 if dtype == torch.float32 else 3)
    if ro.mode == MODE_DENSE:
        assert MIN_DOT <= ro.na <= dispatch.DENSE_MAX_NA
    budget = dispatch.ROUTE_ACC_ELEMS_MAX if dtype != torch.float32 else dispatch.FP32_ACC_ELEMS_MAX
    assert ro.block_t * (ro.block_e + ro.na) <= budget or ro.block_t == MIN_DOT
    elt = torch.empty((), dtype=dtype).element_size()
    if ro.num_stages == 3:
        assert 3 * (ro.block_t + ro.block_e + ro.na) * ro.block_k * elt <= dispatch.smem_limit(cap)
    if sms is None:
        assert ro.split_k == 1
    else:
        n_tblocks = max(1, -(-t // ro.block_t))
        assert ro.split_k == 1 or n_tblocks * (ro.split_k - 1) < sms
    if p.regime == "dense":
        ex = p.expand
        assert ro.mode == MODE_DENSE and not ro.count_pairs
        assert min(ex.block_t, ex.block_n, ex.block_kc) >= MIN_DOT and ro.na % ex.block_kc == 0
        # The fused base GEMM is the table's choice for 16-bit calls of 256 tokens or more.
        assert ex.fuse_base == (dtype != torch.float32 and t >= 256)
    else:
        g = p.grouped
        assert ro.mode == MODE_ROUTE and ro.count_pairs
        assert min(g.block_m, g.block_k, g.block_n, g.block_r) >= MIN_DOT and g.block_r >= r
        assert g.fp32_accumulate == (dtype == torch.bfloat16 and cap is not None and cap < (9, 0))


@pytest.mark.parametrize("shape", [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)])
@pytest.mark.parametrize("er", [(10, 4), (64, 8), (256, 16)])
@pytest.mark.parametrize("t", [1, 16])
def test_decode_grids_fill_the_gpu(shape, er, t):
    """At T = 1 and T = 16 the route and shrink kernels each run at least one program per two SMs, every program
    over a slice of d_in (no single program walks all of d_in), and the expand covers d_out: the slice counts do not
    collapse at T = 16, E = 256 (a bound per token block once forced a single slice there)."""
    d_in, d_out = shape
    for cap, sms in (H100, A100):
        p = choose_plan(t, *er, 3, d_in, d_out, torch.bfloat16, cap, sms).decode
        route = p.route_grid(t)
        assert route[0] * route[1] * route[2] >= sms / 2, (route, sms)
        assert p.route_k_per_split <= d_in // 8 and p.route_splits > 1
        shrink = p.shrink_grid(t)
        assert shrink[0] * shrink[1] >= sms / 8
        assert p.shrink_k_per_split <= dispatch.DECODE_SHRINK_STEPS * p.shrink_block_k
        assert p.expand_grid(t, d_out)[0] * p.block_n >= d_out


def test_the_one_plan_cache():
    """plan_for caches per (spec, T, flags); a spec hashes once; choose_plan itself caches nothing."""
    spec = LayerSpec(10, 4, 3, 3072, 3072, torch.bfloat16, *H100)
    a = plan_for(spec, 1)
    hits = plan_for.cache_info().hits
    assert plan_for(LayerSpec(10, 4, 3, 3072, 3072, torch.bfloat16, *H100), 1) is a
    assert plan_for.cache_info().hits == hits + 1
    assert not hasattr(choose_plan, "cache_info")
    assert plan_for(spec, 1, True) is not a and plan_for(spec, 300, True, False) is not plan_for(spec, 300)


def _launches(t, e, r, scores=False, fuse=None, weight=True):
    from tools import aot

    layer = aot.meta_layer(90, 1024, 384, e, r, 3, torch.bfloat16, fuse_base=fuse)
    return [ln.name for ln in aot.record_call(layer, t, scores, weight)]


def test_launches_per_call():
    """Decode: route + shrink + expand (shrink + expand with caller scores); dense: route + (fused) expand; grouped:
    route + scatter + grouped shrink + grouped expand; the route pass adds its finalising program when split."""
    decode = ["_decode_route_kernel", "_decode_shrink_kernel", "_decode_expand_kernel"]
    assert _launches(1, 10, 4) == decode
    assert _launches(16, 256, 16) == decode
    assert _launches(16, 64, 8, scores=True) == decode[1:]
    assert _launches(16384, 10, 4) == ["_route_shrink_kernel", "_expand_dense_kernel"]
    assert _launches(16384, 10, 4, weight=False) == ["_route_shrink_kernel", "_expand_dense_kernel"]
    assert _launches(64, 10, 4) == ["_route_shrink_kernel"] * 2 + ["_expand_dense_kernel"]
    grouped = ["_route_shrink_kernel", "_scatter_kernel", "_grouped_shrink_kernel", "_grouped_expand_kernel"]
    assert _launches(16384, 64, 8) == grouped


def test_overrides_and_bad_input():
    p = choose_plan(1, 64, 8, 3, 3072, 3072, torch.float16, None, None, False, "grouped", 5)
    assert p.regime == "grouped" and p.route.split_k == 5
    fused = choose_plan(300, 10, 4, 3, 3072, 3072, torch.float16, None, None, False, "dense", None, True)
    assert fused.expand.fuse_base
    delta_only = choose_plan(300, 10, 4, 3, 3072, 3072, torch.float16, None, None, False, "dense", None, True, False)
    assert not delta_only.expand.fuse_base, "a call without a base weight cannot fuse it"
    forced = choose_plan(1, 10, 4, 3, 3072, 3072, torch.float16, *H100, False, "decode", 3)
    assert forced.decode.route_splits == 3 and forced.decode.shrink_splits == 3
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
