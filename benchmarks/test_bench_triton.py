"""GPU, bfloat16: the Triton path against cuBLAS, PEFT's Arrow layer and our torch backend.

Op level: one Phi-3-mini linear layer (qkv 3072→9216, o 3072→3072, gate_up 3072→16384, down 8192→3072) with E=10 r=4
and E=64 r=8 experts, k=3, T in {1, 16, 256, 4096}. impls: "base" (F.linear, cuBLAS), "peft" (PEFT's
ArrowLoraLinearLayer on top of it, as its ArrowLinearVariant does), "torch" (our portable backend), "ours" (the Triton
custom op: base GEMM + routed delta); at T=1 also "base_graph" and "ours_graph" (each replayed from a CUDA graph).

Model level: a random Phi-3-mini (32 layers, bf16), 10 task + 3 general adapters of rank 8 with GenKnowSub, all four
targets: prefill of 512 tokens and decode of 32 tokens, base / PEFT's Arrow model / patched (Triton backend).

Timing: each round runs ``calls`` back-to-back calls and then synchronises the device (a sync per call would add its
own latency to every T=1 call); ``extra_info["calls"]`` records the count and write_results.py reports the median per
call. GPU only: the module is skipped without CUDA. Run through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "GPU benchmarks (Triton kernels, CUDA graphs, bf16 cuBLAS): no CUDA device here; run benchmarks/gpu_check.sh "
        "on a GPU machine",
        allow_module_level=True,
    )

import torch.nn.functional as F  # noqa: E402

from benchmarks.peft_arrow import peft_arrow_linear  # noqa: E402
from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K  # noqa: E402
from genknowsub_fast import ops  # noqa: E402
from genknowsub_fast.backends import triton_ops  # noqa: E402
from genknowsub_fast.backends.packing import pack_experts  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
TOKENS = (1, 16, 256, 4096)
IMPLS = ("base", "peft", "torch", "ours", "base_graph", "ours_graph")
ROUNDS = 7


def _calls(t: int) -> int:
    """Calls per timed round: enough that one round lasts well over the launch + sync latency."""
    return {1: 200, 16: 100, 256: 30}.get(t, 5)


class GpuLayer:
    """One Phi-3-mini layer's weight and experts on the GPU in bf16, and every implementation's forward."""

    def __init__(self, d_in: int, d_out: int, e: int, r: int, device=DEVICE, dtype=DTYPE, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
        b = torch.randn(e, d_out, r, generator=g) / r**0.5
        scaling = torch.full((e,), 2.0)
        prototypes = ops.arrow_prototypes(a, b)
        self.packed = pack_experts(a, b, scaling, prototypes, dtype=dtype, device=device)
        self.weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device=device, dtype=dtype)
        self.a, self.b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self.device = device
        self._peft = None

    def peft(self):
        if self._peft is None:
            self._peft = peft_arrow_linear(self.weight, self.a, self.b, 2.0, self.device)
        return self._peft

    def eager(self, impl: str):
        if impl == "base":
            return lambda x: F.linear(x, self.weight)
        if impl == "peft":
            return self.peft()
        if impl == "torch":
            return lambda x: ops.routed_linear(x, self.packed, TOP_K, 1.0, self.weight, None, "torch")
        if impl == "ours":
            return lambda x: triton_ops.routed_linear(x, self.packed, TOP_K, 1.0, self.weight, None)
        raise ValueError(impl)


def graphed(fn, x: torch.Tensor):
    """``fn`` captured once into a CUDA graph on a static copy of x; returns a replay callable."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # JIT-compile and warm up outside the capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(static_x)
    return lambda _x: graph.replay()


def timed(benchmark, fn, x, calls: int, rounds: int = ROUNDS) -> None:
    """Benchmark ``calls`` back-to-back calls of fn(x) followed by one device sync, per round."""

    def run():
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()

    benchmark.extra_info.update(calls=calls, device=torch.cuda.get_device_name())
    with torch.no_grad():
        run()  # compile / warm up
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


