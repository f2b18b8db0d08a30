"""Expand kernels (dense, with and without the fused base GEMM, and grouped) with the routing passed in, against
reference.expand_with_routing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from genknowsub_fast.triton_kernels.dispatch import choose_plan

from tests.tolerances import LOW_PRECISION_ADD_ORDER
from tests.triton_kernels.helpers import (
    DEVICE,
    DTYPES,
    check,
    dense_coefficients,
    make_problem,
    random_routing,
    reference,
    require_triton,
    shrink_coefficients,
)


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


def _pairs(idx32: torch.Tensor, num_experts: int, block_m: int, block_t: int = 16, block_e: int | None = None):
    """align_pairs_by_expert on idx as the route pass leaves it: whole blocks of ``block_t`` rows (rows past T hold
    BLOCK_E) and each block's pairs per expert."""
    from genknowsub_fast.triton_kernels.dispatch import cdiv, next_pow2
    from genknowsub_fast.triton_kernels.grouped import align_pairs_by_expert

    t, k = idx32.shape
    block_e = block_e or max(16, next_pow2(num_experts))
    rows = cdiv(t, block_t) * block_t
    padded = torch.full((rows, k), block_e, dtype=torch.int32, device=idx32.device)
    padded[:t] = idx32
    blocks = padded.cpu().long().view(-1, block_t * k)
    counts = torch.stack([torch.bincount(b[b < num_experts], minlength=block_e) for b in blocks]) if t else None
    counts = counts if counts is not None else torch.zeros(0, block_e, dtype=torch.long)
    return align_pairs_by_expert(padded, counts.to(device=idx32.device, dtype=torch.int32), t, num_experts, block_m,
                                 block_t)  # fmt: skip


def _expand(prob, dtype, idx, w, mixing, regime, accumulate, y0=None, fp32_accumulate=None, fuse=False):
    """Run the regime's expand for the given routing; returns y (T, d_out)."""
    from genknowsub_fast.triton_kernels.expand import expand_dense_
    from genknowsub_fast.triton_kernels.grouped import grouped_expand_, grouped_shrink

    layer = prob.layer(dtype, idx.shape[1], 1.0, mixing).experts
    t, k = idx.shape
    e, r = prob.num_experts, prob.rank
    x = prob.x.to(device=DEVICE, dtype=dtype)
    plan = choose_plan(t, e, r, k, x.shape[1], layer.d_out, dtype, None, None, False, regime, None, fuse)
    y = torch.full((t, layer.d_out), float("nan"), device=DEVICE, dtype=dtype) if y0 is None else y0.clone()
    idx32 = idx.to(device=DEVICE, dtype=torch.int32)
    w32 = w.to(device=DEVICE, dtype=torch.float32)
    if regime == "grouped":
        gp = plan.grouped
        if fp32_accumulate is not None:
            gp = dataclasses.replace(gp, fp32_accumulate=fp32_accumulate)
        pairs, bexp = _pairs(idx32, e, gp.block_m)
        hw = grouped_shrink(layer, x, w32, pairs, bexp, gp)
        if not accumulate:
            y.zero_()
        return grouped_expand_(layer, y, hw, w32, pairs, bexp, gp)
    # Coefficients as the route pass hands them over: dense (T, NA) in the compute dtype, from the given routing.
    g = shrink_coefficients(prob.x, prob.a, w, idx, mixing)
    c = dense_coefficients(g, idx, e, plan.route.block_r, plan.route.na).to(device=DEVICE, dtype=dtype)
    cast = prob.cast(dtype)
    return expand_dense_(layer, y, c, plan.expand, accumulate, x, cast["weight"], cast["bias"])


