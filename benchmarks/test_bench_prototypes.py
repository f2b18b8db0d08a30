"""Exact Arrow prototypes of a whole Phi-3-mini library (32 layers × 4 target modules × E experts), fp32.

Implementations, one benchmark group per library:
- "peft": PEFT's ``ArrowLoraLinearLayer.top_right_singular_vec_from_BA`` (15 power-iteration steps) per expert, as its
  ``build_prototypes`` loops; approximate, and the slowest, so it runs one or two rounds;
- "torch": the torch.linalg composite (``torch_prototypes.exact_prototypes``: batched QR + eigh) per module;
- "ours": the compiled CPU op, the whole library in one ``arrow_prototypes_batched`` call;
- "ours_cuda": the same op's CUDA kernel (skipped without a GPU or without a CUDA build).

E=10, r=4 → 1280 problems; E=64, r=8 → 8192 problems. The E=64 library would be 3.2 GB of fp32 factors, so its 32
layers share one layer's tensors (every call still reads all 32 × 4 modules; one layer of factors is ~100 MB, far
beyond the caches, so sharing does not make the reads cheaper).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES
from genknowsub_fast.backends import extension, torch_prototypes

LAYERS = 32
IMPLS = ("peft", "torch", "ours", "ours_cuda")
_CACHE: dict = {}


def _library(lib: str):
    if lib not in _CACHE:
        _CACHE.clear()
        e, r = LIBRARIES[lib]
        g = torch.Generator().manual_seed(0)
        unique_layers = LAYERS if e * r <= 64 else 1
        layers = []
        for _ in range(unique_layers):
            layers.append(
                [
                    (torch.randn(e, r, d_in, generator=g) / d_in**0.5, torch.randn(e, d_out, r, generator=g) / r**0.5)
                    for d_in, d_out in PHI3_MINI_SHAPES.values()
                ]
            )
        mods = [m for i in range(LAYERS) for m in layers[i % unique_layers]]
        _CACHE[lib] = ([m[0] for m in mods], [m[1] for m in mods])
    return _CACHE[lib]


def _peft_fn(a_list, b_list):
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    cfg = ArrowConfig(top_k=3, rng_seed=0)
    cfg.task_adapter_names, cfg.gks_adapter_names = [f"task_{i}" for i in range(a_list[0].shape[0])], []
    layer = ArrowLoraLinearLayer(a_list[0].shape[2], cfg)

    def run():
        return [
            [layer.top_right_singular_vec_from_BA(a[i], b[i]) for i in range(a.shape[0])]
            for a, b in zip(a_list, b_list)
        ]

    return run


def _fn(impl, a_list, b_list):
    if impl == "peft":
        return _peft_fn(a_list, b_list)
    if impl == "torch":
        return lambda: [torch_prototypes.exact_prototypes(a, b) for a, b in zip(a_list, b_list)]
    if not extension.has_op("arrow_prototypes_batched"):
        pytest.skip(f"extension not loaded: {extension.status()[1]}")
    op = torch.ops.genknowsub_fast_C.arrow_prototypes_batched
    if impl == "ours":
        return lambda: op(a_list, b_list)
    if not (torch.cuda.is_available() and extension.has_cuda_kernels()):
        pytest.skip("needs a CUDA device and an extension built with CUDA")
    a_dev = [a.cuda() for a in dict.fromkeys(a_list)]  # unique tensors once, then the same sharing as on the CPU
    b_dev = [b.cuda() for b in dict.fromkeys(b_list)]
    a_map = dict(zip(map(id, dict.fromkeys(a_list)), a_dev))
    b_map = dict(zip(map(id, dict.fromkeys(b_list)), b_dev))
    a_cuda = [a_map[id(a)] for a in a_list]
    b_cuda = [b_map[id(b)] for b in b_list]

    def run():
        out = op(a_cuda, b_cuda)
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lib", list(LIBRARIES))
def test_prototypes(benchmark, lib, impl):
    e, r = LIBRARIES[lib]
    a_list, b_list = _library(lib)
    fn = _fn(impl, a_list, b_list)
    n = sum(a.shape[0] for a in a_list)
    benchmark.group = f"prototypes phi3-mini {lib} {n} problems"
    benchmark.extra_info.update(impl=impl, library=lib, problems=n, dtype="float32")
    slow = impl == "peft" or (impl == "torch" and e > 10)
    rounds = {"peft": 1 if e > 10 else 2, "torch": 1 if e > 10 else 3}.get(impl, 10)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if slow else 1)
