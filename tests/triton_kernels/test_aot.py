"""Every kernel configuration of the dispatch table compiles for sm_90 (every dtype) and sm_80 (bfloat16) under the
GPU image's Triton (``aot.DEVICE_TRITON``) and does not spill (ptxas -v); the extra problems (edge shapes of the
interpreter tests, forced regimes of the GPU tests) compile for sm_90 in bfloat16 too. The subset keeps this test at a
few minutes on 2 cores; ``python -m genknowsub_fast.triton_kernels.aot --arch 80 90 --extra`` compiles everything.

Runs ``python -m genknowsub_fast.triton_kernels.aot`` in a subprocess without TRITON_INTERPRET (this test process may
run the interpreter, which replaces the JITFunctions that ``triton.compile`` needs), with the device's Triton first on
PYTHONPATH: ``make`` installs it into ``.venv/aot-triton`` (the interpreter tests use the newest Triton, whose
interpreter works with current NumPy; 3.6.0's does not); ``GKF_AOT_TRITON`` names another folder. Triton caches
compiled kernels (~/.triton/cache), so a second run takes a fraction of the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from genknowsub_fast.triton_kernels import aot
from genknowsub_fast.triton_kernels.dispatch import MODE_DENSE, MODE_ROUTE, smem_limit

ARCHS = (80, 90)
KERNELS = {
    "_align_kernel",
    "_decode_shrink_kernel",
    "_decode_expand_kernel",
    "_route_shrink_kernel",
    "_expand_dense_kernel",
    "_grouped_shrink_kernel",
    "_grouped_expand_kernel",
}
REPO = Path(__file__).resolve().parents[2]
RUNS = (["--arch", "90", "--extra", "--extra-dtype", "bfloat16"], ["--arch", "80", "--dtype", "bfloat16"])


def aot_triton_dir() -> Path:
    """Where the device image's Triton is installed for this test (see the module docstring)."""
    return Path(os.environ.get("GKF_AOT_TRITON", REPO / ".venv" / "aot-triton"))


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    site = aot_triton_dir()
    if not (site / "triton").is_dir():
        pytest.fail(
            f"Triton {aot.DEVICE_TRITON} for the AOT check is not in {site}: run `make .venv/aot-triton` (make test "
            "does) or point GKF_AOT_TRITON at a folder holding it"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tmp = tmp_path_factory.mktemp("aot")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    results, procs = [], []
    for i, args in enumerate(RUNS):
        out = tmp / f"aot{i}.json"
        cmd = [sys.executable, "-m", "genknowsub_fast.triton_kernels.aot", *args, "--json", str(out), "--jobs", jobs]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        if not out.exists():
            tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            pytest.fail(f"aot {' '.join(args)} produced no results (rc={proc.returncode}):\n{tail}")
        results += json.loads(out.read_text())
        procs.append(proc)
    return results, procs


def test_runs_under_the_device_triton(aot_results):
    results, _ = aot_results
    assert {r["triton_version"] for r in results} == {aot.DEVICE_TRITON}


def test_every_configuration_compiles(aot_results):
    results, procs = aot_results
    errors = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-4000:]
    for arch in ARCHS:
        assert {r["kernel"] for r in results if r["arch"] == arch} == KERNELS


def test_no_register_spills(aot_results):
    results, _ = aot_results
    table = [r for r in results if r["problem"] == "table"]
    spills = [
        f"sm_{r['arch']} {r['kernel']} regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} "
        f"{r['constexprs']}"
        for r in table
        if r["spill_stores"] != 0 or r["spill_loads"] != 0  # -1 (not measured) counts as a failure too
    ]
    assert not spills, "\n".join(spills)
    assert all(0 < r["registers"] <= 255 for r in table)


def test_shared_memory_fits(aot_results):
    results, _ = aot_results
    for r in results:
        assert 0 <= r["shared_bytes"] <= smem_limit((r["arch"] // 10, r["arch"] % 10)), r


def test_table_reaches_every_variant(aot_results):
    """The problem set exercises each route mode and phase, the decode kernels with and without caller scores, and
    the fused-base dense expand, on both archs."""
    results, _ = aot_results
    seen = set()
    for r in results:
        c, arch = r["constexprs"], r["arch"]
        if r["kernel"] == "_route_shrink_kernel":
            mode = next(m for m in (MODE_DENSE, MODE_ROUTE) if f"'MODE': {m}," in c)
            phase = next(p for p in (0, 1, 2) if f"'PHASE': {p}," in c)
            seen.add((arch, "route", mode, phase))
        elif r["kernel"] == "_decode_expand_kernel":
            seen.add((arch, "decode", "'HAS_SCORES': True" in c))
        elif r["kernel"] == "_expand_dense_kernel":
            seen.add((arch, "fused", "'FUSE_BASE': True" in c))
    for arch in ARCHS:
        assert {(arch, "route", m, p) for m in (MODE_DENSE, MODE_ROUTE) for p in (0, 1, 2)} <= seen
        assert {(arch, "decode", True), (arch, "decode", False), (arch, "fused", True), (arch, "fused", False)} <= seen


def test_problem_set_covers_the_benchmarks(aot_results):
    """The AOT problem set is the GPU benchmark set (Phi-3-mini projections, both libraries, k=3, T in {1, 16, 256,
    4096}) in bfloat16 among others, and every kernel compiled in bfloat16 on both archs; the forced-regime extras
    were compiled as well."""
    from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

    assert aot.PHI3_MINI == PHI3_MINI_SHAPES
    assert set(aot.EXPERT_SETS) == set(LIBRARIES.values()) and aot.TOP_K == TOP_K
    assert {1, 16, 256, 4096} <= set(aot.TOKENS)
    results, _ = aot_results
    for arch in ARCHS:
        bf16 = {r["kernel"] for r in results if r["arch"] == arch and "'*bf16'" in r["signature"]}
        assert bf16 == KERNELS - {"_align_kernel"}, KERNELS - bf16  # the alignment kernel has no float operand
    assert any(r["problem"] == "edge" for r in results if r["arch"] == 90)
