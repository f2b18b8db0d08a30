"""The Triton layer API (``triton_ops.prepare`` → ``TritonLayer``) and the registered custom op: every regime against
the reference, delta-only calls, caller scores, plan caching, bad input, opcheck. Low-precision results are checked on
the delta alone (a delta-only call, or a zero base weight for the fused kernel), whose tolerance scales with the delta;
the full output is checked besides, for the base's part."""

from __future__ import annotations

import pytest
import torch
from genknowsub_fast.triton_kernels import dispatch
from genknowsub_fast.triton_kernels import launch as launch_mod

from genknowsub_fast.backends import triton_ops
from genknowsub_fast.options import RoutingOptions
from tests.triton_kernels.helpers import DEVICE, DTYPES, check, check_delta, make_problem, require_triton


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


# (T, E, r, d_in, d_out, k, ranks): odd d, T=1, E=1, k=E, r=1, mixed ranks (zero padding), T past the decode range,
# T=16 (the last decode count) with k=E, and E=256 past the decode range (the table's grouped regime end to end).
CASES = [
    (1, 1, 1, 17, 23, 1, None),
    (6, 4, 3, 29, 35, 4, None),
    (5, 5, 4, 22, 19, 2, [4, 1, 3, 2, 4]),
    (40, 3, 2, 18, 70, 2, None),
    (16, 3, 2, 21, 26, 3, None),
    (19, 256, 2, 263, 22, 3, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-r{}-din{}-dout{}-k{}".format(*c[:6]))
def test_table_plan_matches_reference(dtype, case):
    t, e, r, d_in, d_out, k, ranks = case
    prob = make_problem(t, e, r, d_in, d_out, seed=t + e, ranks=ranks)
    c = prob.cast(dtype)
    layer = prob.layer(dtype, k, 0.9)
    check_delta(layer, prob, dtype, k, 0.9, what="table plan")
    y = layer(c["x"], c["weight"], c["bias"])
    assert y.dtype == dtype and y.shape == (t, d_out)
    check(y, *prob.reference(dtype, k, 0.9), dtype, "table plan, base + delta")


@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_every_regime_and_mixing(regime, mixing):
    prob = make_problem(21, 6, 2, 33, 27, seed=21, shared_scaling=mixing == "weights")
    c = prob.cast(torch.float32)
    layer = prob.layer(torch.float32, 3, 0.8, mixing, regime=regime)
    check_delta(layer, prob, torch.float32, 3, 0.8, mixing, f"{regime} {mixing}")
    y = layer(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(torch.float32, 3, 0.8, mixing), torch.float32, f"{regime} {mixing}, base + delta")


@pytest.mark.parametrize("with_bias", [True, False])
def test_delta_only_bias_and_fused_base(with_bias):
    prob = make_problem(20, 3, 2, 20, 24, seed=6)
    c = prob.cast(torch.float32)
    layer = prob.layer(torch.float32, 2, 1.0)
    check(layer(c["x"]), *prob.reference(torch.float32, 2, 1.0, base=False), torch.float32, "delta only")
    bias = c["bias"] if with_bias else None
    if not with_bias:
        prob.bias = torch.zeros_like(prob.bias)
    ref = prob.reference(torch.float32, 2, 1.0)
    check(layer(c["x"], c["weight"], bias), *ref, torch.float32, "base + delta")
    fused = prob.layer(torch.float32, 2, 1.0, regime="dense", fuse_base=True)
    assert fused.plan(c["x"]).expand.fuse_base
    check(fused(c["x"], c["weight"], bias), *ref, torch.float32, "fused base GEMM")
    # A zero base weight and bias: the fused kernel's output is its delta alone.
    zero_w, zero_b = torch.zeros_like(c["weight"]), torch.zeros_like(c["bias"]) if with_bias else None
    delta = prob.reference(torch.float32, 2, 1.0, base=False)
    check(fused(c["x"], zero_w, zero_b), *delta, torch.float32, "fused base GEMM, delta alone")
    # A GPT-2 Conv1D layer passes Wᵀ of its (d_in, d_out) weight: a view whose rows are not unit-stride, which the
    # fused kernel cannot read; the call must take the unfused plan and stay right.
    transposed = c["weight"].T.contiguous().T
    assert transposed.stride(-1) != 1
    check(fused(c["x"], transposed, bias), *ref, torch.float32, "fused plan, transposed weight")


@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
def test_add_delta_with_caller_scores(regime):
    prob = make_problem(18, 5, 3, 27, 21, seed=10)
    c = prob.cast(torch.float32)
    layer = prob.layer(torch.float32, 2, 0.7, regime=regime)
    scores = (prob.x @ prob.prototypes.T).float().to(DEVICE)
    y = c["x"] @ c["weight"].T + c["bias"]
    out = layer.add_delta_(y, c["x"], scores)
    assert out is y
    check(y, *prob.reference(torch.float32, 2, 0.7), torch.float32, f"add_delta_ with scores, {regime}")
    with pytest.raises(ValueError, match="scores"):
        layer.add_delta_(y, c["x"], scores[:, :-1])


def test_empty_batch_launches_nothing():
    prob = make_problem(0, 3, 2, 20, 13, seed=8, margin=False)
    c = prob.cast(torch.float32)
    layer = prob.layer(torch.float32, 2, 1.0)
    with launch_mod.recording() as rec:
        assert layer(c["x"], c["weight"], c["bias"]).shape == (0, 13)
        assert layer(c["x"]).shape == (0, 13)
    assert rec == []


def test_plans_come_from_the_one_table_cache():
    """A layer keeps no plans of its own: the table's cache (dispatch.plan_for, keyed by the layer's spec, T and two
    flags) returns the same plan object for the same call shape."""
    prob = make_problem(3, 4, 2, 20, 9, seed=2)
    layer = prob.layer(torch.float32, 2, 1.0)
    x = prob.cast(torch.float32)["x"]
    p1 = layer.plan(x)
    hits = dispatch.plan_for.cache_info().hits
    assert layer.plan(x) is p1 and layer.plan(x[:2]) is not p1
    assert dispatch.plan_for.cache_info().hits == hits + 1
    assert not any("plan" in k for k in vars(layer)), "plans are cached once, in dispatch.plan_for"
    same = prob.layer(torch.float32, 2, 1.0)
    assert same.experts.spec == layer.experts.spec and same.plan(x) is p1


def test_custom_op_matches_direct_call_and_passes_opcheck():
    """The op torch.compile traces gives the direct launches' result; schema, fake impl and dispatch are
    consistent (torch.library.opcheck)."""
    prob = make_problem(4, 3, 2, 18, 11, seed=3)
    c = prob.cast(torch.float32)
    layer = prob.layer(torch.float32, 2, 1.0)
    args = (c["x"], c["weight"], None, None, *triton_ops._op_args(layer.experts))
    torch.testing.assert_close(torch.ops.genknowsub_fast.routed_linear(*args), layer(c["x"], c["weight"]))
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_autograd_registration")
    torch.library.opcheck(torch.ops.genknowsub_fast.routed_linear.default, args, test_utils=tests)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_the_prepared_runner(dtype):
    """The public path: ``ops.routed_lora(..., backend="triton")`` and a runner's ``add_delta_`` with its own
    ``route_scores`` (as tensor parallelism passes them) both give the reference result."""
    import genknowsub_fast as gkf

    prob = make_problem(6, 4, 3, 29, 35, seed=5)
    c = prob.cast(dtype)
    cast = {n: getattr(prob, n).to(device=DEVICE, dtype=dtype) for n in ("a", "b", "scaling", "prototypes")}
    delta = gkf.ops.routed_lora(c["x"].view(2, 3, -1), **cast, top_k=2, temperature=0.9, backend="triton")
    assert delta.shape == (2, 3, 35)
    check(delta.reshape(6, 35), *prob.reference(dtype, 2, 0.9, base=False), dtype, "ops.routed_lora delta")
    y = gkf.ops.routed_lora(c["x"].view(2, 3, -1), **cast, top_k=2, temperature=0.9, weight=c["weight"],
                            bias=c["bias"], backend="triton")  # fmt: skip
    check(y.reshape(6, 35), *prob.reference(dtype, 2, 0.9), dtype, "ops.routed_lora through the runner")
    from genknowsub_fast.experts import ModuleExperts

    experts = ModuleExperts(prob.a, prob.b, prob.scaling, prob.prototypes, torch.full((4,), 3))
    runner = gkf.ops.prepare(experts, top_k=2, temperature=0.9, backend="triton", device=DEVICE, dtype=dtype)
    zeros = torch.zeros(6, 35, device=DEVICE, dtype=dtype)
    out = runner.add_delta_(zeros, c["x"], runner.route_scores(c["x"]))
    assert runner.active_backend == "triton"
    check(out, *prob.reference(dtype, 2, 0.9, base=False), dtype, "runner.add_delta_ with route_scores")
    with pytest.raises(ValueError, match="bias"):
        runner(c["x"], None, c["bias"])


def test_what_the_backend_cannot_run_is_a_value_error():
    prob = make_problem(3, 3, 2, 16, 8, seed=1)
    with pytest.raises(ValueError, match="float16, torch.bfloat16, torch.float32"):
        triton_ops.prepare(prob.packed(torch.float64), RoutingOptions(2))
    with pytest.raises(ValueError, match="regime"):
        prob.layer(torch.float32, 2, 1.0, regime="fast")
    layer = prob.layer(torch.float32, 2, 1.0)
    with pytest.raises(ValueError, match="prepared for torch.float32"):
        layer(prob.x.to(device=DEVICE, dtype=torch.float16))
