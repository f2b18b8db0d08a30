"""Decode kernels (split-K shrink + expand that sums the splits) against the float64 reference, through the layer."""

from __future__ import annotations

import pytest
import torch

from tests.triton_kernels.helpers import DEVICE, DTYPES, check, make_problem, require_triton


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


# (T, E, r, d_in, d_out, k): T=1, E=1, r=1, k=E, d not a multiple of 16, T=16 (a full decode block), k·r = 128.
SHAPES = [(1, 1, 1, 19, 23, 1), (3, 5, 3, 37, 70, 2), (16, 6, 4, 45, 33, 3), (2, 9, 32, 20, 40, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-r{}-din{}-dout{}-k{}".format(*s))
@pytest.mark.parametrize("split", [1, 3])
def test_decode_matches_reference(dtype, shape, split):
    t, e, r, d_in, d_out, k = shape
    prob = make_problem(t, e, r, d_in, d_out, seed=t + 7 * e)
    layer = prob.layer(dtype, k, 0.8, regime="decode", split=split)
    c = prob.cast(dtype)
    y = layer(c["x"], c["weight"], c["bias"])
    assert layer.plan(c["x"]).decode.k_splits == min(split, -(-d_in // 32))
    check(y, *prob.reference(dtype, k, 0.8), dtype, f"decode split={split}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_weights_mixing_and_delta_only(dtype):
    prob = make_problem(4, 5, 3, 40, 29, seed=3, shared_scaling=True)
    layer = prob.layer(dtype, 3, 1.2, "weights", regime="decode", split=2)
    delta = layer(prob.cast(dtype)["x"])
    check(delta, *prob.reference(dtype, 3, 1.2, "weights", base=False), dtype, "decode weights mixing, delta only")


def test_decode_with_caller_scores():
    """Caller-given signed scores (tensor parallelism) route the tokens; the prototypes are not read."""
    prob = make_problem(5, 6, 2, 33, 21, seed=4)
    layer = prob.layer(torch.float32, 2, 1.0, regime="decode", split=2)
    c = prob.cast(torch.float32)
    scores = (prob.x @ prob.prototypes.T).to(device=DEVICE, dtype=torch.float32)
    layer.prototypes.zero_()  # would route every token to experts 0 and 1 if read
    base = c["x"] @ c["weight"].T + c["bias"]
    y = layer.add_delta_(base.clone(), c["x"], scores)
    check(y, *prob.reference(torch.float32, 2, 1.0), torch.float32, "decode with given scores")
