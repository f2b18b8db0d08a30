"""Exact Arrow prototypes of a whole Phi-3-mini library (32 layers × 4 modules × E experts, float32, CPU): ours (the
compiled batched op) against PEFT's power-iteration loop and the torch.linalg composite, interleaved inside one
benchmark per library (``benchmarks/cpu_prototypes.py``)."""

from __future__ import annotations

import pytest

from benchmarks import cpu_prototypes


@pytest.mark.parametrize("library", [pytest.param("E10_r4", marks=pytest.mark.quick), "E64_r8"])
def test_cpu_prototypes(interleaved, library):
    try:
        c = cpu_prototypes.case(library, 0.3)
    except RuntimeError as exc:  # the compiled extension is not loaded: nothing of ours to time
        pytest.skip(str(exc))
    interleaved(c["runs"], section="prototypes", case=c["name"], info=c["info"], calls=c["calls"], warmup=0)
