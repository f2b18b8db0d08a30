"""GPU checks of the Triton path (skipped without CUDA): Phi-3-like shapes in bf16/fp16/fp32 against the reference
with the tolerance table (the delta alone, then base + delta), E = 256 with r = 16, gradients, CUDA-graph capture (the
decode side stream included), and torch.compile of the op.

Run on a GPU machine with ``python -m pytest tests/triton_kernels -m gpu -q``.
"""

from __future__ import annotations

import pytest
import torch

from tests.tolerances import LOW_PRECISION_ADD_ORDER
from tests.triton_kernels.helpers import check, check_delta, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("er", [(10, 4), (64, 8), (10, 16), (256, 16)], ids=lambda er: f"E{er[0]}r{er[1]}")
@pytest.mark.parametrize("t", [1, 16, 100, 300])
@pytest.mark.parametrize("regime", [None, "decode", "dense", "grouped"])
def test_matches_reference_on_gpu(dtype, er, t, regime):
    e, r = er
    d_in, d_out = 3072, 1040  # Phi-3 hidden size; d_out not a multiple of the 64/128-wide output tiles
    prob = make_problem(t, e, r, d_in, d_out, seed=t + e)
    c = prob.cast(dtype)
    layer = prob.layer(dtype, 3, 1.0, regime=regime)
    check_delta(layer, prob, dtype, 3, 1.0, what=f"GPU {regime} {dtype}")
    y = layer(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(dtype, 3, 1.0), dtype, f"GPU {regime} {dtype}, base + delta")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [256, 1000])
def test_fused_base_gemm_on_gpu(dtype, t):
    prob = make_problem(t, 10, 4, 3072, 1040, seed=t)
    c = prob.cast(dtype)
    layer = prob.layer(dtype, 3, 1.0, regime="dense", fuse_base=True)
    assert layer.plan(c["x"]).fuses_base
    zero = layer(c["x"], torch.zeros_like(c["weight"]), torch.zeros_like(c["bias"]))
    check(zero, *prob.reference(dtype, 3, 1.0, base=False), dtype, f"GPU fused base GEMM {dtype}, delta alone")
    y = layer(c["x"], c["weight"], c["bias"])
    check(y, *prob.reference(dtype, 3, 1.0), dtype, f"GPU fused base GEMM {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["decode", "dense", "grouped"])
def test_weights_mixing_on_gpu(dtype, regime):
    prob = make_problem(40, 12, 4, 1000, 777, seed=4, shared_scaling=True)
    layer = prob.layer(dtype, 3, 0.7, "weights", regime=regime)
    check_delta(layer, prob, dtype, 3, 0.7, "weights", f"GPU weights mixing {regime}")


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


@pytest.mark.parametrize("t", [1, 16, 256])
@pytest.mark.parametrize("er", [(10, 4), (64, 8)], ids=lambda er: f"E{er[0]}r{er[1]}")
def test_cuda_graph_capture(t, er):
    """The whole call (route, sort, shrink, expand; at decode the route and shrink on the side stream beside the base
    GEMM) captures into a CUDA graph and replays on new inputs."""
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


def test_gradients_on_gpu():
    """bf16 gradients wrt x through the Triton layer against float64 autograd of the reference (the registered
    backward), decode and prefill."""
    from tests.triton_kernels.test_gradients import _grads

    for t in (4, 300):
        prob = make_problem(t, 10, 4, 512, 384, seed=t)
        ref64 = _grads(prob, torch.float64, 3, 1.0, "output", "reference", factors=False)
        ref16 = _grads(prob, torch.bfloat16, 3, 1.0, "output", "reference", factors=False)
        ours = _grads(prob, torch.bfloat16, 3, 1.0, "output", "triton", factors=False)
        for n in ours:
            check(ours[n], ref64[n], ref16[n], torch.bfloat16, f"GPU d/d{n} at T={t}")
