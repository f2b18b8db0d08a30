"""What the compiler's own output says about every kernel configuration the dispatch table can choose, for sm_80 and
sm_90, under the GPU image's Triton (``tools/aot.py``: ``DEVICE_TRITON``), without a GPU:

- every configuration compiles (the interpreter tests' edge shapes with forced regimes too);
- none spills (``ptxas -v``), and shared memory fits the arch's per-block limit;
- every loop that loads from global memory loads its operands 16 bytes per instruction (vector loads, cp.async or
  bulk copies), read from the PTX;
- the problem set reaches every kernel variant and covers the benchmark and cost-model libraries, E = 256 and r = 16
  included.

Runs ``python -m tools.aot`` in a subprocess without TRITON_INTERPRET (this process may run the interpreter, which
replaces the JITFunctions ``triton.compile`` needs), with the device's Triton first on PYTHONPATH: ``make`` installs it
into ``.venv/aot-triton`` (the interpreter tests use the venv's newest Triton, whose interpreter works with current
NumPy; 3.6.0's does not); ``GKF_AOT_TRITON`` names another folder. Results are cached per configuration in
``.venv/aot-cache`` (keyed by the kernel source, constexprs, options, arch, Triton version and the tool itself), so a
run where nothing changed only records and hashes the launches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from genknowsub_fast.triton_kernels.dispatch import MODE_DENSE, MODE_ROUTE, smem_limit

from tools import aot

ARCHS = (80, 90)
# Both archs in every dtype (the table's block sizes, stage counts and atomics differ by dtype and arch: float32 takes
# FMA dots, bfloat16 on sm_80 a float32 atomics buffer, float16 on sm_80 16-bit atomics), sm_90 with the interpreter
# tests' edge shapes in bfloat16 besides. The first run compiles about 670 configurations (minutes on 2 cores);
# later runs read the cache.
RUNS = (["--arch", "90", "--extra", "--extra-dtype", "bfloat16"], ["--arch", "80"])
KERNELS = {
    "_decode_route_kernel",
    "_decode_shrink_kernel",
    "_decode_expand_kernel",
    "_route_shrink_kernel",
    "_expand_dense_kernel",
    "_scatter_kernel",
    "_grouped_shrink_kernel",
    "_grouped_expand_kernel",
}
REPO = Path(__file__).resolve().parents[2]


def aot_triton_dir() -> Path:
    """Where the device image's Triton is installed for this test (see the module docstring)."""
    return Path(os.environ.get("GKF_AOT_TRITON", REPO / ".venv" / "aot-triton"))


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    site = aot_triton_dir()
    if not (site / "triton").is_dir():
        pytest.fail(
            f"Triton {aot.DEVICE_TRITON} for the AOT check is not in {site}: run `make .venv/aot-triton/.installed` "
            "(make test does) or point GKF_AOT_TRITON at a folder holding it"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tmp = tmp_path_factory.mktemp("aot")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    cache = str(REPO / ".venv" / "aot-cache")
    results, procs = [], []
    for i, args in enumerate(RUNS):
        out = tmp / f"aot{i}.json"
        cmd = [sys.executable, "-m", "tools.aot", *args, "--json", str(out), "--jobs", jobs, "--cache", cache]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3000)
        if not out.exists():
            tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            pytest.fail(f"tools.aot {' '.join(args)} produced no results (rc={proc.returncode}):\n{tail}")
        results += json.loads(out.read_text())
        procs.append(proc)
    return results, procs


def _name(r: dict) -> str:
    return f"sm_{r['arch']} {r['kernel']} warps={r['num_warps']} stages={r['num_stages']} {r['constexprs']}"


def test_runs_under_the_device_triton(aot_results):
    results, _ = aot_results
    assert {r["triton_version"] for r in results} == {aot.DEVICE_TRITON}


