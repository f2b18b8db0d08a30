"""backends/cpu_kernel.py: the wrapper of the compiled CPU op, its ISA switch, and the prepared runner's use of it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import ModuleExperts, reference
from genknowsub_fast.backends import build_rule, cpu_kernel
from genknowsub_fast.backends.packing import pack_experts
from tests.extension_required import require_op
from tests.routing_cases import make_case
from tests.tolerances import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    require_op("routed_lora_delta_")


def _child(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(build_rule.ISA_SWITCH, None)
    if isa is not None:
        env[build_rule.ISA_SWITCH] = isa
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_env_variable_forces_the_isa_for_the_process():
    code = """
        from genknowsub_fast.backends import cpu_kernel
        assert cpu_kernel.available()
        print("ISA", cpu_kernel.isa())
        """
    proc = _child(code, "scalar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ISA scalar" in proc.stdout
    proc = _child(code, "sse9")
    assert proc.returncode != 0 and "ValueError" in proc.stderr and "sse9" in proc.stderr


def test_forcing_an_isa_the_cpu_lacks_or_an_unknown_one_raises():
    before = cpu_kernel.isa()  # the best one, or the one GENKNOWSUB_FAST_CPU_ISA forced for the run: restored after
    try:
        best = cpu_kernel.isa("auto")
        with pytest.raises(ValueError, match="unknown CPU ISA"):
            cpu_kernel.isa("neon")
        order = ["scalar", "avx2", "avx512"]
        assert order.index(before) <= order.index(best)
        for name in order[order.index(best) + 1 :]:
            with pytest.raises(ValueError, match="cannot run"):
                cpu_kernel.isa(name)
        assert cpu_kernel.isa("scalar") == "scalar" and cpu_kernel.isa() == "scalar"
    finally:
        cpu_kernel.isa(before)
    assert cpu_kernel.isa() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_add_delta_from_packed_experts(dtype):
    case = make_case(20, 6, 4, 40, 24, seed=4)
    packed = pack_experts(case.a, case.b, case.scaling, case.prototypes, dtype=dtype)
    x = case.x.to(dtype)
    with torch.no_grad():
        ours = cpu_kernel.add_delta_(torch.zeros(20, 24, dtype=dtype), x, packed, 3, 1.0)
    b = packed.b_t.transpose(1, 2).double()
    ones = torch.ones(6, dtype=torch.float64)
    protos = packed.prototypes.float()
    ref64 = reference.routed_lora(x.double(), packed.a.double(), b, ones, protos.double(), 3, 1.0)
    w, idx = reference.route(x.float(), protos, 3, 1.0)
    ref_lo = reference.expand_with_routing(x, packed.a, b.to(dtype), ones.to(dtype), w, idx)
    assert_close_to_reference(ours, ref64, ref_lo, dtype, f"cpu_kernel.add_delta_ {dtype}")


def test_takes_cpu_tensors_of_one_supported_dtype_without_autograd():
    x, y = torch.randn(5, 16), torch.zeros(5, 8)
    assert cpu_kernel.takes(x, y)
    assert cpu_kernel.takes(x.bfloat16(), y.bfloat16()) and cpu_kernel.takes(x.half(), y.half())
    assert not cpu_kernel.takes(x.double(), y.double())
    assert not cpu_kernel.takes(x.bfloat16(), y)
    xg = x.clone().requires_grad_(True)
    assert not cpu_kernel.takes(xg, y)
    with torch.no_grad():
        assert cpu_kernel.takes(xg, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_runner_runs_the_kernel_in_every_kernel_dtype_and_torch_under_autograd(dtype):
    case = make_case(33, 6, 4, 24, 40, seed=5)
    experts = ModuleExperts(case.a.float(), case.b.float(), case.scaling.float(), case.prototypes.float(), case.ranks)
    runner = gkf.prepare(experts, top_k=3, device="cpu", dtype=dtype)
    assert runner.active_backend == "cpu"
    x, base = case.x.to(dtype), torch.randn(33, 40).to(dtype)
    with torch.no_grad():
        y = runner.add_delta_(base.clone(), x)
    packed = runner.packed
    b, ones = packed.b_t.transpose(1, 2), torch.ones(6, dtype=torch.float64)
    w, idx = reference.route(x.float(), packed.prototypes, 3, 1.0)
    ref64 = base.double() + reference.expand_with_routing(x.double(), packed.a.double(), b.double(), ones, w, idx)
    ref_lo = base + reference.expand_with_routing(x, packed.a, b.contiguous(), ones.to(dtype), w, idx)
    assert_close_to_reference(y, ref64, ref_lo, dtype, f"runner.add_delta_ {dtype}")
    # with autograd on, the call goes to the torch regimes and gradients flow
    xg = case.x.float().clone().requires_grad_(True)
    runner32 = gkf.prepare(experts, top_k=3, device="cpu", dtype=torch.float32)
    runner32(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- screened routing
needs_screening = pytest.mark.skipif(
    not cpu_kernel.available() or cpu_kernel.isa() != "avx512",
    reason="screened routing runs on the AVX-512 (with BF16) kernels only; this CPU or run uses others",
)


def _near_tied_experts(e: int, d_in: int, rank: int, d_out: int, seed: int):
    """Experts whose unit prototypes are, for the first half, groups of near-copies (a 1e-3 perturbation of 8
    directions), so that many tokens have their k-th and next scores closer than bfloat16 can tell apart, and for the
    second half independent random directions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d_in, generator=g, dtype=torch.float64)
    protos = torch.randn(e, d_in, generator=g, dtype=torch.float64)
    near = e // 2
    protos[:near] = centres[torch.arange(near) % 8] + 1e-3 * protos[:near]
    protos = (protos / protos.norm(dim=1, keepdim=True)).float()
    a = torch.randn(e, rank, d_in, generator=g) / d_in**0.5
    b_t = torch.randn(e, rank, d_out, generator=g) / rank**0.5
    return protos, a, b_t


