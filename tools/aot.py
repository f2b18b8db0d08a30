"""Ahead-of-time compile of every kernel configuration the dispatch table produces, for a GPU target, without a GPU,
and what the compiler's output says about each: registers and spills (``ptxas -v``), shared memory, and how the main
loops load (16-byte vectors or cp.async, read from the PTX).

The launches are recorded (``launch.recording``) while the real launch code runs on meta tensors, then specialised
exactly as Triton's JIT would (same binder: integer and alignment specialisation) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. Must run in a process without
TRITON_INTERPRET=1 (the interpreter replaces the JITFunctions this needs) and with the GPU image's Triton
(:data:`DEVICE_TRITON`: register allocation and vectorisation differ between versions); ``make
.venv/aot-triton/.installed`` installs it beside the venv, and the test runs this as a subprocess::

    PYTHONPATH=.venv/aot-triton:. python -m tools.aot --arch 80 90 --json out.json

The problem set (:func:`table_problems`): Phi-3-mini's four projections with the benchmark libraries (E=10 r=4,
E=64 r=8) and the cost model's table (E in {10, 64, 256}, r in {8, 16}), k=3, T in {1, 7, 16, 17, 256, 2048, 4096,
16384} (decode, the first prefill count, enough token blocks that the route pass runs without split-K), both mixing
modes, caller-given scores, a delta-only call and a transposed base weight (no fused base); :data:`EXTRA_PROBLEMS`
adds the interpreter tests' edge shapes with every regime forced (they must compile; a forced regime off its table
range or rows that are not 16-byte aligned may spill or load narrowly: slow, not wrong).

This is a developer tool pinned to the device's Triton, so it lives outside the installed package.
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
from dataclasses import asdict, dataclass, field

import torch
from genknowsub_fast.triton_kernels import launch as launch_mod
from genknowsub_fast.triton_kernels.dispatch import LayerSpec
from genknowsub_fast.triton_kernels.linear import PreparedExperts, routed_linear

PHI3_MINI = {"qkv_proj": (3072, 9216), "o_proj": (3072, 3072), "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}
EXPERT_SETS = ((10, 4), (64, 8))  # the benchmark libraries (benchmarks/phi3_shapes.py)
MODEL_SETS = ((10, 8), (10, 16), (64, 16), (256, 8), (256, 16))  # the cost model's table, beyond EXPERT_SETS
TOP_K = 3
TOKENS = (1, 7, 16, 17, 256, 2048, 4096, 16384)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton of the GPU machine's image: the compile, spill and vector-load checks must run under it.
DEVICE_TRITON = "3.6.0"
# SM counts of the parts these architectures are benchmarked on (A100 SXM: 108, H100 SXM: 132; vendor data sheets);
# they only size split-K.
NUM_SMS = {80: 108, 90: 132}
# Extra problems (d_in, d_out, E, r, k, T, regime): what the interpreter tests run (E=1, r=1, k=1, k=E, k·r=128,
# d not a multiple of 16, every regime forced), which the interpreter accepts but a GPU compiler may not (block dims
# below 16, size-1 aranges, reshapes with unit dims); the forced regimes of tests/triton_kernels/test_gpu.py at
# E=64 r=8; and the expert sets of the end-to-end test (tiny Phi-3, hidden 64; small Phi-3, E=16 r=8). Those without
# a forced regime are table configurations (tag "table"), the others "edge".
EXTRA_PROBLEMS = tuple(
    [(d_in, d_out, e, r, k, t, reg) for (d_in, d_out, e, r, k, t) in (
        (19, 23, 1, 1, 1, 1), (37, 70, 4, 3, 4, 7), (20, 40, 9, 32, 4, 2), (20, 40, 9, 32, 4, 35),
    ) for reg in ("decode", "dense", "grouped")]
    + [(3072, 1040, 64, 8, 3, t, reg) for t in (1, 300) for reg in ("decode", "dense", "grouped")]
    + [(64, 192, 5, 4, 3, t, None) for t in (1, 24)]
    + [(256, 768, 16, 8, 3, t, None) for t in (2, 24)]
)  # fmt: skip


def table_problems() -> list[tuple]:
    """(d_in, d_out, E, r, k, T, mix_weights, has_scores, has_weight) of the table set (see the module docstring)."""
    out = []
    for i, (d_in, d_out) in enumerate(PHI3_MINI.values()):
        for e, r in EXPERT_SETS + MODEL_SETS:
            for t in TOKENS:
                out.append((d_in, d_out, e, r, TOP_K, t, False, False, True))
                if i == 0:  # "weights" mixing, caller scores, delta-only: other epilogues, compiled for one shape
                    out += [(d_in, d_out, e, r, TOP_K, t, True, False, True),
                            (d_in, d_out, e, r, TOP_K, t, False, True, True),
                            (d_in, d_out, e, r, TOP_K, t, False, False, False)]  # fmt: skip
    return out


@dataclass
class CompileResult:
    """One compiled configuration and what the compiler's output says about it."""

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
    loops: list[dict] = field(default_factory=list)  # per loop of the PTX: its global loads by width (loop_loads)
    error: str = ""
    seconds: float = 0.0
    triton_version: str = ""