_LAYERS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("lib", list(LIBRARIES))
@pytest.mark.parametrize("module", list(PHI3_MINI_SHAPES))
def test_linear_gpu(benchmark, module, lib, tokens, impl):
    if impl.endswith("_graph") and tokens != 1:
        pytest.skip("CUDA-graph variants are measured at T=1 (decode), where launch overhead dominates")
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = LIBRARIES[lib]
    key = (module, lib)
    if key not in _LAYERS:
        _LAYERS.clear()  # one layer at a time
        torch.cuda.empty_cache()
        _LAYERS[key] = GpuLayer(d_in, d_out, e, r)
    layer = _LAYERS[key]
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        fn = graphed(layer.eager(impl.removesuffix("_graph")), x) if impl.endswith("_graph") else layer.eager(impl)
    benchmark.group = f"gpu op {module} {d_in}->{d_out} T={tokens} {lib} bf16"
    benchmark.extra_info.update(impl=impl, module=module, library=lib, tokens=tokens, dtype="bfloat16")
    try:
        timed(benchmark, fn, x, _calls(tokens))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} ran out of GPU memory at T={tokens}")


# ---------------------------------------------------------------------------------------------------------------------
# Model level

PREFILL = 512
DECODE = 32


def build_models(tmp_dir, size: str = "phi3-mini", device=DEVICE, dtype=DTYPE, impls=("base", "peft", "ours")):
    """base / PEFT Arrow / patched copies of a random Phi-3 of ``size``, 10 task + 3 general rank-8 adapters, GKS."""
    import genknowsub_fast as gkf
    from genknowsub_fast.synthetic import make_phi3, write_adapters

    with torch.device(device):
        base = make_phi3(size, dtype=dtype)
    ad = write_adapters(base, tmp_dir, 10, 3, rank=8)
    models = {"base": base}
    if "peft" in impls:
        from peft import ArrowConfig, create_arrow_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = ArrowConfig(top_k=3, use_gks=True)
            peft_model = create_arrow_model(copy.deepcopy(base), ad.task, cfg, ad.general)
        models["peft"] = peft_model.to(device=device, dtype=dtype).eval()
    if "ours" in impls:
        lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
        models["ours"] = gkf.patch_model(copy.deepcopy(base), lib, top_k=3, backend="auto")
    ids = torch.randint(3, base.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        for name in impls:
            models[name](ids[:, :8])  # PEFT applies GKS and builds prototypes on its first forward; Triton compiles
    return models, ids


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    _LAYERS.clear()
    torch.cuda.empty_cache()
    return build_models(tmp_path_factory.mktemp("gpu_bench_adapters"))


MODEL_CASE = "Phi-3-mini 32 layers bf16, E=10 r=8 + 3 general, GKS"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["base", "peft", "ours"])
def test_model_prefill_gpu(benchmark, gpu_models, impl):
    models, ids = gpu_models
    model = models[impl]
    benchmark.group = f"gpu model prefill T={PREFILL} ({MODEL_CASE})"
    benchmark.extra_info.update(impl=impl, tokens=PREFILL, dtype="bfloat16")
    timed(benchmark, lambda i: model(i), ids, calls=1, rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["base", "peft", "ours"])
def test_model_decode_gpu(benchmark, gpu_models, impl):
    from transformers import DynamicCache

    models, ids = gpu_models
    model = models[impl]
    benchmark.group = f"gpu model decode {DECODE} tokens ({MODEL_CASE})"
    benchmark.extra_info.update(impl=impl, tokens=DECODE, dtype="bfloat16", device=torch.cuda.get_device_name())

    def prefill():  # untimed: a 16-token prompt into a fresh KV cache
        cache = DynamicCache()
        with torch.no_grad():
            out = model(ids[:, :16], past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        return (cache, out.logits[:, -1:].argmax(-1)), {}

    def decode(cache, tok):
        with torch.no_grad():
            for _ in range(DECODE):
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()

    benchmark.pedantic(decode, setup=prefill, rounds=3, iterations=1, warmup_rounds=1)
