"""Checks for failure modes a real GPU has and the interpreter does not: grid limits, empty batches through every
kernel entry point, "weights" mixing on every forced regime, and (GPU only) offsets past 2^31 elements."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels import launch as launch_mod
from genknowsub_fast.triton_kernels.dispatch import choose_plan

from tests.triton_kernels.helpers import DEVICE, check, make_problem, reference, require_triton


def test_grid_limits_are_checked_before_launch():
    """CUDA allows 65535 blocks on grid axes 1 and 2; a larger grid is a clear ValueError, never a launch failure."""
    launch_mod.check_grid("k", (2**31 - 1, 65535, 65535))
    for grid in [(1, 65536), (1, 1, 65536), (2**31, 1), (1, 1, 1, 1)]:
        with pytest.raises(ValueError, match="grid"):
            launch_mod.check_grid("k", grid)
    # Recorded launches go through the same check: an expand over a (fake) 5M-wide output needs > 65535 column blocks.
    from genknowsub_fast.triton_kernels.expand import expand_

    meta = torch.device("meta")
    d_out = 65536 * 64 + 1
    plan = choose_plan(1, 10, 4, 3, 64, d_out, torch.float16, (9, 0), 132)
    y = torch.empty(1, d_out, device=meta, dtype=torch.float16)
    g = torch.empty(1, 12, device=meta)
    idx = torch.empty(1, 3, device=meta, dtype=torch.int32)
    b_t = torch.empty(10, 4, d_out, device=meta, dtype=torch.float16)
    with launch_mod.recording(), pytest.raises(ValueError, match="exceeds the CUDA limits"):
        expand_(y, g, idx, b_t, 10, 4, plan.expand, True)


def test_table_grids_fit_for_the_benchmark_shapes():
    """Every launch the table makes for the benchmark problem set (recorded, not run) has a legal grid."""
    from genknowsub_fast.triton_kernels import aot

    launches = aot.record_table_launches(90, (torch.bfloat16,))
    assert launches
    for ln in launches:
        launch_mod.check_grid(ln.name, ln.grid)
        assert all(g >= 1 for g in ln.grid), (ln.name, ln.grid)


@pytest.mark.parametrize("regime", ["dense", "gather", "grouped"])
def test_empty_batch_every_entry_point(regime):
    """T = 0 launches nothing (a zero-size grid is an error on a GPU) and returns well-formed empty outputs."""
    require_triton()
    from genknowsub_fast.triton_kernels.expand import expand_
    from genknowsub_fast.triton_kernels.grouped import align_pairs_by_expert, grouped_expand_, grouped_shrink
    from genknowsub_fast.triton_kernels.route_shrink import route_shrink

    prob = make_problem(0, 4, 2, 20, 9, margin=False)
    packed = prob.packed(torch.float32)
    x = torch.empty(0, 20, device=DEVICE)
    plan = choose_plan(0, 4, 2, 3, 20, 9, torch.float32, None, None, regime)
    with launch_mod.recording() as rec:
        g, idx, w = route_shrink(x, packed.route_shrink, 4, 2, 3, 1.0, False, plan.route)
        y = torch.empty(0, 9, device=DEVICE)
        if regime == "grouped":
            pairs, bexp = align_pairs_by_expert(idx, 4, plan.expand.grouped.block_m)
            assert pairs.numel() == 0 and bexp.numel() == 0
            hw = grouped_shrink(x, packed.route_shrink, w, pairs, bexp, 4, 2, plan.expand.grouped)
            assert hw.shape == (0, 2)
            grouped_expand_(y, hw, w, pairs, bexp, packed.b_t, 2, False, plan.expand.grouped)
        else:
            expand_(y, g, idx, packed.b_t, 4, 2, plan.expand, True)
    assert rec == [], [ln.name for ln in rec]
    assert idx.shape == (0, 3) and w.shape == (0, 3)
    out = torch.ops.genknowsub_fast.routed_linear(x, packed.route_shrink, packed.b_t, None, None, 4, 2, 3, 1.0, True,
                                                  regime)  # fmt: skip
    assert out.shape == (0, 9)


@pytest.mark.parametrize("regime", ["gather", "grouped"])
def test_weights_mixing_forced_regimes(regime):
    """mixing="weights" end to end through the custom op on the regimes the default table does not pick here."""
    require_triton()
    prob = make_problem(5, 6, 2, 21, 17, seed=21, shared_scaling=True)
    packed = prob.packed(torch.float32, "weights")
    c = lambda t: t.to(device=DEVICE, dtype=torch.float32)  # noqa: E731
    y = torch.ops.genknowsub_fast.routed_linear(
        c(prob.x), packed.route_shrink, packed.b_t, c(prob.weight), c(prob.bias), 6, 2, 3, 0.8, True, regime
    )
    args = (prob.x, prob.a, prob.b, prob.scaling, prob.prototypes, 3, 0.8, "weights", prob.weight, prob.bias)
    ref64 = reference.routed_lora(*args)
    ref32 = reference.routed_lora(*[a.float() if isinstance(a, torch.Tensor) else a for a in args])
    check(y, ref64, ref32, torch.float32, f"weights mixing, {regime}")


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
    packed = prob.packed(torch.bfloat16, "output", device=torch.device("cuda"))
    x = torch.zeros(t, d_in, device="cuda", dtype=torch.bfloat16)
    x[-tail:] = prob.x.to(device="cuda", dtype=torch.bfloat16)
    w = prob.weight.to(device="cuda", dtype=torch.bfloat16)
    y = torch.ops.genknowsub_fast.routed_linear(x, packed.route_shrink, packed.b_t, w, None, e, r, 3, 1.0, False)
    args = (prob.x, prob.a, prob.b, prob.scaling, prob.prototypes, 3, 1.0, "output", prob.weight, None)
    ref64 = reference.routed_lora(*args)
    ref_bf16 = reference.routed_lora(*[a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a for a in args])
    check(y[-tail:], ref64, ref_bf16, torch.bfloat16, f"rows past 2^31 elements, E={e} r={r}")
    del x
    torch.cuda.empty_cache()
