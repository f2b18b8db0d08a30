"""Per-phase time of the compiled CPU routed-LoRA op, from a timing build (csrc/routed_lora_cpu.cpp with
-DGKF_PHASE_TIMING): scores, route (+ per-token shrink), shrink, coefficients, expand, and the set-up before them
(argument checks, scratch), in ms per call. GKF_PHASE_CPU=1 times the calling thread's CPU time instead of wall-clock
time (one thread, on a machine that other processes load).

Run in its own process (the timing build registers the same op namespace as the normal extension):

    python benchmarks/cpu_kernel_phases.py --dtype bfloat16 --module qkv_proj --library E256_r16 --tokens 512

The build goes to ``$GENKNOWSUB_FAST_CACHE/phases`` (default ``~/.cache/genknowsub_fast/phases``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_ops import CPU_LIBRARIES, make_experts  # noqa: E402
from benchmarks.phi3_shapes import PHI3_MINI_SHAPES  # noqa: E402
from genknowsub_fast.backends import build_rule, cpu_kernel  # noqa: E402
from genknowsub_fast.backends.packing import pack_experts  # noqa: E402

PHASES = ("scores", "route", "shrink", "coefficients", "expand", "setup")
SOURCES = ("cpu_isa.cpp", "routed_lora_cpu.cpp", "routed_lora_isa_scalar.cpp", "routed_lora_isa_avx2.cpp",
           "routed_lora_isa_avx512.cpp")  # fmt: skip


def load_timing_build() -> None:
    """JIT-build (once) and load the timing build of the routed op."""
    from torch.utils import cpp_extension

    cache = Path(os.environ.get("GENKNOWSUB_FAST_CACHE", Path.home() / ".cache" / "genknowsub_fast")) / "phases"
    cache.mkdir(parents=True, exist_ok=True)
    csrc = ROOT / "csrc"
    cpp_extension.load(
        name="genknowsub_fast_phases",
        sources=[str(csrc / s) for s in SOURCES],
        extra_cflags=build_rule.cxx_flags() + ["-DGKF_PHASE_TIMING"],
        extra_ldflags=build_rule.link_flags(),
        extra_include_paths=[str(csrc)],
        build_directory=str(cache),
        is_python_module=False,
        verbose=False,
    )


def phase_ms(
    module: str, dtype: torch.dtype, library: str, tokens: int, calls: int = 5, screen: bool = True
) -> dict[str, float]:
    """Mean ms per call of each phase (and the whole call) over ``calls`` calls, after one warm-up call; ``screen``:
    pass the bfloat16 prototypes of screened routing where the library has enough experts (as the runner does)."""
    d_in, d_out = PHI3_MINI_SHAPES[module]
    ex, _ = make_experts(d_in, d_out, *CPU_LIBRARIES[library])
    packed = pack_experts(ex.a, ex.b, ex.scaling, ex.prototypes, dtype=dtype)
    x = torch.randn(tokens, d_in).to(dtype)
    y = torch.zeros(tokens, d_out, dtype=dtype)
    op = torch.ops.genknowsub_fast_C
    use_screen = screen and packed.prototypes.shape[0] >= cpu_kernel.SCREEN_MIN_EXPERTS
    screened = packed.prototypes.to(torch.bfloat16) if use_screen else None
    args = (packed.prototypes, packed.a, packed.b_t, 3, 1.0, False, None, screened)
    op.routed_lora_delta_(y, x, *args)
    op.routed_lora_phase_ns()
    t0 = time.perf_counter()
    for _ in range(calls):
        op.routed_lora_delta_(y, x, *args)
    total = (time.perf_counter() - t0) / calls * 1e3
    ns = op.routed_lora_phase_ns()
    out = {name: v / calls / 1e6 for name, v in zip(PHASES, ns)}
    out["total"] = total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", choices=list(PHI3_MINI_SHAPES), default="qkv_proj")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--library", choices=list(CPU_LIBRARIES), default="E256_r16")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--isa", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--no-screen", action="store_true", help="route on float32 scores of every expert")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_timing_build()
    print("isa", torch.ops.genknowsub_fast_C.cpu_isa(args.isa))
    res = phase_ms(args.module, getattr(torch, args.dtype), args.library, args.tokens, args.calls, not args.no_screen)
    print(" ".join(f"{k}={v:.3f}ms" for k, v in res.items()))


if __name__ == "__main__":
    main()
