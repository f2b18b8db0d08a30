"""benchmarks/bench_gpu.py without a GPU: it refuses to run (exit 2), and the rows it writes render in RESULTS_gpu.md
with per-call medians, spreads and the GPU columns."""

import pytest
import torch

from benchmarks import bench_gpu
from benchmarks.write_results import render


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    assert bench_gpu.main(["--json", str(tmp_path / "b.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_rows_render(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    group = "gpu op o_proj 3072->3072 T=1 E10_r4 bf16"
    rows = [
        bench_gpu._row(group, "base_graph", [8e-6, 9e-6, 8.5e-6]),
        bench_gpu._row(
            group, "ours_graph", [10e-6, 11e-6, 10.5e-6], output_check="ok (1 tokens)", predicted_ratio=2.19
        ),  # fmt: skip
    ]
    assert rows[1]["stats"]["median"] == pytest.approx(10.5e-6) and rows[1]["stats"]["rounds"] == 3
    text = render({"benchmarks": rows, "versions": {"triton": "3.6.0", "torch": "2.11.0"}}, "cmd")
    assert f"| {group} | ours_graph | 10.5 µs | 1.235 |  | ≤ 1.15× base_graph: missed | 2.19 | ok (1 tokens) |" in text


def test_quick_cases_are_a_subset():
    assert set(bench_gpu.op_cases(True)) < set(bench_gpu.op_cases(False))
    assert {t for _, _, t in bench_gpu.op_cases(False)} == {1, 16, 256, 4096}
