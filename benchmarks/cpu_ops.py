"""Op level on the CPU: one Phi-3-mini linear layer, base against ours (and PEFT's Arrow layer), interleaved.

- base: ``F.linear(x, W)`` in the model dtype (what an unpatched layer computes);
- ours: the public path, ``gkf.ops.prepare(experts, top_k=3, dtype=...)(x, W)`` (the prepared runner a patched
  layer calls: base GEMM, then the compiled kernel adds the routed delta in place);
- peft: PEFT's ``ArrowLoraLinearLayer`` on top of ``F.linear`` (``benchmarks/peft_arrow.py``), prototypes built before
  timing.

x is (1, T, d_in), as a model passes it. The three run alternately inside one measurement (``benchmarks/interleave``);
the cases are ``benchmarks/test_op.py``'s, e.g.

    pytest benchmarks/test_op.py --benchmark-only -k "cpu and qkv_proj and E256_r16 and bfloat16" -s
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.interleave import Run, block, calls_for
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


def runs(
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, block_s: float
) -> tuple[dict[str, Run], dict[str, int]]:
    """A timed block of each implementation on x (seconds per call, no autograd) and the calls per block, sized to
    about ``block_s`` seconds each (sizing them also warms every implementation up)."""
    calls, out = {}, {}
    with torch.no_grad():
        for name, f in impls.items():
            calls[name] = calls_for(lambda f=f: f(x), block_s)
            timed = block(lambda f=f: f(x), calls[name])
            out[name] = _no_grad(timed)
    return out, calls


def _no_grad(run: Run) -> Run:
    def timed() -> float:
        with torch.no_grad():
            return run()

    return timed


def case_name(module: str, library: str, tokens: int, dtype: str) -> str:
    d_in, d_out = PHI3_MINI_SHAPES[module]
    return f"op {module} {d_in}->{d_out} {library} T={tokens} {dtype}"


def case_info(module: str, library: str, tokens: int, dtype: str) -> dict:
    """The JSON fields of one case (module, shapes, library, E, r, T, dtype, top-k)."""
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = CPU_LIBRARIES[library]
    return dict(module=module, d_in=d_in, d_out=d_out, library=library, experts=e, rank=r, tokens=tokens,
                dtype=dtype, top_k=TOP_K)  # fmt: skip


@functools.lru_cache(maxsize=1)
def cached_implementations(module: str, library: str, dtype: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`implementations` of one (module, library, dtype), kept while consecutive cases share them (the cases
    run in that order); PEFT's where it applies (float32, E <= 64)."""
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = CPU_LIBRARIES[library]
    experts, weight = make_experts(d_in, d_out, e, r)
    return implementations(experts, weight, DTYPES[dtype], dtype == "float32" and library in PEFT_LIBRARIES)
