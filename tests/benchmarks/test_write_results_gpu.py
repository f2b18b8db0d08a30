"""GPU benchmark rows (benchmarks/bench_gpu.py) in RESULTS_gpu.md: per-call medians, graph rows against the graphed
base, the versions and device the run recorded, predicted ratios and output checks, and the GPU targets' verdicts."""

from benchmarks.write_results import render


def _bench(group, impl, median, calls=1, **info):
    info = {"impl": impl, "calls": calls, "device": "NVIDIA H200", **info}
    return {"group": group, "name": f"test[{impl}]", "extra_info": info, "stats": {"median": median}}


def test_gpu_rows():
    g1 = "gpu op qkv_proj 3072->9216 T=1 E10_r4 bf16"
    g4 = "gpu op qkv_proj 3072->9216 T=4096 E64_r8 bf16"
    gd = "gpu model decode 32 tokens (Phi-3-mini)"
    data = {
        "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "device": "NVIDIA H200"},
        "benchmarks": [
            _bench(g1, "base", 200e-6, calls=20),  # 10 µs per call
            _bench(g1, "ours", 600e-6, calls=20, output_check="ok (32 tokens)", predicted_ratio=1.52),
            _bench(g1, "base_graph", 8e-6),
            _bench(g1, "ours_graph", 9e-6, output_check="ok (32 tokens)", predicted_ratio=1.52),
            _bench(g4, "base", 1.00e-3),
            _bench(g4, "peft", 40e-3),
            _bench(g4, "ours", 1.06e-3, output_check="FAILED: x", predicted_ratio=1.77),
            _bench(gd, "base", 0.300),
            _bench(gd, "ours", 0.320),
        ],
    }
    text = render(data, "cmd")
    assert "- device: NVIDIA H200" in text and "- torch 2.11.0+cu130, triton 3.6.0" in text
    assert f"| {g1} | base | 10.0 µs | 1.000 |  |  |  |  |" in text
    # A graph row is divided by the graphed base (9 / 8), never by the eager one (9 / 10).
    assert f"| {g1} | ours_graph | 9.0 µs | 1.125 |  | ≤ 1.15× base_graph: met | 1.52 | ok (32 tokens) |" in text
    assert f"| {g1} | ours | 30.0 µs | 3.000 |  |  | 1.52 | ok (32 tokens) |" in text
    verdict = "≤ 1.05× base: missed; ≤ 0.05× peft: met"
    assert f"| {g4} | ours | 1.06 ms | 1.060 | 0.026 | {verdict} | 1.77 | FAILED: x |" in text
    assert f"| {gd} | ours | 320.00 ms | 1.067 |  | ≤ 1.11× base: met |  |  |" in text
    assert "| gpu op" in text and "| op " not in text
