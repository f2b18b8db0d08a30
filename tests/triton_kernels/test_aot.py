"""Every kernel configuration of the dispatch table compiles for sm_80 and sm_90 and does not spill (ptxas -v); the
extra problems (edge shapes of the interpreter tests, forced regimes of the GPU tests) compile too.

Runs ``python -m genknowsub_fast.triton_kernels.aot`` in a subprocess without TRITON_INTERPRET (this test process may
run the interpreter, which replaces the JITFunctions that ``triton.compile`` needs). Triton caches compiled kernels
(~/.triton/cache), so a second run takes a fraction of the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from genknowsub_fast.triton_kernels.dispatch import MODE_DENSE, MODE_GATHER, MODE_ROUTE, smem_limit

ARCHS = (80, 90)
KERNELS = {
    "_route_shrink_kernel",
    "_route_epilogue_kernel",
    "_expand_gather_kernel",
    "_expand_dense_kernel",
    "_grouped_shrink_kernel",
    "_grouped_expand_kernel",
}


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    from genknowsub_fast.triton_kernels.aot import ptxas_path

    if any(ptxas_path(a) is None for a in ARCHS):
        pytest.skip("ptxas not found (neither Triton's bundled one nor on PATH): cannot check registers and spills")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "genknowsub_fast.triton_kernels.aot", "--arch", *map(str, ARCHS), "--extra"]
    cmd += ["--json", str(out)]
    jobs = max(1, min(4, os.cpu_count() or 1))
    proc = subprocess.run([*cmd, "--jobs", str(jobs)], env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"aot produced no results (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def test_every_configuration_compiles(aot_results):
    results, proc = aot_results
    errors = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for arch in ARCHS:
        assert {r["kernel"] for r in results if r["arch"] == arch} == KERNELS


def test_no_register_spills(aot_results):
    results, _ = aot_results
    spills = [
        f"sm_{r['arch']} {r['kernel']} regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} "
        f"{r['constexprs']}"
        for r in results
        if r["problem"] == "table" and (r["spill_stores"] or r["spill_loads"])
    ]
    assert not spills, "\n".join(spills)
    assert all(0 < r["registers"] <= 255 for r in results if r["problem"] == "table")


def test_shared_memory_fits(aot_results):
    results, _ = aot_results
    for r in results:
        assert 0 <= r["shared_bytes"] <= smem_limit((r["arch"] // 10, r["arch"] % 10)), r


def test_table_reaches_every_route_variant(aot_results):
    """The problem set exercises each route mode, with and without split-K, for every dtype."""
    results, _ = aot_results
    seen = set()
    for r in results:
        if r["kernel"] == "_route_shrink_kernel":
            c = r["constexprs"]
            mode = next(m for m in (MODE_DENSE, MODE_GATHER, MODE_ROUTE) if f"'MODE': {m}," in c)
            seen.add((r["arch"], mode, "'STORE_PARTIAL': True" in c))
    for arch in ARCHS:
        assert {(arch, MODE_DENSE, True), (arch, MODE_DENSE, False), (arch, MODE_GATHER, True)} <= seen
        assert {(arch, MODE_ROUTE, True), (arch, MODE_ROUTE, False)} <= seen


def test_problem_set_covers_the_benchmarks(aot_results):
    """The AOT problem set is the GPU benchmark set (Phi-3-mini projections, both libraries, k=3, T in {1, 16, 256,
    4096}) in bfloat16 among others, and every kernel compiled in bfloat16 on both archs; the forced-regime extras
    were compiled as well."""
    from genknowsub_fast.triton_kernels import aot

    from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

    assert aot.PHI3_MINI == PHI3_MINI_SHAPES
    assert set(aot.EXPERT_SETS) == set(LIBRARIES.values()) and aot.TOP_K == TOP_K
    assert {1, 16, 256, 4096} <= set(aot.TOKENS)
    results, _ = aot_results
    for arch in ARCHS:
        bf16 = {r["kernel"] for r in results if r["arch"] == arch and "'*bf16'" in r["signature"]}
        assert bf16 == KERNELS, KERNELS - bf16
        assert any(r["problem"] == "edge" for r in results if r["arch"] == arch)