# (T, E, r, d_in, d_out, k)
SHAPES = [
    (1, 1, 1, 17, 19, 1),
    (4, 5, 3, 23, 70, 2),
    (7, 3, 2, 18, 33, 3),
    (35, 6, 4, 21, 130, 3),
    (2, 9, 32, 20, 40, 4),
    (24, 256, 2, 20, 24, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-r{}-din{}-dout{}-k{}".format(*s))
@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_expand_matches_reference(dtype, shape, regime, mixing):
    t, e, r, d_in, d_out, k = shape
    prob = make_problem(t, e, r, d_in, d_out, seed=t + 13 * e, shared_scaling=mixing == "weights", margin=False)
    idx, w = random_routing(t, e, k, seed=t)
    y = _expand(prob, dtype, idx, w, mixing, regime, accumulate=False)
    ref64 = reference.expand_with_routing(prob.x, prob.a, prob.b, prob.scaling, w, idx, mixing)
    ref_same = reference.expand_with_routing(
        prob.x.to(dtype), prob.a.to(dtype), prob.b.to(dtype), prob.scaling.to(dtype), w.to(dtype), idx, mixing
    )
    check(y, ref64, ref_same, dtype, f"{regime} expand ({mixing})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_expand_accumulates_into_y(dtype, regime):
    """With accumulate the delta is added to what y holds (a base output of the delta's magnitude, so the tolerance
    does not grow with a large base), not written over it."""
    prob = make_problem(9, 4, 2, 19, 41, seed=4, margin=False)
    idx, w = random_routing(9, 4, 2, seed=2)
    base64 = 0.1 * (prob.x @ prob.weight.T + prob.bias)
    y = _expand(prob, dtype, idx, w, "output", regime, True, y0=base64.to(device=DEVICE, dtype=dtype))
    delta64 = reference.expand_with_routing(prob.x, prob.a, prob.b, prob.scaling, w, idx, "output")
    same = reference.expand_with_routing(
        prob.x.to(dtype), prob.a.to(dtype), prob.b.to(dtype), prob.scaling.to(dtype), w.to(dtype), idx, "output"
    )
    check(y, base64 + delta64, base64.to(dtype) + same, dtype, f"{regime} accumulate")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_base_gemm(dtype):
    """The dense expand with the base GEMM in the kernel writes x Wᵀ + bias + delta (y's contents are ignored); with
    a zero weight and bias its output is the delta alone."""
    prob = make_problem(40, 4, 3, 70, 45, seed=6, margin=False)
    idx, w = random_routing(40, 4, 2, seed=4)
    cast = [t.to(dtype) for t in (prob.x, prob.a, prob.b, prob.scaling)]
    delta64 = reference.expand_with_routing(prob.x, prob.a, prob.b, prob.scaling, w, idx, "output")
    same = reference.expand_with_routing(*cast, w.to(dtype), idx, "output")
    weight, bias = prob.weight, prob.bias
    prob.weight, prob.bias = torch.zeros_like(weight), torch.zeros_like(bias)
    check(_expand(prob, dtype, idx, w, "output", "dense", True, fuse=True), delta64, same, dtype, "fused, delta alone")
    prob.weight, prob.bias = 0.1 * weight, 0.1 * bias  # a base of the delta's magnitude
    y = _expand(prob, dtype, idx, w, "output", "dense", True, fuse=True)
    base64 = prob.x @ prob.weight.T + prob.bias
    base_same = prob.x.to(dtype) @ prob.weight.to(dtype).T + prob.bias.to(dtype)
    check(y, base64 + delta64, base_same + same, dtype, "fused base GEMM + dense expand")


def test_grouped_fp32_accumulate_path():
    """The float32-buffer variant of the grouped expand (bf16 before sm_90) gives the same sums."""
    prob = make_problem(12, 5, 3, 20, 37, seed=8, margin=False)
    idx, w = random_routing(12, 5, 3, seed=3)
    base = (prob.x @ prob.weight.T).to(device=DEVICE, dtype=torch.float16)
    direct = _expand(prob, torch.float16, idx, w, "output", "grouped", True, y0=base, fp32_accumulate=False)
    buffered = _expand(prob, torch.float16, idx, w, "output", "grouped", True, y0=base, fp32_accumulate=True)
    ref64 = prob.x @ prob.weight.T + reference.expand_with_routing(
        prob.x, prob.a, prob.b, prob.scaling, w, idx, "output"
    )
    check(buffered, ref64, direct.double(), torch.float16, "fp32-buffer grouped expand vs direct atomics")
    torch.testing.assert_close(buffered, direct, **LOW_PRECISION_ADD_ORDER)


def test_align_pairs_by_expert():
    """Every (token, slot) pair appears once, inside a block of its expert; padding and spare blocks are marked."""
    t, e, k, bm = 23, 7, 3, 4
    idx, _ = random_routing(t, e, k, seed=5)
    idx[:, 0] = 2  # one crowded expert; some experts may get nothing
    pairs, bexp = _pairs(idx.to(DEVICE, torch.int32), e, bm, block_t=16)
    pairs, bexp = pairs.cpu().long(), bexp.cpu().long()
    n = t * k
    assert pairs.numel() == bexp.numel() * bm
    real = pairs[pairs < n]
    assert torch.equal(real.sort().values, torch.arange(n)), "each pair exactly once"
    block_of = torch.arange(pairs.numel()) // bm
    flat = idx.reshape(-1)
    valid = pairs < n
    assert torch.equal(flat[pairs[valid]], bexp[block_of[valid]]), "pair inside a block of its expert"
    assert torch.all(pairs[bexp[block_of] < 0] == n), "blocks past the end hold only padding"
    counts = torch.bincount(flat, minlength=e)
    assert int((bexp >= 0).sum()) == int(((counts + bm - 1) // bm).sum()), "one run of blocks per expert"
    assert torch.all(bexp[: int((bexp >= 0).sum())] >= 0), "used blocks come first"
    for ex in range(e):
        mine = pairs[valid][flat[pairs[valid]] == ex]
        assert torch.all(mine[1:] > mine[:-1]), "pairs keep their order within an expert"
