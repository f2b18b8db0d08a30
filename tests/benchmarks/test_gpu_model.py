"""The GPU cost model (benchmarks/gpu_model.py) prices exactly the kernels the dispatch table launches, charges L2
re-reads, serial ALU work and launches, overlaps the decode kernels with the base GEMM, prints the design's table with
its targets and an uncertainty range, and its predictions move the way the kernels' bytes and launches do."""

import json

import pytest

from benchmarks import gpu_model

H100 = gpu_model.DEVICES["h100"]
QKV = (3072, 9216)


@pytest.mark.parametrize(
    ("t", "e", "r", "fuse", "kernels"),
    [
        (1, 10, 4, None, ["cublas_gemm", "_decode_route_kernel", "_decode_shrink_kernel", "_decode_expand_kernel",
                          "add_delta"]),
        (16, 256, 16, None, ["cublas_gemm", "_decode_route_kernel", "_decode_shrink_kernel", "_decode_expand_kernel",
                             "add_delta"]),
        (16384, 10, 4, None, ["_route_shrink_kernel", "_expand_dense_kernel"]),
        (16384, 10, 4, False, ["cublas_gemm", "_route_shrink_kernel", "_expand_dense_kernel"]),
        (64, 10, 4, None, ["cublas_gemm", "_route_shrink_kernel", "_route_shrink_kernel", "_expand_dense_kernel"]),
        (16384, 64, 8, None, ["cublas_gemm", "_route_shrink_kernel", "_scatter_kernel", "_grouped_shrink_kernel",
                              "_grouped_expand_kernel"]),
    ],
)  # fmt: skip
def test_models_the_launched_kernels(t, e, r, fuse, kernels):
    costs = gpu_model.kernel_costs(t, *QKV, e, r, 3, H100, fuse)
    assert [c.name for c in costs] == kernels
    for c in costs:
        c.price(H100)
        assert c.time_s >= c.floor_s > 0, c
    assert {c.name for c in costs if c.stream == "side"} == (
        {"_decode_route_kernel", "_decode_shrink_kernel", "_decode_expand_kernel"} if t <= 16 else set()
    )


def test_decode_overlaps_the_base_gemm():
    """At decode the route, shrink and expand run beside the base GEMM: the call costs the base plus the final add,
    not the sum of every kernel."""
    p = gpu_model.predict_shape("", 1, *QKV, 10, 8, H100)
    kernels = {k["name"]: k["time_s"] for k in p.kernels}
    serial = sum(kernels.values())
    assert p.ours_s < serial
    assert p.ours_s == pytest.approx(kernels["cublas_gemm"] + kernels["add_delta"], rel=0.05)


