"""GPU checks of the Triton path (skipped without CUDA): Phi-3-like shapes in bf16/fp16/fp32 against the reference
with the tolerance table, CUDA-graph capture, and torch.compile of the op.

Run on a GPU machine with ``python -m pytest tests/triton_kernels -m gpu -q``.
"""

from __future__ import annotations

import pytest
import torch

from tests.tolerances import LOW_PRECISION_ADD_ORDER
from tests.triton_kernels.helpers import check, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
@pytest.mark.parametrize("t", [1, 16, 100, 300])
@pytest.mark.parametrize("regime", [None, "decode", "dense", "grouped"])
def test_matches_reference_on_gpu(dtype, er, t, regime):
    e, r = er
    d_in, d_out = 3072, 1040  # Phi-3 hidden size; d_out not a multiple of the 64/128-wide output tiles
    prob = make_problem(t, e, r, d_in, d_out, seed=t + e)
    c = prob.cast(dtype)
    y = prob.layer(dtype, 3, 1.0, regime=regime)(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(dtype, 3, 1.0), dtype, f"GPU {regime} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [256, 1000])
def test_fused_base_gemm_on_gpu(dtype, t):
    prob = make_problem(t, 10, 4, 3072, 1040, seed=t)
    c = prob.cast(dtype)
    y = prob.layer(dtype, 3, 1.0, regime="dense", fuse_base=True)(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(dtype, 3, 1.0), dtype, f"GPU fused base GEMM {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
def test_weights_mixing_on_gpu(dtype, regime):
    prob = make_problem(40, 12, 4, 1000, 777, seed=4, shared_scaling=True)
    c = prob.cast(dtype)
    y = prob.layer(dtype, 3, 0.7, "weights", regime=regime)(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(dtype, 3, 0.7, "weights"), dtype, f"GPU weights mixing {regime}")


@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
def test_bf16_near_ties_route_as_float64(regime):
    """bfloat16 (whose dots the interpreter gets wrong) routes near-tied experts with float32 scores on the GPU."""
    from tests.triton_kernels.test_routing_precision import _near_ties

    prob = _near_ties(12, 96, seed=5)
    delta = prob.layer(torch.bfloat16, 1, 1.0, regime=regime)(prob.x.to(device=CUDA, dtype=torch.bfloat16))
    check(delta, *prob.reference(torch.bfloat16, 1, 1.0, base=False), torch.bfloat16, f"near ties bf16 {regime}")


def _layer(dtype, t, e=64, r=8):
    prob = make_problem(t, e, r, 3072, 3072, seed=1)
    c = prob.cast(dtype)
    return prob.layer(dtype, 3, 1.0), c["x"], c["weight"], c["bias"]


@pytest.mark.parametrize("t", [1, 256])
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
def test_cuda_graph_capture(t, er):
    """The whole call (route, sort, shrink, expand) captures into a CUDA graph and replays on new inputs."""
    layer, x, w, b = _layer(torch.bfloat16, t, *er)
    fn = lambda inp: layer(inp, w, b)  # noqa: E731
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
    torch.testing.assert_close(static_y, fn(new_x), **LOW_PRECISION_ADD_ORDER)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    """torch.compile traces through the custom op (fake impl) without graph breaks and matches eager."""
    triton_layer, x, w, b = _layer(torch.float16, 64, 10, 4)

    def layer(inp):
        return torch.nn.functional.gelu(triton_layer(inp, w, b))

    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for t in (64, 17, 1):
        torch.testing.assert_close(compiled(x[:t]), layer(x[:t]), **LOW_PRECISION_ADD_ORDER)


def test_no_host_sync():
    """The call does not synchronise with the host (a sync inside a capture would raise; this checks eagerly too)."""
    layer, x, w, b = _layer(torch.bfloat16, 512)
    layer(x, w, b)  # compile first
    layer(x[:1], w, b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, w, b)
        layer(x[:1], w, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
