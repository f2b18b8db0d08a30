"""Exact Arrow prototypes of a whole Phi-3-mini library (32 layers × 4 target modules × E experts), float32, CPU.

Implementations, interleaved per library:
- "peft": PEFT's ``ArrowLoraLinearLayer.top_right_singular_vec_from_BA`` (15 power-iteration steps) per expert, as its
  ``build_prototypes`` loops (approximate, and the slowest);
- "torch": the torch.linalg composite (``torch_prototypes.exact_prototypes``: batched QR + eigh) per module;
- "ours": the compiled op, the whole library in one ``arrow_prototypes_batched`` call.

E=10, r=4 → 1280 problems; E=64, r=8 → 8192 problems. The E=64 library would be 3.2 GB of float32 factors, so its 32
layers share one layer's tensors (every call still reads all 32 × 4 modules; one layer of factors is ~100 MB, far
beyond the caches, so sharing does not make the reads cheaper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.interleave import block, calls_for
from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES

LAYERS = 32


def library(lib: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A (E, r, d_in) and B (E, d_out, r) of every module of a Phi-3-mini library (see the module docstring)."""
    e, r = LIBRARIES[lib]
    g = torch.Generator().manual_seed(0)
    unique_layers = LAYERS if e * r <= 64 else 1
    layers = [
        [
            (torch.randn(e, r, d_in, generator=g) / d_in**0.5, torch.randn(e, d_out, r, generator=g) / r**0.5)
            for d_in, d_out in PHI3_MINI_SHAPES.values()
        ]
        for _ in range(unique_layers)
    ]
    mods = [m for i in range(LAYERS) for m in layers[i % unique_layers]]
    return [m[0] for m in mods], [m[1] for m in mods]


def implementations(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The three implementations, each computing every module's prototypes."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from genknowsub_fast.backends import extension, torch_prototypes

    if not extension.has_op("arrow_prototypes_batched"):
        raise RuntimeError(f"the compiled extension is not loaded: {extension.status()[1]}")
    op = torch.ops.genknowsub_fast_C.arrow_prototypes_batched
    cfg = ArrowConfig(top_k=3, rng_seed=0)
    cfg.task_adapter_names, cfg.gks_adapter_names = [f"task_{i}" for i in range(a_list[0].shape[0])], []
    layer = ArrowLoraLinearLayer(a_list[0].shape[2], cfg)

    def peft():
        return [[layer.top_right_singular_vec_from_BA(a[i], b[i]) for i in range(a.shape[0])] for a, b in
                zip(a_list, b_list)]  # fmt: skip

    return {
        "peft": peft,
        "torch": lambda: [torch_prototypes.exact_prototypes(a, b) for a, b in zip(a_list, b_list)],
        "ours": lambda: op(a_list, b_list),
    }


def case(lib: str, block_s: float) -> dict:
    """The three implementations of library ``lib`` as timed blocks: the runs, calls per block, the case name and its
    JSON fields, for the ``interleaved`` fixture of benchmarks/conftest.py."""
    a_list, b_list = library(lib)
    impls = implementations(a_list, b_list)

    def no_grad(f):
        def call():
            with torch.no_grad():
                f()

        return call

    calls = {name: calls_for(no_grad(f), block_s, max_calls=50) for name, f in impls.items()}  # also the warm-up
    runs = {name: block(no_grad(f), calls[name]) for name, f in impls.items()}
    n = sum(a.shape[0] for a in a_list)
    e, r = LIBRARIES[lib]
    return dict(runs=runs, calls=calls, name=f"prototypes phi3-mini {lib} {n} problems float32",
                info=dict(library=lib, experts=e, rank=r, problems=n, dtype="float32"))  # fmt: skip


__all__ = ["library", "implementations", "case"]
