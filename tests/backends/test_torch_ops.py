"""The portable backend against reference.py: every regime, dtype and odd shape; prototypes against the SVD."""

import pytest
import torch

from genknowsub_fast import reference
from genknowsub_fast.backends import torch_ops
from genknowsub_fast.backends.packing import pack_experts
from tests.routing_cases import make_case
from tests.tolerances import FP32_SCORES, LOW_PRECISION_WEIGHTS, assert_close_to_reference

SHAPES = [  # (T, E, r, d_in, d_out, k)
    (1, 4, 3, 19, 23, 2),
    (9, 5, 1, 33, 17, 5),  # r = 1, k = E
    (7, 1, 4, 21, 10, 1),  # E = 1
    (40, 6, 8, 70, 45, 3),
]
REGIMES = ["dense", "gather", "grouped"]


def _run(case, k, temp, mixing, regime, dtype):
    c = case.to(dtype)
    packed = pack_experts(c.a, c.b, case.scaling, c.prototypes, mixing=mixing, dtype=dtype)
    y = torch.zeros(c.x.shape[0], case.b.shape[1], dtype=dtype)
    return torch_ops.add_routed_delta_(y, c.x, packed, k, temp, regime=regime)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_regimes_match_reference(shape, regime, dtype, mixing):
    t, e, r, d_in, d_out, k = shape
    case = make_case(t, e, r, d_in, d_out, seed=t + e, shared_scaling=mixing == "weights")
    ref64 = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, k, 0.7, mixing)
    c = case.to(dtype)
    ref_lo = reference.routed_lora(c.x, c.a, c.b, case.scaling.to(dtype), c.prototypes, k, 0.7, mixing)
    ours = _run(case, k, 0.7, mixing, regime, dtype)
    assert_close_to_reference(ours, ref64, ref_lo, dtype, f"{regime} {dtype} {shape} {mixing}")


@pytest.mark.parametrize("regime", REGIMES)
def test_mixed_ranks_zero_padding(regime):
    case = make_case(11, 5, 4, 30, 20, seed=3, mixed_ranks=True)
    ref64 = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, 3, 1.0)
    ours = _run(case, 3, 1.0, "output", regime, torch.float32)
    assert_close_to_reference(ours, ref64, ref64.float(), torch.float32, regime)


@pytest.mark.parametrize("regime", REGIMES + [None])
def test_zero_tokens(regime):
    case = make_case(0, 3, 2, 8, 5)
    assert _run(case, 2, 1.0, "output", regime, torch.float32).shape == (0, 5)


def test_unknown_regime_is_an_error():
    case = make_case(2, 3, 2, 8, 5)
    with pytest.raises(ValueError, match="unknown regime"):
        _run(case, 2, 1.0, "output", "sparse", torch.float32)


def test_regime_table():
    assert torch_ops.choose_regime(512, 10, 4) == "dense"
    assert torch_ops.choose_regime(1, 64, 8) == "gather"
    assert torch_ops.choose_regime(512, 64, 8) == "grouped"


def test_route_matches_reference_with_clear_margin():
    case = make_case(25, 7, 2, 16, 4, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        x, p = case.x.to(dtype), case.prototypes.to(dtype)
        w, idx = torch_ops.route(x, p, 3, 0.5)
        # the reference routes the same (rounded) inputs in float64: scores are float32 sums, so only their rounding
        # separates the two
        w_ref, idx_ref = reference.route(x.double(), p.double(), 3, 0.5)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(w.double(), w_ref, **LOW_PRECISION_WEIGHTS)


def test_ties_go_to_the_lower_index():
    """torch.topk may return any of equal values; the regimes must pick the lower expert index, as the reference."""
    w, idx = torch_ops.route(torch.zeros(2, 64), torch.eye(64)[:40], 3, 1.0)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_scores_are_float32_in_low_precision(dtype):
    """Scores are x (exact in float32) times float32 prototypes, accumulated in float32, not in the model dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 300, generator=g).to(dtype)
    p = torch.randn(6, 300, generator=g)
    scores = torch_ops.route_scores(x, p)
    assert scores.dtype == torch.float32
    exact = x.double() @ p.double().T
    torch.testing.assert_close(scores.double(), exact, **FP32_SCORES)