def meta_layer(arch: int | None, d_in, d_out, e, r, k, dtype, mix_weights=False, regime=None, fuse_base=None):
    """A :class:`PreparedExperts` of meta tensors for ``arch`` (None: the interpreter's table, no SM count)."""
    cap = (arch // 10, arch % 10) if arch else None
    spec = LayerSpec(e, r, k, d_in, d_out, dtype, cap, NUM_SMS.get(arch), regime, None, fuse_base, mix_weights)
    return PreparedExperts.on_meta(spec)


def record_call(layer: PreparedExperts, t: int, has_scores=False, has_weight=True) -> list[launch_mod.Launch]:
    """The launches of one ``routed_linear`` call of T tokens (recorded, not run)."""
    new = lambda *s, dtype=layer.spec.dtype: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    x = new(t, layer.d_in)
    scores = new(t, layer.num_experts, dtype=torch.float32) if has_scores else None
    weight = new(layer.d_out, layer.d_in) if has_weight else None
    bias = new(layer.d_out) if has_weight else None
    with launch_mod.recording() as rec:
        routed_linear(layer, x, weight, bias, scores, beside=layer.spec.capability is not None)
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
    for d_in, d_out, e, r, k, t, mix, scores, weight in table_problems():
        for dtype in dtypes:
            layer = meta_layer(arch, d_in, d_out, e, r, k, dtype, mix)
            launches.extend(record_call(layer, t, scores, weight))
    for ln in launches:
        ln.tag = "table"
    if extra:
        for d_in, d_out, e, r, k, t, regime in EXTRA_PROBLEMS:
            for dtype in extra_dtypes or dtypes:
                for mix in (False, True):
                    rec = record_call(meta_layer(arch, d_in, d_out, e, r, k, dtype, mix, regime), t)
                    for ln in rec:
                        ln.tag = "table" if regime is None else "edge"
                    launches.extend(rec)
    return launches


def _specialise(ln: launch_mod.Launch, arch: int):
    """(ASTSource, options, target) exactly as Triton's JIT would build them for this launch on ``arch``."""
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


def _quick_key(ln: launch_mod.Launch) -> tuple:
    """A key at least as fine as Triton's specialisation of a recorded launch (meta tensors: dtype only, their data
    pointer is 0; integers: equal to 1, divisible by 16, past int32), cheap enough to drop repeats before
    specialising."""

    def arg(a):
        if isinstance(a, torch.Tensor):
            return ("t", str(a.dtype), a.data_ptr() % 16)
        if isinstance(a, bool) or a is None:
            return ("v", a)
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, a >= 2**31)
        return (type(a).__name__,)

    return (ln.name, tuple(sorted(ln.constexprs.items())), tuple(sorted(ln.options.items())), tuple(map(arg, ln.args)))


