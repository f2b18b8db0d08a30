"""GPU checks of the Triton path (skipped without CUDA): Phi-3-like shapes in bf16/fp16/fp32 against the reference
with the tolerance table, CUDA-graph capture, and torch.compile of the op.

Run on a GPU machine with ``python -m pytest tests/triton_kernels -m gpu -q``.
"""

from __future__ import annotations

import pytest
import torch

from genknowsub_fast.backends import triton_ops
from tests.triton_kernels.helpers import check, make_problem, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _refs(prob, dtype, k, temp, mixing):
    """float64 and same-dtype references, computed on the GPU."""

    def run(dt):
        c = lambda t: t.to(device=CUDA, dtype=dt)  # noqa: E731
        return reference.routed_lora(
            c(prob.x), c(prob.a), c(prob.b), c(prob.scaling), c(prob.prototypes), k, temp, mixing,
            c(prob.weight), c(prob.bias),
        )  # fmt: skip

    return run(torch.float64), run(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
@pytest.mark.parametrize("t", [1, 16, 100, 300])
@pytest.mark.parametrize("regime", ["auto", "dense", "gather", "grouped"])
def test_matches_reference_on_gpu(dtype, er, t, regime):
    e, r = er
    d_in, d_out = 3072, 1040  # Phi-3 hidden size; d_out not a multiple of the 64/128-wide output tiles
    prob = make_problem(t, e, r, d_in, d_out, seed=t + e)
    packed = prob.packed(dtype, "output", device=CUDA)
    c = lambda x: x.to(device=CUDA, dtype=dtype)  # noqa: E731
    y = torch.ops.genknowsub_fast.routed_linear(
        c(prob.x), packed.route_shrink, packed.b_t, c(prob.weight), c(prob.bias), e, r, 3, 1.0, False, regime
    )
    check(y, *_refs(prob, dtype, 3, 1.0, "output"), dtype, f"GPU {regime} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["dense", "gather", "grouped"])
def test_weights_mixing_on_gpu(dtype, regime):
    prob = make_problem(40, 12, 4, 1000, 777, seed=4, shared_scaling=True)
    packed = prob.packed(dtype, "weights", device=CUDA)
    c = lambda x: x.to(device=CUDA, dtype=dtype)  # noqa: E731
    y = torch.ops.genknowsub_fast.routed_linear(
        c(prob.x), packed.route_shrink, packed.b_t, c(prob.weight), c(prob.bias), 12, 4, 3, 0.7, True, regime
    )
    check(y, *_refs(prob, dtype, 3, 0.7, "weights"), dtype, f"GPU weights mixing {regime}")


def _layer(dtype, t, e=64, r=8):
    prob = make_problem(t, e, r, 3072, 3072, seed=1)
    packed = prob.packed(dtype, "output", device=CUDA)
    c = lambda x: x.to(device=CUDA, dtype=dtype)  # noqa: E731
    return prob, packed, c(prob.x), c(prob.weight), c(prob.bias)


@pytest.mark.parametrize("t", [1, 256])
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
def test_cuda_graph_capture(t, er):
    """The whole call (route, sort, shrink, expand) captures into a CUDA graph and replays on new inputs."""
    prob, packed, x, w, b = _layer(torch.bfloat16, t, *er)
    fn = lambda inp: triton_ops.routed_linear(inp, packed, 3, 1.0, w, b)  # noqa: E731
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile and warm up outside the capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, fn(new_x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    """torch.compile traces through the custom op (fake impl) without graph breaks and matches eager."""
    _, packed, x, w, b = _layer(torch.float16, 64, 10, 4)

    def layer(inp):
        return torch.nn.functional.gelu(triton_ops.routed_linear(inp, packed, 3, 1.0, w, b))

    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for t in (64, 17):
        torch.testing.assert_close(compiled(x[:t]), layer(x[:t]), rtol=1e-3, atol=1e-3)


def test_no_host_sync():
    """The call does not synchronise with the host (a sync inside a capture would raise; this checks eagerly too)."""
    _, packed, x, w, b = _layer(torch.bfloat16, 512)
    triton_ops.routed_linear(x, packed, 3, 1.0, w, b)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_ops.routed_linear(x, packed, 3, 1.0, w, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
