"""The fused CPU kernel (csrc/routed_lora_cpu.cpp) against reference.py, and the torch backend's use of it."""

import pytest
import torch

from genknowsub_fast import reference
from genknowsub_fast.backends import cpu_kernel, torch_ops
from genknowsub_fast.backends.packing import pack_experts
from tests.extension_required import require_op
from tests.routing_cases import make_case
from tests.tolerances import FP32_SAME_MATH, assert_close_to_reference


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    require_op("routed_lora_delta_")


SHAPES = [  # (T, E, r, d_in, d_out, k): T < 32 takes the per-token logits path, T >= 32 the GEMM one
    (1, 4, 3, 19, 23, 2),
    (9, 5, 1, 33, 17, 5),  # r = 1, k = E
    (7, 1, 4, 21, 10, 1),  # E = 1
    (40, 6, 8, 70, 45, 3),
    (70, 12, 4, 37, 130, 3),  # d_out spans several 64-float tiles, T several 32-token blocks
]


def _fused(case, k, temp, mixing):
    c = case.to(torch.float32)
    packed = pack_experts(c.a, c.b, case.scaling, c.prototypes, mixing=mixing, dtype=torch.float32)
    y = torch.zeros(c.x.shape[0], case.b.shape[1])
    with torch.no_grad():
        return cpu_kernel.add_delta_(y, c.x, packed, k, temp)


@pytest.mark.parametrize("mixing", ["output", "weights"])
@pytest.mark.parametrize("temp", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_reference(shape, temp, mixing):
    t, e, r, d_in, d_out, k = shape
    case = make_case(t, e, r, d_in, d_out, seed=sum(shape), shared_scaling=mixing == "weights")
    ours = _fused(case, k, temp, mixing)
    ref64 = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, k, temp, mixing)
    c = case.to(torch.float32)
    ref32 = reference.routed_lora(c.x, c.a, c.b, case.scaling.float(), c.prototypes, k, temp, mixing)
    assert_close_to_reference(ours, ref64, ref32, torch.float32, f"fused {shape} {mixing} T={temp}")


def test_fused_mixed_ranks_zero_padding():
    case = make_case(12, 5, 4, 29, 31, seed=7, mixed_ranks=True)
    ours = _fused(case, 3, 1.0, "output")
    ref64 = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, 3, 1.0)
    assert_close_to_reference(ours, ref64, ref64.float(), torch.float32, "mixed ranks")


def test_ties_go_to_the_lower_index():
    """Two identical prototypes: the lower index wins the single slot, in both logits paths (T < 32 and T >= 32)."""
    for t in (3, 40):
        case = make_case(t, 4, 2, 16, 8, seed=3).to(torch.float32)
        case.prototypes[2] = case.prototypes[1]
        case.prototypes[0] *= 1e-3
        case.prototypes[3] *= 1e-3
        scaling = case.scaling.float()
        packed = pack_experts(case.a, case.b, scaling, case.prototypes)
        y = torch.zeros(t, 8)
        with torch.no_grad():
            cpu_kernel.add_delta_(y, case.x, packed, 1, 1.0)
        expect = scaling[1] * (case.x @ case.a[1].T) @ case.b[1].T
        torch.testing.assert_close(y, expect, **FP32_SAME_MATH)


def test_kernel_takes_calls_only_without_autograd():
    case = make_case(5, 4, 2, 16, 8, seed=1).to(torch.float32)
    x = case.x.clone().requires_grad_(True)
    y = torch.zeros(5, 8)
    assert not cpu_kernel.takes(x, y)
    with torch.no_grad():
        assert cpu_kernel.takes(x, y)
    assert not cpu_kernel.takes(y.double(), x.double())


def test_autograd_still_flows_through_the_torch_regimes():
    case = make_case(6, 4, 2, 16, 8, seed=2).to(torch.float32)
    packed = pack_experts(case.a, case.b, case.scaling.float(), case.prototypes)
    x = case.x.clone().requires_grad_(True)
    y = torch_ops.add_routed_delta_(torch.zeros(6, 8), x, packed, 2, 1.0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_fused_accumulates_into_y():
    case = make_case(33, 6, 4, 24, 40, seed=5).to(torch.float32)
    packed = pack_experts(case.a, case.b, case.scaling.float(), case.prototypes)
    base = torch.randn(33, 40)
    with torch.no_grad():
        y = cpu_kernel.add_delta_(base.clone(), case.x, packed, 3, 1.0)
        delta = torch_ops.add_routed_delta_(torch.zeros(33, 40), case.x, packed, 3, 1.0, regime="dense")
    torch.testing.assert_close(y, base + delta, **FP32_SAME_MATH)


def test_large_b_walks_all_tokens_per_tile():
    """B over 4 MB (E·r·d_out floats) switches the expand to one block of all tokens: same result as the reference."""
    t, e, r, d_in, d_out, k = 33, 40, 16, 48, 1700, 3  # 40·16·1700·4 B = 4.35 MB
    case = make_case(t, e, r, d_in, d_out, seed=11)
    ours = _fused(case, k, 1.0, "output")
    ref64 = reference.routed_lora(case.x, case.a, case.b, case.scaling, case.prototypes, k, 1.0, "output")
    c = case.to(torch.float32)
    ref32 = reference.routed_lora(c.x, c.a, c.b, case.scaling.float(), c.prototypes, k, 1.0, "output")
    assert_close_to_reference(ours, ref64, ref32, torch.float32, "large B")