def unique_configs(launches: list[launch_mod.Launch], arch: int) -> list[launch_mod.Launch]:
    """Launches that compile to distinct binaries (same kernel, specialised signature, constexprs and options); a
    configuration recorded both as "table" and "edge" keeps the "table" tag."""
    first: dict[tuple, launch_mod.Launch] = {}
    for ln in launches:
        prev = first.setdefault(_quick_key(ln), ln)
        if prev is not ln and ln.tag == "table":
            prev.tag = "table"
    seen: dict[tuple, launch_mod.Launch] = {}
    for ln in first.values():
        src, options, _ = _specialise(ln, arch)
        key = (ln.name, src.hash(), options.num_warps, options.num_stages)
        if key not in seen:
            seen[key] = ln
        elif ln.tag == "table":
            seen[key].tag = "table"
    return list(seen.values())


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


def parse_ptxas_log(log: str) -> dict[str, int] | None:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (None when the log has none)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        return None
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


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
    usage = parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return usage


_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bsuf](\d+)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_BULK = re.compile(r"\bcp\.async\.bulk")


def loop_loads(ptx: str) -> list[dict]:
    """Each loop of ``ptx`` (a label that a later branch jumps back to) with its global loads by bytes per
    instruction: ``{"label", "lines", "ld": {bytes: count}, "cp_async": {bytes: count}, "bulk": count}``.

    A loop's body is the text from its label to the last branch back to it; nested loops count in their parents too.
    """
    lines = ptx.splitlines()
    where = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            where[m.group(1)] = i
    last_back = {}
    for i, line in enumerate(lines):
        for m in _BRANCH.finditer(line):
            target = m.group(1)
            if target in where and where[target] < i:
                last_back[target] = i
    loops = []
    for label, end in sorted(last_back.items(), key=lambda kv: where[kv[0]]):
        ld: dict[int, int] = {}
        cp: dict[int, int] = {}
        bulk = 0
        for line in lines[where[label] : end + 1]:
            for m in _LD_GLOBAL.finditer(line):
                width = int(m.group(1) or 1) * int(m.group(2)) // 8
                ld[width] = ld.get(width, 0) + 1
            for m in _CP_ASYNC.finditer(line):
                width = int(m.group(1), 0)
                cp[width] = cp.get(width, 0) + 1
            bulk += len(_BULK.findall(line))
        loops.append({"label": label, "lines": end - where[label], "ld": ld, "cp_async": cp, "bulk": bulk})
    return loops


def streams_16_bytes(loop: dict) -> bool:
    """A loop loads its operands 16 bytes per instruction: the bytes moved by 16-byte vector loads, 16-byte cp.async
    and bulk (TMA) copies are at least those moved by narrower loads, or the narrower loads are all vectors of 8
    bytes or more that add up to at most 32 bytes per thread and step (a tile too small to give each thread 16
    bytes, as the route pass's x and prototype tiles at 16 token rows are). Scalar 1-, 2- or 4-byte loads pass only
    beside a majority of 16-byte ones (indices, weights)."""
    loads = [(int(w), n) for d in (loop["ld"], loop["cp_async"]) for w, n in d.items()]  # JSON keys are strings
    wide = 16 * (sum(n for w, n in loads if w >= 16) + loop["bulk"])
    narrow = [(w, n) for w, n in loads if w < 16]
    narrow_bytes = sum(w * n for w, n in narrow)
    return wide >= narrow_bytes or (min(w for w, _ in narrow) >= 8 and narrow_bytes <= 32)


def main_loops(loops: list[dict]) -> list[dict]:
    """The loops that load from global memory (the main loops of these kernels: K loops, split sums, pair chunks)."""
    return [lp for lp in loops if lp["ld"] or lp["cp_async"] or lp["bulk"]]


def _cache_key(src, options, arch: int) -> str:
    """Key of a configuration's results: the specialised kernel (source, its callees, constexprs, attributes), the
    launch options, the arch, the Triton version and this file (which decides what is measured)."""
    import hashlib

    import triton

    with open(__file__, "rb") as f:
        tool = hashlib.sha256(f.read()).hexdigest()
    text = f"{src.hash()}|{options.hash()}|{arch}|{triton.__version__}|{tool}"
    return hashlib.sha256(text.encode()).hexdigest()