def test_every_configuration_compiles(aot_results):
    results, procs = aot_results
    errors = [f"{_name(r)}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-6000:]
    for arch in ARCHS:
        assert {r["kernel"] for r in results if r["arch"] == arch} == KERNELS


def test_no_register_spills(aot_results):
    results, _ = aot_results
    table = [r for r in results if r["problem"] == "table"]
    spills = [
        f"{_name(r)} regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']}"
        for r in table
        if r["spill_stores"] != 0 or r["spill_loads"] != 0  # -1 (not measured) counts as a failure too
    ]
    assert not spills, "\n".join(spills)
    assert all(0 < r["registers"] <= 255 for r in table)


def test_shared_memory_fits(aot_results):
    results, _ = aot_results
    for r in results:
        assert 0 <= r["shared_bytes"] <= smem_limit((r["arch"] // 10, r["arch"] % 10)), _name(r)


def test_main_loops_load_16_bytes(aot_results):
    """Every loop of a table configuration that loads from global memory moves its operands 16 bytes per instruction
    (vector loads, cp.async or bulk copies; aot.streams_16_bytes), and the kernels with operand loops have them in
    the table (so the check is not vacuous)."""
    results, _ = aot_results
    table = [r for r in results if r["problem"] == "table"]
    narrow = [
        f"{_name(r)}: {lp}" for r in table for lp in aot.main_loops(r["loops"]) if not aot.streams_16_bytes(lp)
    ]
    assert not narrow, "\n".join(narrow)
    for arch in ARCHS:
        with_loops = {r["kernel"] for r in table if r["arch"] == arch and aot.main_loops(r["loops"])}
        # The decode expand and the grouped expand have no loop over their operands (one tile per program), the
        # scatter unrolls its pair chunks.
        assert with_loops >= KERNELS - {"_decode_expand_kernel", "_grouped_expand_kernel", "_scatter_kernel"}
    cp_async = {r["kernel"] for r in table if any(lp["cp_async"].get("16") for lp in r["loops"])}  # JSON: str keys
    assert {"_route_shrink_kernel", "_expand_dense_kernel"} <= cp_async, "the GEMM loops must be pipelined"


def test_loop_parser_on_known_ptx():
    """The PTX reader counts a loop's loads by width (a fixture in the form Triton 3.6.0 emits)."""
    ptx = "\n".join([
        "$L__BB0_1:",
        "\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];",
        "$L__BB0_2:                              // =>This Inner Loop Header: Depth=1",
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];",
        "\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;",
        "\t@%p2 ld.global.L1::evict_last.b32 { %r7 }, [ %rd4 + 0 ];",
        "\t@%p3 bra \t$L__BB0_2;",
        "\tbra.uni \t$L__BB0_3;",
        "$L__BB0_3:",
    ])  # fmt: skip
    (loop,) = aot.loop_loads(ptx)
    assert loop["label"] == "$L__BB0_2" and loop["ld"] == {16: 1, 4: 1} and loop["cp_async"] == {16: 1}
    assert aot.streams_16_bytes(loop)
    assert not aot.streams_16_bytes({"ld": {2: 9, 16: 1}, "cp_async": {}, "bulk": 0})
    assert not aot.streams_16_bytes({"ld": {2: 8}, "cp_async": {}, "bulk": 0}), "scalar 2-byte loads"
    assert aot.streams_16_bytes({"ld": {}, "cp_async": {8: 2}, "bulk": 0}), "an 8-byte vector per thread: a small tile"


def test_table_reaches_every_variant(aot_results):
    """The problem set exercises each route mode and phase, the decode kernels with and without caller scores, and
    the dense expand fused with the base GEMM and not, on both archs."""
    results, _ = aot_results
    seen = set()
    for r in results:
        c, arch = r["constexprs"], r["arch"]
        if r["kernel"] == "_route_shrink_kernel":
            mode = next(m for m in (MODE_DENSE, MODE_ROUTE) if f"'MODE': {m}," in c)
            phase = next(p for p in (0, 1, 2) if f"'PHASE': {p}," in c)
            seen.add((arch, "route", mode, phase))
        elif r["kernel"] == "_decode_shrink_kernel":
            seen.add((arch, "decode", "'HAS_SCORES': True" in c))
        elif r["kernel"] == "_expand_dense_kernel":
            seen.add((arch, "fused", "'FUSE_BASE': True" in c))
    for arch in ARCHS:
        assert {(arch, "route", m, p) for m in (MODE_DENSE, MODE_ROUTE) for p in (0, 1, 2)} <= seen
        assert {(arch, "decode", True), (arch, "decode", False), (arch, "fused", True), (arch, "fused", False)} <= seen


def test_problem_set_covers_the_benchmarks_and_the_cost_model(aot_results):
    """The AOT problem set holds the GPU benchmark set (Phi-3-mini projections, both libraries, k=3, T in {1, 16,
    256, 4096}) and the cost model's table (E in {10, 64, 256}, r in {8, 16}, T in {1, 16, 2048}); every kernel was
    compiled as the table configures it for bfloat16, float16 and float32 layers on both archs, at E = 256 with
    r = 16 among them."""
    from benchmarks import gpu_model
    from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

    assert aot.PHI3_MINI == PHI3_MINI_SHAPES
    assert set(aot.EXPERT_SETS) == set(LIBRARIES.values()) and aot.TOP_K == TOP_K
    assert {1, 16, 256, 4096} <= set(aot.TOKENS)
    assert set(gpu_model.TABLE_TOKENS) <= set(aot.TOKENS)
    assert {(e, r) for e in gpu_model.TABLE_EXPERTS for r in gpu_model.TABLE_RANKS} <= set(
        aot.EXPERT_SETS + aot.MODEL_SETS
    )
    results, _ = aot_results
    for arch in ARCHS:
        table = [r for r in results if r["arch"] == arch and r["problem"] == "table"]
        for dt in ("bf16", "fp16"):
            compiled = {r["kernel"] for r in table if f"'*{dt}'" in r["signature"]}
            assert compiled == KERNELS - {"_scatter_kernel"}, (arch, dt, KERNELS - compiled)  # no float operand
        fp32_only = {r["kernel"] for r in table if not re.search(r"'\*(bf16|fp16)'", r["signature"])}
        assert fp32_only >= KERNELS - {"_scatter_kernel"}, (arch, "float32 layers", KERNELS - fp32_only)
        e256 = [r for r in results if r["arch"] == arch and re.search(r"'BLOCK_E': 256\b", r["constexprs"])]
        assert {r["kernel"] for r in e256} >= {"_decode_shrink_kernel", "_route_shrink_kernel", "_scatter_kernel"}
        e256_r16 = {r["kernel"] for r in e256 if "'BLOCK_R': 16," in r["constexprs"]}
        assert e256_r16 >= {"_decode_shrink_kernel", "_route_shrink_kernel"}, (arch, "E = 256, r = 16")
    assert any(r["problem"] == "edge" for r in results)
