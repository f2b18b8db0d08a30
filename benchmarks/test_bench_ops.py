"""Op level, CPU fp32: one Phi-3-mini linear layer — base nn.Linear, PEFT's Arrow layer on it, and ours.

PEFT's side is its ``ArrowLoraLinearLayer`` applied as ``ArrowLinearVariant.forward`` does (base output + routed
delta), with its prototypes built before timing, so only its steady-state per-call cost is measured.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.peft_arrow import peft_arrow_linear
from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K
from genknowsub_fast import ops
from genknowsub_fast.backends.packing import pack_experts

TOKENS = (1, 512)
IMPLS = ("base", "peft", "ours")


def _rounds(t: int) -> int:
    return 30 if t == 1 else 9


class _Layer:
    """One layer's weights, experts and the three implementations."""

    def __init__(self, d_in, d_out, e, r, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        self.a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
        self.b = torch.randn(e, d_out, r, generator=g) / r**0.5
        self.scaling = torch.full((e,), 2.0)
        self.prototypes = ops.arrow_prototypes(self.a, self.b)
        self.packed = pack_experts(self.a, self.b, self.scaling, self.prototypes)
        self._peft = None

    def peft(self):
        if self._peft is None:
            self._peft = peft_arrow_linear(self.weight, self.a, self.b, 2.0)
        return self._peft

    def run(self, impl):
        if impl == "base":
            return lambda x: F.linear(x, self.weight)
        if impl == "peft":
            return self.peft()
        return lambda x: ops.routed_linear(x, self.packed, TOP_K, 1.0, self.weight, None, "torch")


_LAYERS: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("lib", list(LIBRARIES))
@pytest.mark.parametrize("module", list(PHI3_MINI_SHAPES))
def test_linear(benchmark, module, lib, tokens, impl):
    d_in, d_out = PHI3_MINI_SHAPES[module]
    e, r = LIBRARIES[lib]
    key = (module, lib)
    if key not in _LAYERS:
        _LAYERS.clear()  # one layer's weights at a time: gate_up_proj with E=64 is ~0.9 GB of fp32
        _LAYERS[key] = _Layer(d_in, d_out, e, r)
    layer = _LAYERS[key]
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1))
    fn = layer.run(impl)
    benchmark.group = f"op {module} {d_in}->{d_out} {lib} T={tokens}"
    benchmark.extra_info.update(impl=impl, module=module, library=lib, tokens=tokens, dtype="float32")
    with torch.no_grad():
        benchmark.pedantic(fn, args=(x,), rounds=_rounds(tokens), iterations=1, warmup_rounds=2)