def _compile_one(payload: tuple[int, int]) -> CompileResult:
    arch, i = payload
    ln = _WORKER_LAUNCHES[i]
    import contextlib
    import io

    import triton
    from triton import knobs

    src, options, target = _specialise(ln, arch)
    key = _cache_key(src, options, arch)
    cached = os.path.join(_CACHE_DIR, key + ".json") if _CACHE_DIR else ""
    if cached and os.path.exists(cached):
        with open(cached) as f:
            res = CompileResult(**json.load(f))
        res.problem = ln.tag or "table"
        res.seconds = 0.0
        return res
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
        # Triton runs ptxas -v itself when it builds the cubin; its log (printed with dump_ptxas_log) is parsed
        # instead of running ptxas a second time. A Triton cache hit prints nothing: then ptxas runs here.
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=target, options=options.__dict__)
        res.shared_bytes = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        res.loops = loop_loads(ptx)
        if _DUMP_DIR:
            with open(os.path.join(_DUMP_DIR, f"sm{arch}_{ln.name}_{i}.ptx"), "w") as f:
                f.write(f"// {res.constexprs}\n{ptx}")
        usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(ptx, arch)
        for k, v in usage.items():
            setattr(res, k, v)
    except Exception as exc:  # noqa: BLE001 - reported per configuration, the caller decides
        res.error = f"{type(exc).__name__}: {exc}"[:4000]
    res.seconds = time.perf_counter() - t0
    if cached and not res.error:
        with open(cached + f".{os.getpid()}", "w") as f:
            json.dump(asdict(res), f)
        os.replace(cached + f".{os.getpid()}", cached)
    return res


_WORKER_LAUNCHES: list[launch_mod.Launch] = []
_DUMP_DIR = ""
_CACHE_DIR = ""


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


def verdict(r: CompileResult) -> str:
    """"ok", or what is wrong with a configuration ("ERROR", "SPILL", "NARROW"), or why a flaw is allowed."""
    if r.error:
        return "ERROR " + r.error.splitlines()[0]
    flaws = []
    if r.spill_stores > 0 or r.spill_loads > 0:
        flaws.append("SPILL")
    if any(not streams_16_bytes(lp) for lp in main_loops(r.loops)):
        flaws.append("NARROW")
    if not flaws:
        return "ok"
    if r.problem != "table":
        return " ".join(f.lower() for f in flaws) + " (forced regime: allowed)"
    return " ".join(flaws)


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
    parser.add_argument("--dump-ptx", help="write each configuration's PTX into this folder")
    parser.add_argument("--cache", help="keep each configuration's results here and reuse them while nothing changed")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    global _DUMP_DIR, _CACHE_DIR
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        _CACHE_DIR = args.cache
    if args.dump_ptx:
        os.makedirs(args.dump_ptx, exist_ok=True)
        _DUMP_DIR = args.dump_ptx
    extra_dtypes = tuple(getattr(torch, d) for d in args.extra_dtype) if args.extra_dtype else None
    results = compile_table(args.arch, args.jobs, dtypes, args.kernel, args.extra, extra_dtypes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    bad = 0
    for r in results:
        flag = verdict(r)
        bad += flag.startswith(("ERROR", "SPILL", "NARROW"))
        loads = " ".join(
            f"{w}B×{n}" for lp in main_loops(r.loops) for w, n in sorted({**lp["ld"], **{
                f"cp{k}": v for k, v in lp["cp_async"].items()}}.items(), key=str)
        )  # fmt: skip
        print(
            f"sm_{r.arch} {r.problem:5s} {r.kernel:24s} warps={r.num_warps} stages={r.num_stages} "
            f"regs={r.registers:3d} spill={r.spill_stores}/{r.spill_loads} smem={r.shared_bytes:6d} "
            f"{r.seconds:5.1f}s {flag}  loops[{loads}]  {_dtypes(r.signature)} {r.constexprs}"
        )
    print(f"aot: {len(results)} configurations, {bad} failing", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
