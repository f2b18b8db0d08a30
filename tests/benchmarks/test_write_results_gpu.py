"""GPU benchmark rows (benchmarks/test_bench_triton.py) in RESULTS.md: per-call medians, the device they recorded,
and every GPU target of DESIGN.md with its verdict."""

from benchmarks.write_results import render


def _bench(group, impl, median, calls=1):
    info = {"impl": impl, "calls": calls, "device": "NVIDIA H100 80GB HBM3"}
    return {"group": group, "name": f"test[{impl}]", "extra_info": info, "stats": {"median": median}}


def test_gpu_rows():
    g1 = "gpu op qkv_proj 3072->9216 T=1 E10_r4 bf16"
    g4 = "gpu op qkv_proj 3072->9216 T=4096 E64_r8 bf16"
    gd = "gpu model decode 32 tokens (Phi-3-mini)"
    data = {
        "benchmarks": [
            _bench(g1, "base", 200e-6, calls=20),  # 10 µs per call
            _bench(g1, "ours", 600e-6, calls=20),
            _bench(g1, "base_graph", 160e-6, calls=20),
            _bench(g1, "ours_graph", 180e-6, calls=20),
            _bench(g4, "base", 1.00e-3),
            _bench(g4, "peft", 40e-3),
            _bench(g4, "ours", 1.04e-3),
            _bench(gd, "base", 0.300),
            _bench(gd, "ours", 0.320),
        ]
    }
    text = render(data, "cmd")
    assert "- device recorded by the benchmarks: NVIDIA H100 80GB HBM3" in text
    assert f"| {g1} | base | 10.0 µs | 1.000 |  |  |" in text
    assert f"| {g1} | ours_graph | 9.0 µs | 0.900 |  | ≤ 1.15× base_graph: met |" in text
    assert f"| {g4} | ours | 1.04 ms | 1.040 | 0.026 | ≤ 1.05× base: met; ≤ 0.05× peft: met |" in text
    assert f"| {gd} | ours | 320.00 ms | 1.067 |  | ≤ 1.11× base: met |" in text
    assert "| gpu op" in text and "| op " not in text