def test_l2_re_reads_are_charged():
    """The route pass's L2 traffic grows with the token blocks re-reading all prototype pieces (and A), and the
    fused GEMM's with its tiles; both enter the time."""
    (route,) = [c for c in gpu_model.kernel_costs(16384, *QKV, 256, 16, 3, H100) if c.name == "_route_shrink_kernel"]
    e, d_in = 256, QKV[0]
    assert route.l2_bytes >= (16384 // 64) * 3 * e * d_in * 2
    cheap_l2 = gpu_model.replace(gpu_model.NOMINAL, l2_bw=1e15)
    assert route.price(H100).time_s > route.price(H100, cheap_l2).time_s


def test_scatter_serial_work_and_launch_gap_are_charged():
    costs = gpu_model.kernel_costs(2048, *QKV, 256, 16, 3, H100)
    (scatter,) = [c for c in costs if c.name == "_scatter_kernel"]
    assert scatter.serial_alu > 0 and scatter.rounds_l2 >= 2
    base = scatter.price(H100).time_s
    assert scatter.price(H100, gpu_model.replace(gpu_model.NOMINAL, launch_gap=3e-6)).time_s == pytest.approx(
        base + 1.5e-6
    )


def test_fusing_the_base_gemm_removes_the_y_round_trip():
    unfused = gpu_model.predict("qkv_proj", "E10_r4", 4096, H100, fuse_base=False)
    fused = gpu_model.predict("qkv_proj", "E10_r4", 4096, H100, fuse_base=True)
    assert fused.ratio < unfused.ratio and fused.launches == unfused.launches - 1
    y_bytes = 4096 * QKV[1] * 2
    dram = lambda p: sum(k["dram_bytes"] for k in p.kernels)  # noqa: E731
    assert dram(unfused) - dram(fused) >= 1.5 * y_bytes, "the unfused expand reads and writes y once more"


def test_target_table_and_range():
    """The table covers decode T = 1, 16 and prefill T = 2048 at E in {10, 64, 256}, r in {8, 16}; every cell has a
    range around its nominal ratio, and the verdicts follow the targets."""
    rows = gpu_model.target_table(H100)
    assert {(r["tokens"], r["experts"], r["rank"]) for r in rows} == {
        (t, e, r) for t in (1, 16, 2048) for e in (10, 64, 256) for r in (8, 16)
    }
    for row in rows:
        assert row["low"] <= row["ratio"] + 1e-9, row
        assert row["target"] == gpu_model.target(row["tokens"], row["experts"])
        if row["target"] is not None:
            assert row["met"] == (row["ratio"] <= row["target"])
    assert gpu_model.target(1, 64) == 1.10 and gpu_model.target(16, 256) == 1.20
    assert gpu_model.target(2048, 10) == 1.10 and gpu_model.target(2048, 256) == 1.30
    assert gpu_model.target(2048, 64) is None


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert gpu_model.main(["--device", "h100", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"]["name"] == "H100 SXM" and len(data["table"]) == 18
    assert set(data["assumptions"]) == {"nominal", "low", "high"}
    text = capsys.readouterr().out
    assert "qkv_proj T=1 E=10 r=8" in text and "qkv_proj T=2048 E=256 r=16" in text and "≤1.30" in text


@pytest.fixture(scope="module")
def h100_table():
    return gpu_model.target_table(H100)


def test_table_is_monotone_in_experts_and_never_below_the_base(h100_table):
    """More experts never make a cell cheaper (nominal ratio and both corners, at a fixed T and r), and no cell
    predicts the patched call faster than the base alone, at any corner."""
    by_cell = {(row["tokens"], row["experts"], row["rank"]): row for row in h100_table}
    for t in gpu_model.TABLE_TOKENS:
        for r in gpu_model.TABLE_RANKS:
            for e_lo, e_hi in zip(gpu_model.TABLE_EXPERTS, gpu_model.TABLE_EXPERTS[1:]):
                lo, hi = by_cell[(t, e_lo, r)], by_cell[(t, e_hi, r)]
                for key in ("ratio", "low", "high"):
                    assert hi[key] >= lo[key] - 1e-9, (key, lo["case"], hi["case"])
    for row in h100_table:
        assert 1.0 <= row["low"] <= row["ratio"] <= row["high"], row["case"]
        assert row["floor"] >= 1.0 and row["eager"] >= 1.0, row["case"]


def test_reads_at_least_what_the_design_must_read(h100_table):
    """Every cell's kernels move at least W once and the experts routing must touch (all of them at prefill: 2048
    tokens × k = 3 choose every one of 256 with near certainty; the expected distinct ones at decode), and at prefill
    do at least the base GEMM's FLOPs."""
    d_in, d_out = QKV
    for row in h100_table:
        t, e, r = row["tokens"], row["experts"], row["rank"]
        costs = gpu_model.kernel_costs(t, d_in, d_out, e, r, 3, H100)
        dram = sum(c.dram_bytes for c in costs)
        experts = gpu_model.distinct_experts(t, e, 3) * r * (d_in + d_out) * 2
        assert dram >= d_out * d_in * 2 + experts, row["case"]
        assert sum(c.flops for c in costs) >= 2.0 * t * d_in * d_out, row["case"]
        if t > 16:
            assert gpu_model.distinct_experts(t, e, 3) == pytest.approx(e, rel=1e-6)


def test_table_names_the_runtime_dispatch(h100_table, monkeypatch):
    """The regime each row names (and prices) is the one a layer prepared on an H100 picks at run time: a layer built
    through ``PreparedExperts.build`` with the device query answering an H100 SXM (sm_90, 132 SMs), and the launches
    that ``routed_linear`` then records are the kernels (and grids) the row priced."""
    import torch
    from genknowsub_fast.triton_kernels import launch, linear

    monkeypatch.setattr(linear, "device_info", lambda device: ((9, 0), 132))
    d_in, d_out = QKV
    meta = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    seen = set()
    for row in h100_table:
        t, e, r = row["tokens"], row["experts"], row["rank"]
        protos = torch.empty(e, d_in, device="meta", dtype=torch.float32)
        layer = linear.PreparedExperts.build(protos, meta(e, r, d_in), meta(e, r, d_out), 3, 1.0, False,
                                             p_route=meta(e, 3 * d_in), inv_scale=1.0)  # fmt: skip
        assert (layer.spec.capability, layer.spec.num_sms) == (H100.capability, H100.num_sms)
        plan = layer.plan(t)
        assert row["regime"] == plan.regime + (" fused" if plan.fuses_base else ""), row["case"]
        with launch.recording() as rec:
            linear.routed_linear(layer, meta(t, d_in), meta(d_out, d_in), None, beside=True)
        priced = [k for k in row["kernels"] if k not in ("cublas_gemm", "add_delta")]
        assert priced == [ln.name for ln in rec], row["case"]
        costs = gpu_model.kernel_costs(t, d_in, d_out, e, r, 3, H100)
        grids = [(c.name, c.grid) for c in costs if c.name not in ("cublas_gemm", "add_delta")]
        assert grids == [(ln.name, tuple(ln.grid)) for ln in rec], row["case"]
        assert ("cublas_gemm" in row["kernels"]) != plan.fuses_base, row["case"]
        seen.add(row["regime"])
    assert seen == {"decode", "dense fused", "grouped"}, "the table reaches every regime the dispatch has at T = 2048"


def test_design_doc_holds_the_generated_table():
    """docs/design.md's table is the output of ``python -m benchmarks.gpu_model --markdown``, not a hand copy."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    start = "<!-- generated: python -m benchmarks.gpu_model --markdown -->\n"
    assert start in text
    block = text.split(start, 1)[1].split("\n<!-- end generated -->", 1)[0]
    assert block == gpu_model.markdown_table()
