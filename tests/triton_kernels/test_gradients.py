"""Gradients through the Triton path against float64 autograd of the reference: the kernels never write in place into a
tensor autograd needs; under autograd the call goes through the custom op, whose registered backward is the torch
regimes'. Gradients with respect to x, the base weight and bias, and the LoRA factors A and B when they require grad,
in every regime and both mixings."""

from __future__ import annotations

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import reference
from tests.triton_kernels.helpers import DEVICE, check, make_problem, require_triton


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


def _grads(prob, dtype, top_k, temperature, mixing, backend, regime=None, with_base=True, factors=True):
    """Gradients of sum(y · G) with a fixed G, for the named leaves, through ``backend`` ("reference" or a layer)."""
    names = ["x"] + (["weight", "bias"] if with_base else []) + (["a", "b"] if factors else [])
    dev = DEVICE if backend != "reference" else torch.device("cpu")
    leaf = {n: getattr(prob, n).to(device=dev, dtype=dtype).clone().requires_grad_(n in names)
            for n in ("x", "weight", "bias", "a", "b")}  # fmt: skip
    scaling, protos = prob.scaling.to(device=dev, dtype=dtype), prob.prototypes.to(device=dev, dtype=dtype)
    w, b = (leaf["weight"], leaf["bias"]) if with_base else (None, None)
    if backend == "reference":
        y = reference.routed_lora(leaf["x"], leaf["a"], leaf["b"], scaling, protos, top_k, temperature, mixing, w, b)
    else:
        from genknowsub_fast.backends import triton_ops
        from genknowsub_fast.backends.packing import pack_experts
        from genknowsub_fast.options import RoutingOptions

        packed = pack_experts(leaf["a"], leaf["b"], scaling, protos, mixing=mixing, dtype=dtype, device=dev)
        layer = triton_ops.prepare(packed, RoutingOptions(top_k, temperature, mixing), regime=regime)
        y = layer(leaf["x"], w, b)
    g = torch.linspace(-1.0, 1.0, y.numel(), dtype=torch.float64).reshape(y.shape).to(device=dev, dtype=dtype)
    (y * g).sum().backward()
    return {n: leaf[n].grad for n in names}


@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
@pytest.mark.parametrize("mixing", ["output", "weights"])
def test_gradients_match_float64_autograd(regime, mixing):
    t = 5 if regime == "decode" else 21
    prob = make_problem(t, 5, 3, 29, 23, seed=t + 1, shared_scaling=mixing == "weights")
    ref64 = _grads(prob, torch.float64, 2, 0.9, mixing, "reference")
    ref32 = _grads(prob, torch.float32, 2, 0.9, mixing, "reference")
    ours = _grads(prob, torch.float32, 2, 0.9, mixing, "triton", regime)
    assert set(ours) == {"x", "weight", "bias", "a", "b"}
    for n in ours:
        assert ours[n] is not None, n
        check(ours[n], ref64[n], ref32[n], torch.float32, f"d/d{n}, {regime} {mixing}")


def test_delta_only_gradient_wrt_x_is_not_missing():
    """A delta-only call (weight None): the whole output is the delta, so a backward that missed it would give 0."""
    prob = make_problem(4, 4, 2, 20, 17, seed=2)
    ref64 = _grads(prob, torch.float64, 2, 1.0, "output", "reference", with_base=False, factors=False)
    ref32 = _grads(prob, torch.float32, 2, 1.0, "output", "reference", with_base=False, factors=False)
    ours = _grads(prob, torch.float32, 2, 1.0, "output", "triton", with_base=False, factors=False)
    assert float(ours["x"].abs().max()) > 0.1 * float(ref64["x"].abs().max())
    check(ours["x"], ref64["x"], ref32["x"], torch.float32, "delta-only d/dx")


def test_public_op_gradient_wrt_x():
    """``ops.routed_lora(..., backend="triton")`` (the runner's path) differentiates the delta too."""
    prob = make_problem(6, 4, 3, 24, 19, seed=4)
    ref64 = _grads(prob, torch.float64, 2, 0.8, "output", "reference", factors=False)
    ref32 = _grads(prob, torch.float32, 2, 0.8, "output", "reference", factors=False)
    x = prob.x.to(device=DEVICE, dtype=torch.float32).requires_grad_(True)
    cast = {n: getattr(prob, n).to(device=DEVICE, dtype=torch.float32) for n in ("a", "b", "scaling", "prototypes")}
    w = prob.weight.to(device=DEVICE, dtype=torch.float32).requires_grad_(True)
    bias = prob.bias.to(device=DEVICE, dtype=torch.float32).requires_grad_(True)
    y = gkf.ops.routed_lora(x, **cast, top_k=2, temperature=0.8, weight=w, bias=bias, backend="triton")
    g = torch.linspace(-1.0, 1.0, y.numel(), dtype=torch.float64).reshape(y.shape).to(device=DEVICE)
    (y * g.float()).sum().backward()
    check(x.grad, ref64["x"], ref32["x"], torch.float32, "ops.routed_lora d/dx")
    check(w.grad, ref64["weight"], ref32["weight"], torch.float32, "ops.routed_lora d/dW")


def test_add_delta_under_autograd_is_recorded():
    """add_delta_ on a y that requires grad: the delta is added by one recorded ``add_`` (y's version moves by one),
    and the gradient wrt x includes the delta's part."""
    prob = make_problem(3, 4, 2, 20, 13, seed=6)
    layer = prob.layer(torch.float32, 2, 1.0)
    x = prob.x.to(device=DEVICE, dtype=torch.float32).requires_grad_(True)
    w = prob.weight.to(device=DEVICE, dtype=torch.float32)
    y = torch.nn.functional.linear(x, w)
    version = y._version
    out = layer.add_delta_(y, x)
    assert out is y and y._version == version + 1 and y.grad_fn is not None
    y.sum().backward()
    xr = prob.x.clone().requires_grad_(True)
    ref = reference.routed_lora(xr, prob.a, prob.b, prob.scaling, prob.prototypes, 2, 1.0, "output", prob.weight, None)
    ref.sum().backward()
    x32 = prob.x.float().requires_grad_(True)
    ref32 = reference.routed_lora(x32, *(t.float() for t in (prob.a, prob.b, prob.scaling, prob.prototypes)), 2, 1.0,
                                  "output", prob.weight.float(), None)  # fmt: skip
    ref32.sum().backward()
    check(x.grad, xr.grad, x32.grad, torch.float32, "add_delta_ d/dx")


def test_no_grad_calls_take_the_direct_launch():
    """Without a gradient to compute, no call goes through the custom op (its per-call rebuild is skipped)."""
    prob = make_problem(3, 4, 2, 20, 13, seed=7)
    layer = prob.layer(torch.float32, 2, 1.0)
    x = prob.x.to(device=DEVICE, dtype=torch.float32).requires_grad_(True)
    assert layer._through_op(x, None, None)
    with torch.no_grad():
        assert not layer._through_op(x, None, None)
    assert not layer._through_op(x.detach(), None, None)
