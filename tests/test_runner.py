"""The prepared per-layer runner: validation once, plans per (device, dtype), every call form against the reference."""

import copy
import pickle

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import ModuleExperts, reference
from genknowsub_fast.backends import cpu_kernel
from genknowsub_fast.options import RoutingOptions, resolve_routing
from genknowsub_fast.runner import RoutedLinear
from tests.routing_cases import make_case
from tests.tolerances import FP32_SAME_MATH, assert_close_to_reference


def _experts(case, dtype=torch.float32) -> ModuleExperts:
    c = case.to(dtype)
    return ModuleExperts(c.a, c.b, case.scaling.float(), c.prototypes, case.ranks)


def test_call_forms_match_reference():
    case = make_case(10, 5, 3, 24, 13, seed=4)
    runner = gkf.prepare(_experts(case), top_k=2, temperature=0.8)
    w0 = torch.randn(13, 24, dtype=torch.float64)
    bias = torch.randn(13, dtype=torch.float64)
    ref = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, 2, 0.8, weight=w0, bias=bias)
    x = case.x.float()
    with torch.no_grad():
        full = runner(x.view(2, 5, 24), w0.float(), bias.float())
        delta = runner(x)
        y = (x @ w0.float().T + bias.float()).contiguous()
        added = runner.add_delta_(y, x)
    assert full.shape == (2, 5, 13)
    assert_close_to_reference(full.view(10, 13), ref, ref.float(), torch.float32, "runner(x, W, b)")
    torch.testing.assert_close(added, full.view(10, 13), **FP32_SAME_MATH)
    torch.testing.assert_close(delta + x @ w0.float().T + bias.float(), full.view(10, 13), **FP32_SAME_MATH)
    w, idx = runner.route(x)
    w_ref, idx_ref = reference.route(case.x, case.prototypes, 2, 0.8)
    assert torch.equal(idx, idx_ref)


def test_given_scores_replace_the_runners_own():
    """Passing the scores the runner would compute gives the same delta; other scores change the routing."""
    case = make_case(12, 6, 2, 30, 11, seed=8)
    runner = gkf.prepare(_experts(case), top_k=2)
    x = case.x.float()
    scores = runner.route_scores(x)
    assert scores.dtype == torch.float32 and scores.shape == (12, 6)
    with torch.no_grad():
        own = runner.add_delta_(torch.zeros(12, 11), x)
        given = runner.add_delta_(torch.zeros(12, 11), x, scores=scores)
        flipped = runner.add_delta_(torch.zeros(12, 11), x, scores=scores.flip(1))
    torch.testing.assert_close(given, own, **FP32_SAME_MATH)
    assert not torch.allclose(flipped, own)


def test_plan_is_reused_and_rebuilt_on_dtype_change():
    case = make_case(4, 3, 2, 16, 8, seed=1)
    runner = gkf.prepare(_experts(case), top_k=2, device="cpu", dtype=torch.float32)
    plan = runner._plan
    with torch.no_grad():
        runner(case.x.float())
        assert runner._plan is plan
        runner(case.x.to(torch.bfloat16))
    assert runner._plan is not plan and runner.packed.a.dtype == torch.bfloat16
    assert runner.packed.prototypes.dtype == torch.float32
    # The compiled kernel takes bf16 CPU calls; without the extension the portable torch regimes run.
    assert runner.active_backend == ("cpu" if cpu_kernel.available() else "torch")


def test_validation_happens_at_construction():
    case = make_case(4, 3, 2, 16, 8, seed=1)
    ex = _experts(case)
    with pytest.raises(ValueError, match="top_k"):
        gkf.prepare(ex, top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        gkf.prepare(ex, temperature=0)
    with pytest.raises(ValueError, match="mixing"):
        gkf.prepare(ex, top_k=2, mixing="sum")
    with pytest.raises(ValueError, match="unknown backend"):
        gkf.prepare(ex, top_k=2, backend="cuda")
    with pytest.raises(ValueError, match="ModuleExperts"):
        gkf.prepare({"a": case.a}, top_k=2)
    runner = gkf.prepare(ex, top_k=2)
    with pytest.raises(ValueError, match="d_in"):
        runner(torch.randn(3, 15))
    with pytest.raises(ValueError, match="inputs must be one of"):
        runner(torch.ones(3, 16, dtype=torch.int64))


def test_runner_takes_resolved_options_only():
    """The runner has no routing defaults of its own: options come resolved from where the user's call entered."""
    case = make_case(3, 2, 2, 16, 8, seed=1)  # 2 experts
    ex = _experts(case)
    with pytest.raises(TypeError):
        RoutedLinear(ex)  # no bare top_k default (it used to be 3, which a 2-expert layer refused)
    with pytest.raises(ValueError, match="RoutingOptions"):
        RoutedLinear(ex, 2)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 2\]"):
        RoutedLinear(ex, RoutingOptions(3))
    runner = RoutedLinear(ex, resolve_routing(ex.num_experts))
    assert runner.options == RoutingOptions(2, 1.0, "output") and runner.top_k == 2


def test_pickle_and_deepcopy_drop_the_plan_and_rebuild_it():
    case = make_case(6, 4, 2, 20, 9, seed=2)
    runner = gkf.prepare(_experts(case), top_k=3, device="cpu", dtype=torch.float32)
    x = case.x.float()
    with torch.no_grad():
        want = runner(x)
        for other in (pickle.loads(pickle.dumps(runner)), copy.deepcopy(runner)):
            assert other.packed is None
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)
