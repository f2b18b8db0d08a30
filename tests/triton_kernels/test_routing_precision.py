"""Routing scores are float32 whatever the model dtype: the prototype pieces reconstruct float32 prototypes, and
near-tied experts that 16-bit prototypes cannot tell apart are routed as the float64 reference routes them, in every
regime (decode: float32 prototypes read directly; dense / grouped: the 16-bit pieces on the tensor cores)."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels.dispatch import PIECE_BLOCK_K
from genknowsub_fast.triton_kernels.pieces import NUM_PIECES, split_prototypes

from tests.triton_kernels.helpers import DEVICE, DTYPES, check, make_problem, reference, require_triton

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_pieces_reconstruct_float32_prototypes(dtype, scale):
    """Σ_j q_j / s equals p to float32 precision (|error| <= 2^-24 max|p|), while one 16-bit copy is 2^-9 off."""
    g = torch.Generator().manual_seed(1)
    e, d_in = 5, 150
    p = (torch.randn(e, d_in, generator=g) * scale).to(torch.float32)
    pieces, inv_scale = split_prototypes(p, dtype)
    d_pad = -(-d_in // PIECE_BLOCK_K) * PIECE_BLOCK_K
    assert pieces.dtype == dtype and pieces.shape == (e, NUM_PIECES * d_pad)
    blocks = pieces.double().view(e, d_pad // PIECE_BLOCK_K, NUM_PIECES, PIECE_BLOCK_K)
    rebuilt = (blocks.sum(dim=2).reshape(e, d_pad) * inv_scale)[:, :d_in]
    amax = float(p.abs().max())
    assert float((rebuilt - p.double()).abs().max()) <= 2.0**-24 * amax
    assert torch.all(blocks.sum(dim=2).reshape(e, d_pad)[:, d_in:] == 0), "padding columns are zero"
    assert float((p.to(dtype).double() - p.double()).abs().max()) > 2.0**-12 * amax  # one piece is not enough


def _near_ties(t: int, d_in: int, seed: int):
    """A problem whose experts 0 and 1 differ in score by ~1e-5 relative: float32 prototypes order every token as
    float64 does, 16-bit prototypes cannot (their rounding is 100x the gap)."""
    prob = make_problem(t, 4, 2, d_in, 24, seed=seed, margin=False)
    g = torch.Generator().manual_seed(seed)
    p0 = prob.prototypes[0]
    delta = torch.randn(d_in, generator=g, dtype=torch.float64) * 1e-5 * float(p0.abs().mean())
    prob.prototypes[1] = p0 + delta
    prob.prototypes[2:] *= 0.05  # clearly below experts 0 and 1
    # x exactly representable in float16 and bfloat16 (small integers over a power of two).
    prob.x = torch.randint(-64, 65, (t, d_in), generator=g).double() / 64
    prob.prototypes = prob.prototypes.float().double()  # the float32 prototypes the layer holds
    return prob


@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
def test_near_ties_route_as_float64(regime):
    require_triton()
    dtype = torch.float16  # the interpreter's bfloat16 tl.dot is wrong; bfloat16 is covered on the GPU
    prob = _near_ties(12, 96, seed=5)
    w64, idx64 = reference.route(prob.x, prob.prototypes, 1, 1.0)
    _, idx16 = reference.route(prob.x, prob.prototypes.to(dtype).double(), 1, 1.0)
    assert not torch.equal(idx16, idx64), "the problem must separate float32 from 16-bit routing"
    layer = prob.layer(dtype, 1, 1.0, regime=regime)
    delta = layer(prob.x.to(device=DEVICE, dtype=dtype))
    check(delta, *prob.reference(dtype, 1, 1.0, base=False), dtype, f"near-tied routing, {regime}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_pass_weights_are_float32_accurate(dtype):
    """The route pass's softmax weights from 16-bit x: float32-level error against float64 (ATOL[float32]), not the
    16-bit dtype's."""
    from genknowsub_fast.triton_kernels.dispatch import choose_plan
    from genknowsub_fast.triton_kernels.route_shrink import route_shrink

    require_triton()
    prob = make_problem(20, 6, 2, 80, 8, seed=11)
    prob.x = prob.x.to(dtype).double()  # exact in dtype
    prob.prototypes = prob.prototypes.float().double()
    layer = prob.layer(dtype, 3, 0.05, regime="grouped")  # a low temperature magnifies score errors
    x = prob.x.to(device=DEVICE, dtype=dtype)
    plan = choose_plan(20, 6, 2, 3, 80, 8, dtype, None, None, False, "grouped")
    _, idx, w, _ = route_shrink(layer.experts, x, plan.route)
    idx = idx[:20]
    w64, idx64 = reference.route(prob.x, prob.prototypes, 3, 0.05)
    w32, _ = reference.route(prob.x.float(), prob.prototypes.float(), 3, 0.05)
    assert torch.equal(idx.cpu().long(), idx64)
    check(w, w64, w32, torch.float32, f"routing weights from {dtype} x")
