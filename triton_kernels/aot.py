"""Ahead-of-time compile of every kernel configuration the dispatch table produces, for a GPU target, without a GPU.

The launches are recorded (``launch.recording``) while the real launch code runs on meta tensors, then specialised
exactly as Triton's JIT would (same binder: integer and alignment specialisation) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. ``ptxas -v`` on the resulting PTX reports
registers, stack and spills. Must run in a process without TRITON_INTERPRET=1 (the interpreter replaces the
JITFunctions this needs); the tests run it as a subprocess::

    python -m genknowsub_fast.triton_kernels.aot --arch 80 90 --json out.json

The problem set is the GPU benchmark set (``benchmarks/phi3_shapes.py``: Phi-3-mini projections, E=10 r=4 and E=64
r=8, k=3, T in {1, 16, 256, 4096}), plus T=7 (a token count that is neither 1 nor a multiple of 16), T=17 (the first
prefill count) and T=16384 (enough token blocks that the route pass runs without split-K on these parts), in float16,
bfloat16 and float32, both mixing modes; the fused-base dense expand the benchmarks time ("ours_fused"); and
caller-given scores in each regime.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from . import launch as launch_mod
from .dispatch import choose_plan
from .linear import add_delta_

PHI3_MINI = {"qkv_proj": (3072, 9216), "o_proj": (3072, 3072), "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}
EXPERT_SETS = ((10, 4), (64, 8))
TOP_K = 3
TOKENS = (1, 7, 16, 17, 256, 4096, 16384)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton of the GPU machine's image: the compile and spill check must run under it, since register allocation
# differs between versions (two configurations of an earlier table spilled 4 bytes under 3.6.0
# only).
DEVICE_TRITON = "3.6.0"
# SM counts of the parts these architectures are benchmarked on (A100 SXM: 108, H100 SXM: 132; vendor data sheets);
# they only size split-K.
NUM_SMS = {80: 108, 90: 132}
# Table problems beyond the plain table calls (d_in, d_out, E, r, k, T, fuse_base, has_scores): the fused-base dense
# expand at the benchmark shapes, and caller-given scores in each regime. They must not spill either.
VARIANT_PROBLEMS = tuple(
    [(d_in, d_out, 10, 4, TOP_K, t, True, False) for (d_in, d_out) in PHI3_MINI.values() for t in (256, 4096)]
    + [(3072, 9216, e, r, TOP_K, t, None, True) for (e, r) in EXPERT_SETS for t in (1, 16, 256, 4096)]
)  # fmt: skip
# Extra problems (d_in, d_out, E, r, k, T, regime): what the interpreter tests run (E=1, r=1, k=1, k=E, k·r=128,
# d not a multiple of 16, every regime forced), which the interpreter accepts but a GPU compiler may not (block dims
# below 16, size-1 aranges, reshapes with unit dims); the forced regimes of tests/triton_kernels/test_gpu.py at
# E=64 r=8; and the expert sets of the GPU model benchmark (10 task adapters of rank 8: E=10 r=8) and of the end-to-end
# test (tiny Phi-3, hidden 64). All must compile; those without a forced regime are dispatch-table configurations and
# must not spill either (tag "table"); a forced regime outside its table range, or a row stride that is not a multiple
# of 16 bytes (no vector loads), may spill: that is slow, not wrong (tag "edge").
EXTRA_PROBLEMS = tuple(
    [(d_in, d_out, e, r, k, t, reg) for (d_in, d_out, e, r, k, t) in (
        (19, 23, 1, 1, 1, 1), (37, 70, 4, 3, 4, 7), (20, 40, 9, 32, 4, 2), (20, 40, 9, 32, 4, 35),
    ) for reg in ("decode", "dense", "grouped")]
    + [(3072, 1040, 64, 8, 3, t, reg) for t in (1, 300) for reg in ("decode", "dense", "grouped")]
    + [(3072, 9216, 10, 8, 3, t, None) for t in (1, 16, 512)]
    + [(8192, 3072, 10, 8, 3, t, None) for t in (1, 512)]
    + [(64, 192, 5, 4, 3, t, None) for t in (1, 24)]
)  # fmt: skip


@dataclass
class CompileResult:
    """One compiled configuration and what ptxas said about it."""

    kernel: str
    arch: int
    signature: str
    constexprs: str
    num_warps: int
    num_stages: int
    problem: str = "table"  # "table": a dispatch-table configuration; "edge": a forced regime of EXTRA_PROBLEMS
    shared_bytes: int = -1
    registers: int = -1
    stack_bytes: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    error: str = ""
    seconds: float = 0.0
    triton_version: str = ""


def _record(
    arch, d_in, d_out, e, r, k, t, dtype, mix_weights, regime=None, fuse_base=None, has_scores=False
) -> list[launch_mod.Launch]:
    """The launches of one routed-delta call (table plan, or ``regime`` / ``fuse_base`` forced) on meta tensors."""
    meta = torch.device("meta")
    cap = (arch // 10, arch % 10)
    plan = choose_plan(t, e, r, k, d_in, d_out, dtype, cap, NUM_SMS[arch], has_scores, regime, None, fuse_base)
    x = torch.empty(t, d_in, device=meta, dtype=dtype)
    prototypes = torch.empty(e, d_in, device=meta, dtype=torch.float32)
    pieces = prototypes if dtype == torch.float32 else torch.empty(3 * e, d_in, device=meta, dtype=dtype)
    a = torch.empty(e * r, d_in, device=meta, dtype=dtype)
    b_t = torch.empty(e, r, d_out, device=meta, dtype=dtype)
    y = torch.empty(t, d_out, device=meta, dtype=dtype)
    weight = torch.empty(d_out, d_in, device=meta, dtype=dtype)
    bias = torch.empty(d_out, device=meta, dtype=dtype)
    scores = torch.empty(t, e, device=meta, dtype=torch.float32) if has_scores else None
    with launch_mod.recording() as rec:
        add_delta_(y, x, prototypes, pieces, 1.0, a, b_t, k, 1.0, mix_weights, plan, True, scores, weight, bias)
    return rec


def record_table_launches(
    arch: int,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    extra: bool = False,
    extra_dtypes: tuple[torch.dtype, ...] | None = None,
) -> list[launch_mod.Launch]:
    """Every launch the dispatch table makes for the problem set on ``arch``, recorded on meta tensors.

    With ``extra`` the launches of :data:`EXTRA_PROBLEMS` follow, in ``extra_dtypes`` (default: ``dtypes``); each
    launch's ``tag`` says "table" (a configuration the dispatch table picks) or "edge" (a forced regime).
    """
    launches = []
    for i, (d_in, d_out) in enumerate(PHI3_MINI.values()):
        for e, r in EXPERT_SETS:
            for t in TOKENS:
                for dtype in dtypes:
                    # "weights" mixing changes only the epilogue: compiled for the first projection.
                    for mix_weights in (False, True) if i == 0 else (False,):
                        launches.extend(_record(arch, d_in, d_out, e, r, TOP_K, t, dtype, mix_weights))
    for d_in, d_out, e, r, k, t, fuse, scores in VARIANT_PROBLEMS:
        for dtype in dtypes:
            launches.extend(_record(arch, d_in, d_out, e, r, k, t, dtype, False, None, fuse, scores))
    for ln in launches:
        ln.tag = "table"
    if extra:
        for d_in, d_out, e, r, k, t, regime in EXTRA_PROBLEMS:
            for dtype in extra_dtypes or dtypes:
                for mix_weights in (False, True):
                    rec = _record(arch, d_in, d_out, e, r, k, t, dtype, mix_weights, regime)
                    for ln in rec:
                        ln.tag = "table" if regime is None else "edge"
                    launches.extend(rec)
    return launches


def _specialise(ln: launch_mod.Launch, arch: int):
    """(ASTSource, options) exactly as Triton's JIT would build them for this launch on ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = ln.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**ln.constexprs, **ln.options}
    bound, specialization, options = binder(*ln.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compiler.ASTSource(kernel, signature, constexprs, attrs), options, target


def unique_configs(launches: list[launch_mod.Launch], arch: int) -> list[launch_mod.Launch]:
    """Launches that compile to distinct binaries (same kernel, specialised signature, constexprs and options)."""
    seen, out = set(), []
    for ln in launches:
        src, options, _ = _specialise(ln, arch)
        key = (ln.name, src.hash(), options.num_warps, options.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(ln)
    return out


def ptxas_path(arch: int) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (it writes PTX versions its own ptxas reads), else the one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure here just means "use PATH"
        pass
    return shutil.which("ptxas")


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` on ``ptx`` (flags as Triton passes them)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    exe = ptxas_path(arch)
    if exe is None:
        raise FileNotFoundError("ptxas not found (neither Triton's bundled one nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [exe, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def _compile_one(payload: tuple[int, int]) -> CompileResult:
    arch, i = payload
    ln = _WORKER_LAUNCHES[i]
    import triton

    src, options, target = _specialise(ln, arch)
    res = CompileResult(
        kernel=ln.name,
        arch=arch,
        signature=str(src.signature),
        constexprs=str({ln.kernel.arg_names[k[0]]: v for k, v in src.constants.items()}),
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        problem=ln.tag or "table",
        triton_version=triton.__version__,
    )
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
        res.shared_bytes = int(compiled.metadata.shared)
        if res.problem == "table" or _PTXAS_EDGE:
            for k, v in ptxas_usage(compiled.asm["ptx"], arch).items():
                setattr(res, k, v)
    except Exception as exc:  # noqa: BLE001 - reported per configuration, the caller decides
        res.error = f"{type(exc).__name__}: {exc}"[:4000]
    res.seconds = time.perf_counter() - t0
    return res


_WORKER_LAUNCHES: list[launch_mod.Launch] = []
# ptxas -v on forced-regime ("edge") configurations too: they only need to compile, and the extra ptxas pass per
# configuration is most of the time of a run whose compiles are cached.
_PTXAS_EDGE = False


def compile_table(
    archs: list[int],
    jobs: int,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    kernel_filter: str = "",
    extra: bool = False,
    extra_dtypes: tuple[torch.dtype, ...] | None = None,
) -> list[CompileResult]:
    """Compile every unique configuration of the table (and with ``extra`` of EXTRA_PROBLEMS) for each arch.

    ``jobs`` worker processes; ``dtypes`` and ``kernel_filter`` (a substring of the kernel name) narrow the set.
    A configuration recorded as both "table" and "edge" counts as "table" when a table launch came first.
    """
    global _WORKER_LAUNCHES
    results = []
    for arch in archs:
        launches = record_table_launches(arch, dtypes, extra, extra_dtypes)
        launches = [ln for ln in launches if kernel_filter in ln.name]
        _WORKER_LAUNCHES = unique_configs(launches, arch)
        payloads = [(arch, i) for i in range(len(_WORKER_LAUNCHES))]
        if jobs > 1:
            # fork: the workers inherit the recorded launches (meta tensors and JITFunctions do not pickle).
            import multiprocessing as mp

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
                results.extend(pool.map(_compile_one, payloads))
        else:
            results.extend(map(_compile_one, payloads))
    return results


def _dtypes(signature: str) -> str:
    """The distinct pointer element types of a signature, e.g. "bf16,fp32,i32"."""
    return ",".join(sorted(set(re.findall(r"'\*(\w+)'", signature))))


def main(argv: list[str] | None = None) -> int:
    """CLI: compile the table for the given archs, print a summary, optionally write JSON; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--json", help="write the per-configuration results here")
    parser.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"], help="only these dtypes")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--extra", action="store_true", help="also EXTRA_PROBLEMS (edge shapes, forced regimes)")
    parser.add_argument("--extra-dtype", nargs="+", choices=["float16", "bfloat16", "float32"],
                        help="dtypes of the EXTRA_PROBLEMS (default: those of --dtype)")  # fmt: skip
    parser.add_argument("--ptxas-edge", action="store_true", help="registers/spills of forced-regime configs too")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    global _PTXAS_EDGE
    _PTXAS_EDGE = args.ptxas_edge
    extra_dtypes = tuple(getattr(torch, d) for d in args.extra_dtype) if args.extra_dtype else None
    results = compile_table(args.arch, args.jobs, dtypes, args.kernel, args.extra, extra_dtypes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    bad = 0
    for r in results:
        if r.error:
            flag = "ERROR " + r.error.splitlines()[0]
        elif r.registers < 0:
            flag = "compiled (no ptxas -v: forced regime)"  # -1: not measured, which is neither a spill nor a pass
        elif r.spill_stores > 0 or r.spill_loads > 0:
            flag = "SPILL" if r.problem == "table" else "spill (forced regime: allowed)"
        else:
            flag = "ok"
        bad += flag.startswith(("ERROR", "SPILL"))
        print(
            f"sm_{r.arch} {r.problem:5s} {r.kernel:28s} warps={r.num_warps} stages={r.num_stages} "
            f"regs={r.registers:3d} stack={r.stack_bytes} spill={r.spill_stores}/{r.spill_loads} "
            f"smem={r.shared_bytes:6d} {r.seconds:5.1f}s {flag}  {_dtypes(r.signature)} {r.constexprs}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
