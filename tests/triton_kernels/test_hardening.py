"""Checks for failure modes a real GPU has and the interpreter does not: grid limits, empty batches through every
kernel entry point, and (GPU only) offsets past 2^31 elements."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels import launch as launch_mod

from tests.triton_kernels.helpers import DEVICE, check, make_problem, require_triton


def test_grid_limits_are_checked_before_launch():
    """CUDA allows 65535 blocks on grid axes 1 and 2; a larger grid is a clear ValueError, never a launch failure."""
    launch_mod.check_grid("k", (2**31 - 1, 65535, 65535))
    for grid in [(1, 65536), (1, 1, 65536), (2**31, 1), (1, 1, 1, 1)]:
        with pytest.raises(ValueError, match="grid"):
            launch_mod.check_grid("k", grid)
    # Recorded launches go through the same check: a dense expand over a (fake) output wider than 65535 column blocks.
    from tools import aot

    layer = aot.meta_layer(90, 64, 65536 * 64 + 1, 10, 4, 3, torch.float16)
    with pytest.raises(ValueError, match="exceeds the CUDA limits"):
        aot.record_call(layer, 17)


def test_table_grids_fit_for_the_benchmark_shapes():
    """Every launch the table makes for the AOT problem set (recorded, not run) has a legal grid."""
    from tools import aot

    launches = aot.record_table_launches(90, (torch.bfloat16,))
    assert launches
    for ln in launches:
        launch_mod.check_grid(ln.name, ln.grid)
        assert all(g >= 1 for g in ln.grid), (ln.name, ln.grid)


def test_empty_batch_every_entry_point():
    """T = 0 launches nothing (a zero-size grid is an error on a GPU) and returns well-formed empty outputs, in every
    regime, with and without a base weight and caller scores."""
    require_triton()
    prob = make_problem(0, 4, 2, 20, 9, margin=False)
    x = torch.empty(0, 20, device=DEVICE)
    weight = torch.randn(9, 20, device=DEVICE)
    with launch_mod.recording() as rec:
        for regime in ("decode", "dense", "grouped"):
            layer = prob.layer(torch.float32, 3, 1.0, regime=regime)
            assert layer(x).shape == (0, 9)
            assert layer(x, weight).shape == (0, 9)
            y = torch.empty(0, 9, device=DEVICE)
            assert layer.add_delta_(y, x, torch.empty(0, 4, device=DEVICE)) is y
    assert rec == [], [ln.name for ln in rec]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (about 4.5 GB of GPU memory)")
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
def test_offsets_past_int32_on_gpu(er):
    """x with more than 2^31 elements: every row offset must be 64-bit. The last rows are checked against the
    reference (an int32 offset would wrap and read or write the wrong rows)."""
    e, r = er
    d_in, d_out, tail = 8192, 48, 64
    t = 2**31 // d_in + 4096  # 266240 tokens: x has 2.18e9 elements
    prob = make_problem(tail, e, r, d_in, d_out, seed=5)
    layer = prob.layer(torch.bfloat16, 3, 1.0)
    x = torch.zeros(t, d_in, device="cuda", dtype=torch.bfloat16)
    x[-tail:] = prob.x.to(device="cuda", dtype=torch.bfloat16)
    w = prob.weight.to(device="cuda", dtype=torch.bfloat16)
    y = layer(x, w)
    prob.bias = torch.zeros_like(prob.bias)
    check(y[-tail:], *prob.reference(torch.bfloat16, 3, 1.0), torch.bfloat16, f"rows past 2^31 elements, E={e} r={r}")
    del x
    torch.cuda.empty_cache()
