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
    best = cpu_kernel.isa("auto")
    try:
        with pytest.raises(ValueError, match="unknown CPU ISA"):
            cpu_kernel.isa("neon")
        order = ["scalar", "avx2", "avx512"]
        for name in order[order.index(best) + 1 :]:
            with pytest.raises(ValueError, match="cannot run"):
                cpu_kernel.isa(name)
        assert cpu_kernel.isa("scalar") == "scalar" and cpu_kernel.isa() == "scalar"
    finally:
        cpu_kernel.isa("auto")
    assert cpu_kernel.isa() == best


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
