"""The dispatch table: regimes for the benchmark shapes, block-size invariants the kernels rely on, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from genknowsub_fast.triton_kernels import dispatch
from genknowsub_fast.triton_kernels.dispatch import MIN_DOT, MODE_DENSE, MODE_GATHER, MODE_ROUTE, choose_plan

H100 = ((9, 0), 132)
A100 = ((8, 0), 108)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("t", [1, 16, 256, 4096])
def test_benchmark_regimes(t):
    """E=10 r=4 (E·r = 40) is dense at every T; E=64 r=8 gathers while T·k <= E and groups beyond."""
    assert choose_plan(t, 10, 4, 3, 3072, 3072, torch.bfloat16, *H100).expand.kind == "dense"
    kind = choose_plan(t, 64, 8, 3, 3072, 3072, torch.bfloat16, *H100).expand.kind
    assert kind == ("gather" if t * 3 <= 64 else "grouped")


def test_regime_boundaries():
    assert dispatch.shrink_regime(1, 16, 4, 2) == "dense"  # E·r = 64 = DENSE_MAX_ER
    assert dispatch.shrink_regime(1, 13, 5, 2) == "gather"  # 65
    assert dispatch.shrink_regime(6, 13, 5, 2) == "gather"  # T·k = 12 <= 13
    assert dispatch.shrink_regime(7, 13, 5, 2) == "grouped"


GRID = list(
    itertools.product(
        [0, 1, 7, 16, 33, 256, 4096],  # T
        [(1, 1), (3, 7), (10, 4), (16, 4), (64, 8), (8, 32)],  # (E, r)
        [1, 3],  # k (clamped to E)
        [torch.float16, torch.bfloat16, torch.float32],
        [None, A100, H100],
    )
)


def test_plan_invariants():
    """Every plan over a grid of (T, E, r, k, dtype, device) keeps the invariants the kernels rely on."""
    for t, er, k, dtype, dev in GRID:
        _check_plan(t, er, k, dtype, dev)


def _check_plan(t, er, k, dtype, dev):
    e, r = er
    k = min(k, e)
    cap, sms = dev if dev else (None, None)
    p = choose_plan(t, e, r, k, 3072, 5000, dtype, cap, sms)
    ro, ex = p.route, p.expand
    blocks = [ro.block_t, ro.block_k, ro.block_e, ro.block_ea, ro.block_r, ro.block_kk, ro.gather_block_k]
    blocks += [ex.block_t, ex.block_n, ex.block_r, ex.block_kk]
    assert all(_pow2(b) for b in blocks), p
    # tl.dot operands: every dot dimension >= 16 (shapes below 16 fail on GPUs though the interpreter runs them).
    assert ro.block_t >= MIN_DOT and ro.block_k >= MIN_DOT and ro.block_e >= MIN_DOT
    if ro.mode == MODE_DENSE:
        assert ro.block_ea * ro.block_r >= MIN_DOT
    assert ro.block_e >= e and ro.block_ea >= e and ro.block_r >= r and ro.block_kk >= k
    if ex.kind == "dense":
        assert ex.block_t >= MIN_DOT and ex.block_n >= MIN_DOT and ex.block_kc >= MIN_DOT
    if ex.kind == "grouped":
        g = ex.grouped
        assert min(g.block_m, g.block_k, g.block_n, g.block_r) >= MIN_DOT and g.block_r >= r
        assert ro.mode == MODE_ROUTE
        assert g.fp32_accumulate == (dtype == torch.bfloat16 and cap is not None and cap < (9, 0))
    if ex.kind == "gather":
        assert ro.mode == MODE_GATHER
    # Register budget of the float32 accumulators / product tiles (dispatch.ACC_ELEMS_MAX).
    nw = ro.block_e + (ro.block_ea * ro.block_r if ro.mode == MODE_DENSE else 0)
    assert ro.block_t * nw <= dispatch.ACC_ELEMS_MAX or ro.block_t == MIN_DOT
    if ro.mode == MODE_GATHER:
        assert ro.block_t * ro.block_kk * ro.block_r * ro.gather_block_k <= dispatch.ACC_ELEMS_MAX
    if ex.kind == "gather":
        assert ex.block_t * ex.block_kk * ex.block_r * ex.block_n <= dispatch.ACC_ELEMS_MAX
    # Shared memory: three stages only where they fit on the device.
    elt = torch.empty((), dtype=dtype).element_size()
    if ro.num_stages == 3:
        assert 3 * (ro.block_t + nw) * ro.block_k * elt <= dispatch.smem_limit(cap)
    # Split-K only with a known SM count, and never past the available token-block parallelism.
    if sms is None:
        assert ro.split_k == 1
    else:
        n_tblocks = max(1, -(-t // ro.block_t))
        assert ro.split_k == 1 or n_tblocks * (ro.split_k - 1) < sms


def test_split_k_fills_the_device_for_decode():
    p = choose_plan(1, 64, 8, 3, 3072, 3072, torch.bfloat16, *H100)
    assert p.route.split_k == 3072 // (4 * p.route.block_k)  # capped by MIN_K_PER_SPLIT = 4·BLOCK_K
    assert choose_plan(16384, 64, 8, 3, 3072, 3072, torch.bfloat16, *H100).route.split_k == 1


def test_overrides_and_bad_input():
    p = choose_plan(1, 64, 8, 3, 3072, 3072, torch.float16, None, None, regime="grouped", split_k=5)
    assert p.expand.kind == "grouped" and p.route.split_k == 5
    with pytest.raises(ValueError, match="regime"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.float32, None, None, regime="fast")
    with pytest.raises(ValueError, match="split_k"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.float32, None, None, split_k=0)
    with pytest.raises(ValueError, match="top_k"):
        choose_plan(4, 3, 2, 4, 16, 8, torch.float32, None, None)
    with pytest.raises(ValueError, match="rank"):
        choose_plan(4, 3, 0, 2, 16, 8, torch.float32, None, None)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        choose_plan(4, 3, 2, 2, 16, 8, torch.int8, None, None)
