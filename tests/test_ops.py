"""The public ops: shapes, dispatch, and a clear ValueError for every bad input."""

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import ops, reference, runner
from tests.routing_cases import make_case
from tests.tolerances import FP32_SAME_MATH, FP32_WEIGHTS, PROTOTYPE_MIN_COS, assert_close_to_reference


def test_routed_lora_with_weight_bias_and_leading_dims():
    case = make_case(12, 4, 3, 20, 9, seed=1)
    w0 = torch.randn(9, 20, dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64)
    ref = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, 2, 1.0, weight=w0, bias=bias)
    c = case.to(torch.float32)
    ours = gkf.routed_lora(
        c.x.view(3, 4, 20),
        c.a,
        c.b,
        case.scaling.float(),
        c.prototypes,
        2,
        1.0,
        weight=w0.float(),
        bias=bias.float(),
        backend="torch",
    )
    assert ours.shape == (3, 4, 9)
    assert_close_to_reference(ours.view(12, 9), ref, ref.float(), torch.float32)
    delta = gkf.routed_lora(c.x, c.a, c.b, case.scaling.float(), c.prototypes, 2, 1.0, backend="torch")
    torch.testing.assert_close(delta + c.x @ w0.float().T + bias.float(), ours.view(12, 9), **FP32_SAME_MATH)


def test_arrow_route_shapes_and_values():
    case = make_case(6, 5, 2, 12, 3, seed=2)
    w, idx = gkf.arrow_route(case.x.view(2, 3, 12).float(), case.prototypes.float(), 3, 2.0)
    w_ref, idx_ref = reference.route(case.x, case.prototypes, 3, 2.0)
    assert w.shape == (6, 3) and idx.dtype == torch.int64
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w.double(), w_ref, **FP32_WEIGHTS)


@pytest.mark.parametrize("method", ["exact", "svd"])
def test_arrow_prototypes_methods(method):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 25, generator=g)
    b = torch.randn(3, 18, 4, generator=g) * (0.4 ** torch.arange(4.0))
    p = gkf.arrow_prototypes(a, b, method=method)
    ref = reference.prototypes_svd(a.double(), b.double())
    assert float((p.double() * ref).sum(1).abs().min()) >= PROTOTYPE_MIN_COS


def test_arrow_prototypes_warns_on_zero_expert():
    a, b = torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    a[0] = 0
    with pytest.warns(UserWarning, match="ΔW = 0"):
        p = gkf.arrow_prototypes(a, b)
    assert torch.all(p[0] == 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"backend": "cuda"}, "unknown backend"),
        ({"mixing": "sum"}, "mixing must be"),
    ],
)
def test_routed_lora_bad_arguments(kwargs, match):
    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    args = {"top_k": 2, "temperature": 1.0, "backend": "torch", "mixing": "output"} | kwargs
    with pytest.raises(ValueError, match=match):
        gkf.routed_lora(case.x, case.a, case.b, case.scaling.float(), case.prototypes, **args)


def test_routed_lora_shape_errors():
    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    s = case.scaling.float()
    with pytest.raises(ValueError, match="d_in"):
        gkf.routed_lora(case.x[:, :7], case.a, case.b, s, case.prototypes, 2)
    with pytest.raises(ValueError, match="weight has shape"):
        gkf.routed_lora(case.x, case.a, case.b, s, case.prototypes, 2, weight=torch.randn(5, 7))
    with pytest.raises(ValueError, match="one shared scaling"):
        gkf.routed_lora(case.x, case.a, case.b, torch.tensor([1.0, 2, 3, 4]), case.prototypes, 2, mixing="weights")


def test_prototype_bad_input():
    with pytest.raises(ValueError, match="expected A"):
        gkf.arrow_prototypes(torch.randn(2, 3, 4), torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="NaN"):
        gkf.arrow_prototypes(torch.full((1, 2, 3), float("nan")), torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="unknown prototype method"):
        gkf.arrow_prototypes(torch.randn(1, 2, 3), torch.randn(1, 4, 2), method="lanczos")


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(runner, "triton_status", lambda: (False, "no GPU and TRITON_INTERPRET is not set"))
    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    with pytest.raises(ValueError, match='backend="triton" cannot run: no GPU'):
        gkf.routed_lora(case.x, case.a, case.b, case.scaling.float(), case.prototypes, 2, backend="triton")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_arrow_route_ties_go_to_the_lower_index():
    w, idx = gkf.arrow_route(torch.zeros(2, 64), torch.eye(64)[:40], 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_non_float_inputs_are_errors():
    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    s = case.scaling.float()
    with pytest.raises(ValueError, match="inputs must be one of"):
        gkf.routed_lora(case.x.to(torch.int64), case.a, case.b, s, case.prototypes, 2)
    with pytest.raises(ValueError, match="floating-point"):
        gkf.routed_lora(case.x, case.a.to(torch.int8), case.b, s, case.prototypes, 2)
    with pytest.raises(ValueError, match="floating-point"):
        gkf.arrow_route(case.x.to(torch.int64), case.prototypes, 2)


def test_numpy_integer_top_k_and_bool_temperature():
    import numpy as np

    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    s = case.scaling.float()
    out = gkf.routed_lora(case.x, case.a, case.b, s, case.prototypes, np.int64(2), backend="torch")
    torch.testing.assert_close(out, gkf.routed_lora(case.x, case.a, case.b, s, case.prototypes, 2, backend="torch"))
    with pytest.raises(ValueError, match="temperature"):
        gkf.routed_lora(case.x, case.a, case.b, s, case.prototypes, 2, temperature=True)


@pytest.mark.parametrize("field", ["a", "b", "scaling", "prototypes"])
def test_nan_factors_are_errors(field):
    """README's bad-input paragraph: NaN/Inf weights given to the ops on raw tensors are refused, not routed."""
    case = make_case(3, 4, 2, 8, 5).to(torch.float32)
    t = {"a": case.a, "b": case.b, "scaling": case.scaling.float(), "prototypes": case.prototypes}
    t[field] = t[field].clone()
    t[field].view(-1)[0] = float("nan")
    name = {"a": "A", "b": "B"}.get(field, field)
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        gkf.routed_lora(case.x, t["a"], t["b"], t["scaling"], t["prototypes"], 2)
    ranks = torch.full((t["a"].shape[0],), t["a"].shape[1])
    experts = gkf.ModuleExperts(t["a"], t["b"], t["scaling"], t["prototypes"], ranks)
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        gkf.prepare(experts, top_k=2)
    if field == "prototypes":
        with pytest.raises(ValueError, match="prototypes contain NaN or Inf"):
            gkf.arrow_route(case.x, t["prototypes"], 2)


def test_prepare_defaults_top_k_to_min_3_e():
    """ops.prepare used to default to top_k=3 and then refuse it for a library of fewer experts."""
    from genknowsub_fast.experts import ModuleExperts

    g = torch.Generator().manual_seed(0)
    for e, want in ((2, 2), (5, 3)):
        experts = ModuleExperts(
            torch.randn(e, 4, 16, generator=g), torch.randn(e, 8, 4, generator=g), torch.ones(e),
            torch.nn.functional.normalize(torch.randn(e, 16, generator=g), dim=1), torch.full((e,), 4),
        )  # fmt: skip
        assert gkf.ops.prepare(experts).top_k == want
