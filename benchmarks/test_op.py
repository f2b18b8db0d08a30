"""Op level: one Phi-3-mini linear layer (qkv, o, gate_up, down), base against ours (and PEFT's Arrow layer),
interleaved inside one benchmark per case.

- CPU (``benchmarks/cpu_ops.py``): float32 and bfloat16, T = 1 and 512, libraries E10 r4, E64 r8, E256 r4, E256 r16;
  base = ``F.linear``, ours = the prepared runner a patched layer calls, PEFT in float32 for E <= 64.
- GPU (``benchmarks/bench_gpu.py``'s layers, checks and CUDA graphs; skipped without CUDA): bf16, E10 r4 and E64 r8,
  T in {1, 16, 256, 4096}; eager and CUDA-graph rows, rotated weight copies so nothing is L2-hot, outputs checked
  against the float64 reference before timing (a failed check fails the case after it is recorded).

    pytest benchmarks/test_op.py --benchmark-only -k "cpu and qkv_proj and E256_r16" -s
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cpu_ops
from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K

BLOCK_S = 0.2  # seconds per timed block of one implementation
QUICK = {("qkv_proj", "E10_r4"), ("qkv_proj", "E256_r16")}


@pytest.fixture(scope="module", autouse=True)
def _release_experts():
    """Free the last case's experts when the module ends (the cache keeps one (module, library, dtype) alive)."""
    yield
    cpu_ops.cached_implementations.cache_clear()


def _cpu_cases():
    for module in PHI3_MINI_SHAPES:
        for library in cpu_ops.CPU_LIBRARIES:
            for dtype in cpu_ops.DTYPES:
                for t in cpu_ops.TOKENS:
                    marks = [pytest.mark.quick] if (module, library) in QUICK else []
                    yield pytest.param(module, library, dtype, t, marks=marks, id=f"{module}-{library}-{dtype}-T{t}")


@pytest.mark.parametrize(("module", "library", "dtype", "tokens"), list(_cpu_cases()))
def test_cpu_op(interleaved, module, library, dtype, tokens):
    d_in = PHI3_MINI_SHAPES[module][0]
    impls = cpu_ops.cached_implementations(module, library, dtype)
    x = torch.randn(1, tokens, d_in, generator=torch.Generator().manual_seed(1)).to(cpu_ops.DTYPES[dtype])
    runs, calls = cpu_ops.runs(impls, x, BLOCK_S)
    interleaved(
        runs,
        section="op",
        case=cpu_ops.case_name(module, library, tokens, dtype),
        info=cpu_ops.case_info(module, library, tokens, dtype),
        calls=calls,
        warmup=0,  # sizing the blocks warmed every implementation up
    )


def _gpu_cases():
    from benchmarks.bench_gpu import op_cases

    quick = set(op_cases(True))
    for case in op_cases(False):
        marks = [pytest.mark.quick] if case in quick else []
        module, library, t = case
        yield pytest.param(module, library, t, marks=marks, id=f"{module}-{library}-T{t}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("module", "library", "tokens"), list(_gpu_cases()))
def test_gpu_op(interleaved, module, library, tokens):
    from benchmarks import bench_gpu, gpu_model
    from benchmarks.interleave import cuda_block

    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = LIBRARIES[library]
    torch.cuda.empty_cache()
    layers = bench_gpu.Layers(d_in, d_out, e, r, bench_gpu.copies_for(d_in, d_out, e, r))
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(tokens, d_in, device="cuda", generator=gen).to(bench_gpu.DTYPE)
    ours = ["ours"] + (["ours_fused"] if "ours_fused" in layers.sets[0] and tokens >= 256 else [])
    checks = {impl: layers.check(impl, x) for impl in ours}
    calls = bench_gpu._calls(tokens)
    peft_calls = 1 if tokens >= 256 else 4
    with torch.no_grad():
        eager = {impl: bench_gpu.batch(layers, impl, x, calls) for impl in ["base", *ours]}
        graphs = {f"{impl}_graph": bench_gpu.graphed(run) for impl, run in eager.items()}
        runs = {name: cuda_block(fn, calls) for name, fn in {**eager, **graphs}.items()}
        runs["peft"] = cuda_block(bench_gpu.batch(layers, "peft", x, peft_calls), peft_calls)
        calls_per = {**dict.fromkeys(runs, calls), "peft": peft_calls}
        dev = gpu_model.DEVICES["h200" if "H200" in torch.cuda.get_device_name() else "h100"]
        predicted = {impl: round(gpu_model.predict(module, library, tokens, dev, (impl == "ours_fused") or None).ratio,
                                 3) for impl in ours}  # fmt: skip
        info = dict(module=module, d_in=d_in, d_out=d_out, library=library, experts=e, rank=r, tokens=tokens,
                    dtype="bfloat16", top_k=TOP_K, copies=len(layers.sets), output_check=checks,
                    predicted_ratio=predicted)  # fmt: skip
        interleaved(
            runs,
            section="gpu op",
            case=f"gpu op {module} {d_in}->{d_out} T={tokens} {library} bf16",
            info=info,
            calls=calls_per,
            isa=torch.cuda.get_device_name(),
        )
    failed = {impl: c for impl, c in checks.items() if c.startswith("FAILED")}
    assert not failed, f"output checks failed: {failed}"