def _margins(x: torch.Tensor, protos: torch.Tensor, k: int) -> torch.Tensor:
    """Per token: (k-th − (k+1)-th largest float32 logit) / ‖x‖₂, in float64."""
    logits = (x.double() @ protos.double().T).abs().topk(k + 1).values
    return (logits[:, k - 1] - logits[:, k]) / x.double().norm(dim=1)


@needs_screening
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("e", "t"), [(64, 1), (64, 200), (256, 3), (256, 77)])
def test_screened_routing_equals_float32_routing_beyond_the_error_bound(dtype, e, t):
    """Tokens whose k-th and next float32 logits differ by more than twice screen_error_bound get y rows bit for bit
    equal to the unscreened op's (the same experts, and the float32 weights). The inputs mix such tokens with near-ties
    that a top-k of the bfloat16 scores alone routes elsewhere."""
    d_in, rank, d_out, k = 200, 4, 72, 3
    protos, a, b_t = _near_tied_experts(e, d_in, rank, d_out, seed=e + t)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, d_in, generator=g)
    clear = torch.arange(t) % 2 == 0  # every other token points at three independent experts: a clear top-3
    picks = e // 2 + torch.stack([torch.randperm(e - e // 2, generator=g)[:3] for _ in range(int(clear.sum()))])
    x[clear] = 0.1 * x[clear] + protos[picks].sum(1) * 4
    x = x.to(dtype)
    screen = cpu_kernel.screen_prototypes(protos)
    assert screen is not None and screen.dtype == torch.bfloat16
    op = cpu_kernel.op()
    a_, b_ = a.to(dtype), b_t.to(dtype)
    y_plain, y_screened = (torch.zeros(t, d_out, dtype=dtype) for _ in range(2))
    op(y_plain, x, protos, a_, b_, k, 1.0, False, None, None)
    op(y_screened, x, protos, a_, b_, k, 1.0, False, None, screen)
    beyond = _margins(x, protos, k) > 2 * cpu_kernel.screen_error_bound(d_in, dtype) * 1.001
    assert beyond.any()
    assert torch.equal(y_screened[beyond], y_plain[beyond])
    # The near-ties are real: over the tokens of the larger cases, a top-k of the bfloat16 scores alone picks other
    # experts than the float32 scores for some token.
    if t >= 77:
        exact = (x.double() @ protos.double().T).abs().topk(k).indices.sort().values
        coarse = (x.to(torch.bfloat16).double() @ screen.double().T).abs().topk(k).indices.sort().values
        assert not torch.equal(exact, coarse)


@needs_screening
def test_screened_routing_of_nan_and_inf_tokens_matches_the_unscreened_op():
    e, d_in, rank, d_out, k, t = 64, 96, 4, 40, 2, 6
    protos, a, b_t = _near_tied_experts(e, d_in, rank, d_out, seed=1)
    x = torch.randn(t, d_in)
    x[1, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4] = 1e30  # finite, but its squares and scores overflow float32
    screen = cpu_kernel.screen_prototypes(protos)
    y_plain, y_screened = torch.zeros(t, d_out), torch.zeros(t, d_out)
    cpu_kernel.op()(y_plain, x, protos, a, b_t, k, 1.0, False, None, None)
    cpu_kernel.op()(y_screened, x, protos, a, b_t, k, 1.0, False, None, screen)
    # Tokens whose screened logits are NaN or Inf take the float32 scores of every expert, as the unscreened op does.
    rows = [1, 3, 4]
    torch.testing.assert_close(y_screened[rows], y_plain[rows], rtol=0, atol=0, equal_nan=True)


def test_screen_prototypes_only_where_the_op_screens():
    unit = torch.nn.functional.normalize(torch.randn(cpu_kernel.SCREEN_MIN_EXPERTS, 48), dim=1)
    assert cpu_kernel.screen_prototypes(unit[:-1]) is None  # the op scores so few experts inside its route pass
    assert cpu_kernel.screen_prototypes(unit * 1.01) is None  # the error bound assumes unit rows
    before = cpu_kernel.isa()
    try:
        if cpu_kernel.isa("auto") == "avx512":
            screen = cpu_kernel.screen_prototypes(unit)
            assert screen is not None and torch.equal(screen, unit.to(torch.bfloat16))
        cpu_kernel.isa("scalar")
        assert cpu_kernel.screen_prototypes(unit) is None
    finally:
        cpu_kernel.isa(before)


@needs_screening
def test_the_prepared_runner_screens_a_large_library(monkeypatch):
    e, d_in, rank, d_out = 40, 64, 4, 24
    protos, a, b_t = _near_tied_experts(e, d_in, rank, d_out, seed=2)
    experts = ModuleExperts(a, b_t.transpose(1, 2).contiguous(), torch.ones(e), protos, torch.full((e,), rank))
    options = gkf.RoutingOptions(top_k=2, temperature=1.0, mixing="output")
    g = torch.Generator().manual_seed(3)
    picks = e // 2 + torch.stack([torch.randperm(e - e // 2, generator=g)[:2] for _ in range(9)])
    x = 4 * protos[picks].sum(1) + 0.1 * torch.randn(9, d_in, generator=g)  # clear top-2 margins
    screened = gkf.RoutedLinear(experts, options)
    y = screened(x)
    assert screened._plan.screen is not None
    monkeypatch.setattr(cpu_kernel, "screen_prototypes", lambda prototypes: None)
    plain = gkf.RoutedLinear(experts, options)
    assert torch.equal(plain(x), y) and plain._plan.screen is None
