"""The whole Triton path through the public API (``ops.routed_lora(..., backend="triton")``), the adapter and the
registered custom ops."""

from __future__ import annotations

import pytest
import torch

import genknowsub_fast.ops as gops
from genknowsub_fast.backends import triton_ops
from tests.triton_kernels.helpers import DEVICE, DTYPES, check, make_problem, reference, require_triton


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


def _public(prob, dtype, k, temp, mixing, with_weight=True, with_bias=True, lead=None):
    x = prob.x.to(device=DEVICE, dtype=dtype)
    if lead is not None:
        x = x.reshape(*lead, x.shape[-1])
    cast = dict(device=DEVICE, dtype=dtype)
    return gops.routed_lora(
        x,
        prob.a.to(**cast),
        prob.b.to(**cast),
        prob.scaling.to(**cast),
        prob.prototypes.to(**cast),
        k,
        temp,
        mixing=mixing,
        weight=prob.weight.to(**cast) if with_weight else None,
        bias=prob.bias.to(**cast) if (with_weight and with_bias) else None,
        backend="triton",
    )


def _refs(prob, dtype, k, temp, mixing, with_weight=True, with_bias=True):
    def run(p_dtype):
        c = lambda t: t.to(p_dtype)  # noqa: E731
        return reference.routed_lora(
            c(prob.x),
            c(prob.a),
            c(prob.b),
            c(prob.scaling),
            c(prob.prototypes),
            k,
            temp,
            mixing,
            c(prob.weight) if with_weight else None,
            c(prob.bias) if (with_weight and with_bias) else None,
        )

    return run(torch.float64), run(dtype)


# (T, E, r, d_in, d_out, k, ranks): odd d, T=1, E=1, k=E, r=1, mixed ranks (zero padding), T over several blocks.
CASES = [
    (1, 1, 1, 17, 23, 1, None),
    (6, 4, 3, 29, 35, 4, None),
    (5, 5, 4, 22, 19, 2, [4, 1, 3, 2, 4]),
    (40, 3, 2, 18, 70, 2, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-r{}-din{}-dout{}-k{}".format(*c[:6]))
def test_routed_lora_output_mixing(dtype, case):
    t, e, r, d_in, d_out, k, ranks = case
    prob = make_problem(t, e, r, d_in, d_out, seed=t + e, ranks=ranks)
    y = _public(prob, dtype, k, 0.9, "output")
    assert y.dtype == dtype and y.shape == (t, d_out)
    check(y, *_refs(prob, dtype, k, 0.9, "output"), dtype, "routed_lora output mixing")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_lora_weights_mixing(dtype):
    prob = make_problem(7, 4, 3, 25, 31, seed=2, shared_scaling=True)
    y = _public(prob, dtype, 3, 1.1, "weights")
    check(y, *_refs(prob, dtype, 3, 1.1, "weights"), dtype, "routed_lora weights mixing")


@pytest.mark.parametrize("with_bias", [True, False])
def test_delta_only_and_bias(with_bias):
    prob = make_problem(5, 3, 2, 20, 24, seed=6)
    delta = _public(prob, torch.float32, 2, 1.0, "output", with_weight=False)
    check(delta, *_refs(prob, torch.float32, 2, 1.0, "output", with_weight=False), torch.float32, "delta only")
    y = _public(prob, torch.float32, 2, 1.0, "output", with_bias=with_bias)
    check(y, *_refs(prob, torch.float32, 2, 1.0, "output", with_bias=with_bias), torch.float32, "base + delta")


def test_leading_dims_and_empty_batch():
    prob = make_problem(6, 3, 2, 20, 13, seed=8)
    y = _public(prob, torch.float32, 2, 1.0, "output", lead=(2, 3))
    assert y.shape == (2, 3, 13)
    ref64, ref32 = _refs(prob, torch.float32, 2, 1.0, "output")
    check(y.reshape(6, 13), ref64, ref32, torch.float32, "leading dims")
    empty = make_problem(0, 3, 2, 20, 13, seed=8, margin=False)
    for with_weight in (True, False):
        y0 = _public(empty, torch.float32, 2, 1.0, "output", with_weight=with_weight)
        assert y0.shape == (0, 13)


@pytest.mark.parametrize("regime", ["dense", "gather", "grouped"])
def test_custom_op_regimes_agree(regime):
    """The registered op gives the reference result on every regime (forced), float32."""
    prob = make_problem(9, 5, 3, 27, 21, seed=10)
    packed = prob.packed(torch.float32)
    x = prob.x.to(device=DEVICE, dtype=torch.float32)
    w = prob.weight.to(device=DEVICE, dtype=torch.float32)
    b = prob.bias.to(device=DEVICE, dtype=torch.float32)
    y = torch.ops.genknowsub_fast.routed_linear(x, packed.route_shrink, packed.b_t, w, b, 5, 3, 3, 0.8, False, regime)
    check(y, *_refs(prob, torch.float32, 3, 0.8, "output"), torch.float32, f"op regime {regime}")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatch of both ops are consistent (torch.library.opcheck)."""
    prob = make_problem(4, 3, 2, 18, 11, seed=3)
    packed = prob.packed(torch.float32)
    x = prob.x.to(device=DEVICE, dtype=torch.float32)
    w = prob.weight.to(device=DEVICE, dtype=torch.float32)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(
        torch.ops.genknowsub_fast.routed_linear.default,
        (x, packed.route_shrink, packed.b_t, w, None, 3, 2, 2, 1.0, False),
        test_utils=tests,
    )
    for regime in ("dense", "grouped"):
        torch.library.opcheck(
            torch.ops.genknowsub_fast.route_shrink.default,
            (x, packed.route_shrink, 3, 2, 2, 1.0, False, regime),
            test_utils=tests,
        )


def test_status_reports_how_it_runs():
    ok, why = triton_ops.status()
    assert ok and why
    if DEVICE.type == "cpu":
        assert "interpreter" in why.lower()


def test_bad_input_is_a_value_error():
    prob = make_problem(3, 3, 2, 16, 8, seed=1)
    packed = prob.packed(torch.float32)
    x = prob.x.to(device=DEVICE, dtype=torch.float32)
    w = prob.weight.to(device=DEVICE, dtype=torch.float32)
    b = prob.bias.to(device=DEVICE, dtype=torch.float32)
    bad = [
        (dict(x2=x.to(torch.float64)), "dtype"),
        (dict(x2=x[:, :-1]), "route_shrink"),
        (dict(x2=x[0]), "2-D"),
        (dict(weight=w.to(torch.float16)), "dtype"),
        (dict(weight=w[:, :-1]), "weight"),
        (dict(weight=None, bias=b), "bias"),
        (dict(bias=b[:-1]), "bias"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=4), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ]
    for change, word in bad:
        kw = dict(x2=x, packed=packed, top_k=2, temperature=1.0, weight=w, bias=b)
        kw.update(change)
        with pytest.raises(ValueError, match=word):
            triton_ops.routed_linear(**kw)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        from genknowsub_fast.triton_kernels.dispatch import choose_plan

        choose_plan(4, 3, 2, 2, 16, 8, torch.float64, None, None)
