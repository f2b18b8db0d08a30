"""Decode kernels (route, shrink of the selected experts, expand) against the float64 reference, through the layer:
odd shapes, T = 1 and 16, E = 1 and 256, k = E, r = 16, slices of d_in forced, both mixings, caller scores. The delta
is checked alone (a delta-only call), so its tolerance scales with the delta."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels import launch as launch_mod

from tests.triton_kernels.helpers import DEVICE, DTYPES, check, check_delta, make_problem, reference, require_triton


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


# (T, E, r, d_in, d_out, k): T=1, E=1, r=1, k=E, d not a multiple of 16, T=16 (a full decode block), k·r = 128,
# E=256 with r=16 and d_in past 256 (the orthonormal prototypes need d_in >= E).
SHAPES = [
    (1, 1, 1, 19, 23, 1),
    (3, 5, 3, 37, 70, 5),
    (16, 6, 4, 45, 33, 3),
    (2, 9, 32, 20, 40, 4),
    (2, 256, 16, 263, 24, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-r{}-din{}-dout{}-k{}".format(*s))
def test_decode_matches_reference(dtype, shape):
    t, e, r, d_in, d_out, k = shape
    prob = make_problem(t, e, r, d_in, d_out, seed=t + 7 * e)
    layer = prob.layer(dtype, k, 0.8, regime="decode")
    check_delta(layer, prob, dtype, k, 0.8, what=f"decode {shape}")
    c = prob.cast(dtype)
    check(layer(c["x"], c["weight"], c["bias"]), *prob.reference(dtype, k, 0.8), dtype, "decode, base + delta")


@pytest.mark.parametrize("split", [2, 3])
def test_slices_of_d_in(split):
    """Forced slice counts: the shrink sums the route slices' partial scores, the expand the shrink slices'."""
    prob = make_problem(16, 7, 4, 150, 29, seed=split)
    layer = prob.layer(torch.float32, 3, 0.8, regime="decode", split=split)
    plan = layer.plan(prob.x)
    assert plan.decode.route_splits == split and plan.decode.shrink_splits == split
    check_delta(layer, prob, torch.float32, 3, 0.8, what=f"decode, {split} slices")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_weights_mixing(dtype):
    prob = make_problem(4, 5, 3, 40, 29, seed=3, shared_scaling=True)
    layer = prob.layer(dtype, 3, 1.2, "weights", regime="decode", split=2)
    check_delta(layer, prob, dtype, 3, 1.2, "weights", "decode weights mixing")


def test_decode_with_caller_scores():
    """Caller-given signed scores (tensor parallelism) route the tokens; the prototypes are not read, and the route
    kernel does not run."""
    prob = make_problem(5, 6, 2, 33, 21, seed=4)
    layer = prob.layer(torch.float32, 2, 1.0, regime="decode", split=2)
    c = prob.cast(torch.float32)
    scores = (prob.x @ prob.prototypes.T).to(device=DEVICE, dtype=torch.float32)
    layer.experts.prototypes.zero_()  # would route every token to experts 0 and 1 if read
    y = layer.add_delta_(torch.zeros(5, 21, device=DEVICE), c["x"], scores)
    check(y, *prob.reference(torch.float32, 2, 1.0, base=False), torch.float32, "decode with given scores")
    with launch_mod.recording() as rec:
        layer.add_delta_(torch.zeros(5, 21, device=DEVICE), c["x"], scores)
    assert [ln.name for ln in rec] == ["_decode_shrink_kernel", "_decode_expand_kernel"]


def test_only_the_selected_experts_are_read():
    """Poisoning every unselected expert's A rows and Bᵀ rows with NaN leaves the delta finite and right: the decode
    kernels read the k selected experts only (the previous design read all of A)."""
    prob = make_problem(2, 8, 3, 40, 21, seed=9)
    layer = prob.layer(torch.float32, 2, 1.0, regime="decode")
    _, idx = reference.route(prob.x, prob.prototypes, 2, 1.0)
    unused = sorted(set(range(8)) - set(idx.flatten().tolist()))
    assert unused
    a = layer.experts.a.view(8, 3, -1)
    for e in unused:
        a[e] = float("nan")
        layer.experts.b_t[e] = float("nan")
    check_delta(layer, prob, torch.float32, 2, 1.0, what="unselected experts poisoned")
