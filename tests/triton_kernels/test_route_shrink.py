"""Route pass of the dense and grouped regimes against genknowsub_fast.reference: routing (clear margins), weights,
dense expand coefficients, per-block pair counts, split-K phases, ties, zero prototypes, temperature."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels.dispatch import MODE_ROUTE, choose_plan

from tests.tolerances import FP32_SAME_MATH, FP32_WEIGHTS, LOW_PRECISION_ADD_ORDER
from tests.triton_kernels.helpers import (
    DEVICE,
    DTYPES,
    check,
    dense_coefficients,
    make_problem,
    reference,
    require_triton,
    shrink_coefficients,
)


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


def _run(prob, dtype, top_k, temperature, mixing, regime, split):
    from genknowsub_fast.triton_kernels.route_shrink import route_shrink

    layer = prob.layer(dtype, top_k, temperature, mixing)
    x = prob.x.to(device=DEVICE, dtype=dtype)
    e, r = prob.num_experts, prob.rank
    plan = choose_plan(x.shape[0], e, r, top_k, x.shape[1], 8, dtype, None, None, False, regime, split)
    c, idx, w, counts = route_shrink(layer.experts, x, plan.route)
    if plan.route.count_pairs:
        # Whole token blocks of idx rows, the rows past T holding BLOCK_E; counts per block and expert.
        assert idx.shape[0] % plan.route.block_t == 0 and torch.all(idx[x.shape[0] :] == plan.route.block_e)
        blocks = idx.cpu().long().view(-1, plan.route.block_t * top_k)
        expect = torch.stack([torch.bincount(b[b < e], minlength=plan.route.block_e) for b in blocks])
        assert torch.equal(counts.cpu().long(), expect)
    return c, idx[: x.shape[0]], w, plan


def _dense(prob, dtype, w, idx, mixing, plan):
    """(float64, same-dtype) dense coefficients the route pass should write for routing (w, idx)."""
    ro = plan.route
    g64 = shrink_coefficients(prob.x, prob.a, w, idx, mixing)
    g_same = shrink_coefficients(prob.x.to(dtype), prob.a.to(dtype), w.to(dtype), idx, mixing)
    return (dense_coefficients(g, idx, prob.num_experts, ro.block_r, ro.na) for g in (g64, g_same))


# (T, E, r, d_in, k): T=1, E=1, k=E, r=1, d not a multiple of 16, more tokens than one block, k·r = 128, and E=256
# (a 256-wide score block beside the shrink block; the orthonormal prototypes need d_in >= E).
SHAPES = [
    (1, 1, 1, 19, 1),
    (5, 4, 3, 37, 2),
    (3, 6, 1, 20, 6),
    (33, 5, 4, 45, 3),
    (2, 9, 32, 20, 4),
    (21, 256, 2, 263, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-r{}-d{}-k{}".format(*s))
@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_route_shrink_matches_reference(dtype, shape, regime):
    t, e, r, d_in, k = shape
    prob = make_problem(t, e, r, d_in, 11, seed=t * 100 + e)
    g, idx, w, plan = _run(prob, dtype, k, 0.7, "output", regime, None)
    w64, idx64 = reference.route(prob.x, prob.prototypes, k, 0.7)
    w_same, _ = reference.route(prob.x.to(dtype), prob.prototypes.to(dtype), k, 0.7)
    assert torch.equal(idx.cpu().long(), idx64), "routing differs although the top-k margin is clear"
    check(w, w64, w_same, dtype, "routing weights")
    if plan.route.mode == MODE_ROUTE:
        assert g.shape == (t, 0)
        return
    check(g, *_dense(prob, dtype, w64, idx64, "output", plan), dtype, f"dense coefficients ({regime})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_matches_single_pass(dtype, regime, split):
    """Split-K partial sums (PHASE 1) + the finalising program (PHASE 2) give what the single pass (PHASE 0) gives,
    up to summation order: same experts, weights and coefficients."""
    prob = make_problem(18, 5, 3, 150, 9, seed=3)
    ref = _run(prob, dtype, 2, 1.3, "output", regime, 1)
    out = _run(prob, dtype, 2, 1.3, "output", regime, split)
    assert out[3].route.split_k == split
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], **FP32_WEIGHTS)
    if dtype == torch.float32:
        torch.testing.assert_close(out[0], ref[0], **FP32_SAME_MATH)
    else:  # 16-bit coefficients: each is one rounding of float32 sums that differ in order only
        torch.testing.assert_close(out[0], ref[0], **LOW_PRECISION_ADD_ORDER)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_mixing_coefficients(dtype):
    """mixing="weights": g_j = w_j Σ_i w_i h_i, so Σ_j B_j g_j = (Σ w B)(Σ w A) x."""
    prob = make_problem(6, 4, 3, 29, 13, seed=5, shared_scaling=True)
    g, idx, w, plan = _run(prob, dtype, 3, 1.0, "weights", "dense", None)
    w64, idx64 = reference.route(prob.x, prob.prototypes, 3, 1.0)
    assert torch.equal(idx.cpu().long(), idx64)
    check(g, *_dense(prob, dtype, w64, idx64, "weights", plan), dtype, "weights-mixing coefficients")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_ties_go_to_the_lower_index(dtype, regime):
    """Exactly equal logits pick the lower expert index, as the reference's stable sort does: x = 0 (every logit 0)
    and duplicated / negated prototypes with small integers, whose dot products are exact in every dtype."""
    g = torch.Generator().manual_seed(7)
    prob = make_problem(9, 6, 2, 24, 8, seed=7, margin=False)
    p = torch.randint(-2, 3, (6, 24), generator=g).double()
    p[3] = p[1]
    p[5] = p[1]
    p[4] = -p[0]  # |x·p| ties under a sign flip too
    prob.prototypes = p
    prob.x = torch.randint(-3, 4, (9, 24), generator=g).double()
    prob.x[0] = 0  # all logits tie
    for k in (1, 2, 4, 6):
        _, idx, w, _ = _run(prob, dtype, k, 3.0, "output", regime, None)
        w64, idx64 = reference.route(prob.x, p, k, 3.0)
        assert torch.equal(idx.cpu().long(), idx64), f"k={k}"
        assert torch.equal(idx[0].cpu().long(), torch.arange(k)), "x = 0 picks experts 0..k-1"
        torch.testing.assert_close(w.cpu().double(), w64, **FP32_WEIGHTS)


def test_zero_prototype_is_chosen_last():
    """A zero prototype (ΔW = 0) has logit 0 and is only chosen when k forces it; indices stay in range."""
    prob = make_problem(5, 4, 2, 16, 8, seed=9)
    prob.prototypes[2] = 0
    _, idx, w, _ = _run(prob, torch.float32, 4, 1.0, "output", "dense", None)
    assert torch.all(idx[:, -1] == 2)
    assert torch.all((idx >= 0) & (idx < 4))
    torch.testing.assert_close(w.sum(dim=1).cpu(), torch.ones(5), **FP32_WEIGHTS)


def test_temperature_sharpens():
    """Lower temperature puts more weight on the top expert (and matches the reference)."""
    prob = make_problem(7, 5, 2, 21, 8, seed=12)
    tops = []
    for temp in (0.1, 1.0, 10.0):
        _, idx, w, _ = _run(prob, torch.float32, 3, temp, "output", "dense", None)
        w64, _ = reference.route(prob.x, prob.prototypes, 3, temp)
        torch.testing.assert_close(w.cpu().double(), w64, **FP32_WEIGHTS)
        tops.append(float(w[:, 0].mean()))
    assert tops[0] > tops[1] > tops[2]


def test_empty_batch():
    prob = make_problem(0, 3, 2, 17, 5, seed=1, margin=False)
    g, idx, w, plan = _run(prob, torch.float32, 2, 1.0, "output", "dense", None)
    assert g.shape == (0, plan.route.na) and idx.shape == (0, 2) and w.shape == (0, 2)
