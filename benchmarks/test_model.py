"""Model level: prefill and decode of a random Phi-3 with GenKnowSub experts on its four target modules, base against
patched (and PEFT's Arrow model), interleaved inside one benchmark per case (``benchmarks/cpu_model.py``).

- CPU: Phi-3 hidden 1024, 4 layers, 10 task + 3 general rank-8 adapters, prefill 512 tokens and decode 32, float32
  and bfloat16 (PEFT in float32); the demo's hidden-256 model likewise (prefill 128), and one patched layer of it
  against the unpatched layer at T = 1 and 16 (what a call adds; ``benchmarks/layer_overhead.py``).
- GPU (skipped without CUDA): Phi-3-mini, 32 layers, bf16, prefill 512 and decode 32 (``bench_gpu.model_setup``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cpu_model, layer_overhead

BLOCK_S = 0.3
PREFILL, DECODE = 512, 32


@pytest.fixture(scope="module")
def bench_models() -> cpu_model.ModelSet:
    return cpu_model.build("bench", 10, 3, 8, PREFILL, ["float32", "bfloat16"], peft=True)


@pytest.fixture(scope="module")
def small_models() -> cpu_model.ModelSet:
    lo = layer_overhead
    return cpu_model.build(lo.SIZE, lo.TASKS, lo.GENERAL, lo.RANK, 128, ["float32", "bfloat16"], peft=True)


def _run(interleaved, c: dict, section: str, min_rounds: int = 0) -> None:
    interleaved(c["runs"], section=section, case=c["name"], info=c["info"], calls=c["calls"], min_rounds=min_rounds)


def _model_cases():
    # The quick subset (-m quick) keeps one prefill (float32, with PEFT) and one decode (bfloat16).
    for phase, tokens in (("prefill", PREFILL), ("decode", DECODE)):
        for dtype in ("float32", "bfloat16"):
            quick = (phase, dtype) in (("prefill", "float32"), ("decode", "bfloat16"))
            yield pytest.param(phase, tokens, dtype, marks=[pytest.mark.quick] if quick else [],
                               id=f"{phase}-{dtype}")  # fmt: skip


@pytest.mark.parametrize(("phase", "tokens", "dtype"), list(_model_cases()))
def test_cpu_model(interleaved, bench_models, phase, tokens, dtype):
    _run(interleaved, cpu_model.case(bench_models, "model", phase, dtype, tokens, BLOCK_S), "model")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("phase", "tokens"), [("prefill", 128), ("decode", DECODE)], ids=["prefill", "decode"])
def test_cpu_small_model(interleaved, small_models, phase, tokens, dtype):
    _run(interleaved, cpu_model.case(small_models, "small-model", phase, dtype, tokens, 0.2), "small-model")


@pytest.mark.parametrize("tokens", layer_overhead.TOKENS, ids=lambda t: f"T{t}")
def test_cpu_layer(interleaved, small_models, tokens):
    # Microsecond calls: more rounds for a steadier median.
    _run(interleaved, layer_overhead.case(small_models, "qkv_proj", tokens, 0.2), "layer", min_rounds=7)


@pytest.fixture(scope="module")
def gpu_models():
    from benchmarks import bench_gpu

    return bench_gpu.model_setup()


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("phase", "tokens"), [("prefill", PREFILL), ("decode", DECODE)], ids=["prefill", "decode"])
def test_gpu_model(interleaved, gpu_models, phase, tokens):
    from benchmarks.bench_gpu import model_case
    from benchmarks.interleave import cuda_block

    base, ours, ids = gpu_models
    with torch.no_grad():
        if phase == "prefill":
            runs = {name: cuda_block(lambda m=m: m(ids), 1) for name, m in (("base", base), ("ours", ours))}
            name = f"gpu model prefill T={tokens} ({model_case()})"
        else:
            runs = {name: cpu_model.decode_run(m, ids, tokens) for name, m in (("base", base), ("ours", ours))}
            name = f"gpu model decode {tokens} tokens ({model_case()})"
        info = dict(size="phi3-mini", phase=phase, dtype="bfloat16", tokens=tokens,
                    per="token" if phase == "decode" else "call")  # fmt: skip
        interleaved(runs, section="gpu model", case=name, info=info, calls=dict.fromkeys(runs, 1),
                    isa=torch.cuda.get_device_name())  # fmt: skip
