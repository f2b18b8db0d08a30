"""The GPU cost model (benchmarks/gpu_model.py) prices exactly the kernels the dispatch table launches, and its
predictions move the way the kernels' bytes and launches do."""

import json

import pytest

from benchmarks import gpu_model

H200 = gpu_model.DEVICES["h200"]


@pytest.mark.parametrize(
    ("t", "e", "r", "fuse", "kernels"),
    [
        (1, 10, 4, None, ["cublas_gemm", "_decode_shrink_kernel", "_decode_expand_kernel"]),
        (16384, 10, 4, None, ["cublas_gemm", "_route_shrink_kernel", "_expand_dense_kernel"]),
        (16384, 10, 4, True, ["_route_shrink_kernel", "_expand_dense_kernel"]),
        (64, 10, 4, None, ["cublas_gemm", "_route_shrink_kernel", "_route_shrink_kernel", "_expand_dense_kernel"]),
        (16384, 64, 8, None, ["cublas_gemm", "_route_shrink_kernel", "_align_kernel",
                             "_grouped_shrink_kernel", "_grouped_expand_kernel"]),
    ],
)  # fmt: skip
def test_models_the_launched_kernels(t, e, r, fuse, kernels):
    costs = gpu_model.kernel_costs(t, 3072, 9216, e, r, 3, H200, fuse)
    assert [c.name for c in costs] == kernels
    assert all(c.time_s >= c.floor_s > 0 for c in costs)


def test_fusing_the_base_gemm_removes_the_y_round_trip():
    unfused = gpu_model.predict("qkv_proj", "E10_r4", 4096, H200)
    fused = gpu_model.predict("qkv_proj", "E10_r4", 4096, H200, fuse_base=True)
    assert fused.floor_ratio < unfused.floor_ratio and fused.launches == unfused.launches - 1
    assert unfused.ratio >= unfused.floor_ratio > 1


def test_decode_is_launch_bound():
    p = gpu_model.predict("o_proj", "E10_r4", 1, H200)
    assert p.launches == 3 and p.ratio > p.floor_ratio


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert gpu_model.main(["--device", "h100", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"]["name"] == "H100 SXM"
    assert len(data["predictions"]) == len(gpu_model.table(gpu_model.DEVICES["h100"]))
    assert "qkv_proj E10_r4 T=1" in capsys.readouterr().out
