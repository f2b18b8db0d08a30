"""Op level on the CPU: one Phi-3-mini linear layer, base against ours (and PEFT's Arrow layer), interleaved.

- base: ``F.linear(x, W)`` in the model dtype (what an unpatched layer computes);
- ours: the public path, ``gkf.ops.prepare(experts, top_k=3, dtype=...)(x, W)`` (the prepared runner a patched
  layer calls: base GEMM, then the compiled kernel adds the routed delta in place);
- peft: PEFT's ``ArrowLoraLinearLayer`` on top of ``F.linear`` (``benchmarks/peft_arrow.py``), prototypes built before
  timing.

x is (1, T, d_in), as a model passes it. The three run alternately inside one measurement (``benchmarks/interleave``).

    python -m benchmarks.cpu_ops --module qkv_proj --dtype bfloat16 --library E256_r16 --tokens 1 512

runs single cases by hand and prints their ratios; ``make bench`` runs the whole set through ``benchmarks.bench_cpu``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks.interleave import block, calls_for, interleave, ratio_stats
from benchmarks.phi3_shapes import PHI3_MINI_SHAPES, TOP_K
from genknowsub_fast.experts import ModuleExperts

# The CPU op-level libraries: the GPU set (E10_r4, E64_r8) and the Arrow paper's 256 experts at r = 4 and 16.
CPU_LIBRARIES = {"E10_r4": (10, 4), "E64_r8": (64, 8), "E256_r4": (256, 4), "E256_r16": (256, 16)}
# PEFT rows only in float32 and for E <= 64: its layer re-stacks and runs every expert for every token, so E=256
# would cost seconds per call and add nothing the E=64 rows do not show.
PEFT_LIBRARIES = ("E10_r4", "E64_r8")
TOKENS = (1, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCALING = 2.0


def make_experts(d_in: int, d_out: int, e: int, r: int, seed: int = 0) -> tuple[ModuleExperts, torch.Tensor]:
    """Random float32 experts (unit prototypes, scaling 2) and a base weight (d_out, d_in) for one layer.

    Timing does not depend on the prototypes being the factors' singular vectors, only on the routing spreading the
    tokens over the experts, which random unit prototypes do.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g) / r**0.5
    prototypes = F.normalize(torch.randn(e, d_in, generator=g), dim=1)
    experts = ModuleExperts(a, b, torch.full((e,), SCALING), prototypes, torch.full((e,), r, dtype=torch.int64))
    weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    return experts, weight


def implementations(
    experts: ModuleExperts, weight: torch.Tensor, dtype: torch.dtype, with_peft: bool
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """x ↦ y of each implementation in ``dtype``: "base", "ours" and, with ``with_peft``, "peft"."""
    import genknowsub_fast as gkf

    w = weight.to(dtype)
    runner = gkf.ops.prepare(experts, top_k=TOP_K, device="cpu", dtype=dtype)
    impls = {"base": lambda x: F.linear(x, w), "ours": lambda x: runner(x, w)}
    if with_peft:
        from benchmarks.peft_arrow import peft_arrow_linear

        impls["peft"] = peft_arrow_linear(w, experts.a.to(dtype), experts.b.to(dtype), SCALING)
    return impls


def measure(
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int, block_s: float
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved seconds per call of each implementation on x (one value per round), and the calls per block."""
    with torch.no_grad():
        calls = {name: calls_for(lambda f=f: f(x), block_s) for name, f in impls.items()}  # also the warm-up
        runs = {name: block(lambda f=f: f(x), calls[name]) for name, f in impls.items()}
        return interleave(runs, repeats, warmup=0), calls


def case_name(module: str, library: str, tokens: int, dtype: str) -> str:
    d_in, d_out = PHI3_MINI_SHAPES[module]
    return f"op {module} {d_in}->{d_out} {library} T={tokens} {dtype}"


def run_cases(
    modules: list[str],
    libraries: list[str],
    dtypes: list[str],
    tokens: list[int],
    repeats: int,
    block_s: float,
    peft: bool = True,
    progress: Callable[[str], None] = print,
) -> Iterator[dict]:
    """Every (module, library, dtype, T) case as a JSON row for ``benchmarks/write_results.py``, yielded as measured."""
    for module in modules:
        d_in, d_out = PHI3_MINI_SHAPES[module]
        for library in libraries:
            e, r = CPU_LIBRARIES[library]
            experts, weight = make_experts(d_in, d_out, e, r)
            for dtype in dtypes:
                with_peft = peft and dtype == "float32" and library in PEFT_LIBRARIES
                impls = implementations(experts, weight, DTYPES[dtype], with_peft)
                for t in tokens:
                    x = torch.randn(1, t, d_in, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
                    times, calls = measure(impls, x, repeats, block_s)
                    info = dict(module=module, d_in=d_in, d_out=d_out, library=library, experts=e, rank=r,
                                tokens=t, dtype=dtype, top_k=TOP_K)  # fmt: skip
                    row = dict(section="op", case=case_name(module, library, t, dtype), times=times, calls=calls,
                               info=info)  # fmt: skip
                    progress(_line(row))
                    yield row
                del impls
            del experts, weight


def _line(row: dict) -> str:
    """One progress line: the case, ours × base (median [min, max]) and the medians in ms."""
    times = row["times"]
    med, lo, hi = ratio_stats(times, "ours", "base")
    ms = ", ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms" for k, v in times.items())
    return f"{row['case']}: ours/base {med:.3f} [{lo:.3f}, {hi:.3f}]; {ms}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", nargs="+", choices=list(PHI3_MINI_SHAPES), default=["qkv_proj"])
    parser.add_argument("--library", nargs="+", choices=list(CPU_LIBRARIES), default=["E256_r16"])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-s", type=float, default=0.2, help="seconds per timed block of one implementation")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, top_k {TOP_K}")
    cases = run_cases(args.module, args.library, args.dtype, args.tokens, args.repeats, args.block_s, not args.no_peft)
    for _ in cases:  # each case prints its line
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
