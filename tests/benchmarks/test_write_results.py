"""RESULTS.md and the README speed table are computed from the JSON of ``pytest benchmarks/ --benchmark-json``: ratios
per round, their median and spread, absolute medians, the ISA of every case, target verdicts, the scale case's memory
multiples, the run's record (CPU, AVX-512 visibility, versions, load, command, subset), kept blocks."""

import json

import pytest

from benchmarks.report import added, from_pytest_json, ratio, ratios, scale_summary, scale_verdicts, summary, verdicts
from benchmarks.write_results import (
    EVAL_BEGIN,
    EVAL_END,
    UNNAMED_ISA_NOTE,
    VLLM_BEGIN,
    VLLM_END,
    main,
    render,
    replace_block,
    update_readme,
)

OP = "op qkv_proj 3072->9216 {lib} T={t} float32"


def _case(section, name, times, isa="avx2", **info):
    calls = dict.fromkeys(times, 1)
    return {"section": section, "case": name, "isa": isa, "times": times, "calls": calls, "info": info}


def _op(lib, e, t, base, ours, peft=None, dtype="float32"):
    times = {"base": base, "ours": ours, **({"peft": peft} if peft else {})}
    name = OP.format(lib=lib, t=t).replace("float32", dtype)
    return _case("op", name, times, module="qkv_proj", library=lib, experts=e, tokens=t, dtype=dtype)


def _data(cases, machine=None, **run):
    """A pytest-benchmark JSON as benchmarks/conftest.py writes it, holding ``cases`` as the benchmarks' extra_info."""
    m = {
        "cpu": "AMD EPYC",
        "cores": 2,
        "cpu_flags": ["avx2", "fma", "f16c"],
        "avx512": False,
        "avx512_bf16": False,
        "torch_cpu_capability": "AVX2",
        "kernel_isa": "avx2",
        "kernel_isa_forced": None,
        "gpu": None,
        **(machine or {}),
    }
    versions = {"torch": "2.13.0+cpu", "triton": "3.9.0", "peft": "0.18.0", "transformers": "4.57.0",
                "python": "3.11.7", "threads": 2}  # fmt: skip
    record = {
        "command": "pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/latest.json",
        "rounds": 3,
        "selection": "",
        "elapsed_s": 612.3,
        "started": "2026-11-23T23:49:48+00:00",
        "loadavg_start": [3.5, 2.25, 1.0],
        "loadavg_end": [4.0, 3.0, 2.0],
        "exitstatus": 0,
        **run,
    }
    benchmarks = [{"name": f"test[{i}]", "group": c["section"], "extra_info": c, "stats": {"median": 1.0}}
                  for i, c in enumerate(cases)]  # fmt: skip
    return {
        "machine_info": {"node": "x", "genknowsub_fast": {"machine": m, "versions": versions}},
        "datetime": "2026-11-24T00:00:00+00:00",
        "benchmarks": benchmarks,
        "genknowsub_fast": record,
    }


# Per round: ours/base = 1.02, 1.10, 1.03 -> median 1.03 (the ratio of the medians, 0.105/0.100, would be 1.05);
# ours/peft = 0.51, 0.55, 0.3433.. -> median 0.51.
OP_E10 = _op("E10_r4", 10, 512, [0.100, 0.100, 0.150], [0.102, 0.110, 0.1545], peft=[0.200, 0.200, 0.450])
OP_E256 = _op("E256_r16", 256, 512, [0.100, 0.100, 0.100], [0.107, 0.108, 0.109])  # 1.08 <= 1.10: met
OP_E64_BF16 = _op("E64_r8", 64, 1, [0.010, 0.010, 0.010], [0.0106, 0.0107, 0.0104], dtype="bfloat16")  # 1.06: missed
MODEL = _case("model", "model decode 32 tokens float32 (Phi-3)", {"base": [0.02, 0.02, 0.02], "ours": [0.023, 0.021,
              0.0224], "peft": [0.03, 0.03, 0.03]}, phase="decode", dtype="float32")  # fmt: skip
LAYER = _case("layer", "layer qkv_proj 256->768 T=1 float32", {"base": [10e-6, 11e-6, 10e-6],
              "ours": [14e-6, 14e-6, 16e-6]}, tokens=1)  # fmt: skip
PROTO = _case("prototypes", "prototypes phi3-mini E10_r4 1280 problems float32",
              {"peft": [0.8, 0.8, 0.8], "torch": [0.12, 0.12, 0.12], "ours": [0.02, 0.04, 0.032]})  # fmt: skip


def test_ratios_are_taken_per_round():
    med, lo, hi = ratio(OP_E10, "ours", "base")
    assert (med, lo, hi) == pytest.approx((1.03, 1.02, 1.10))
    assert ratio(OP_E10, "ours", "peft") == pytest.approx((0.51, 0.1545 / 0.45, 0.55))
    assert ratio(OP_E256, "ours", "peft") is None
    assert added(LAYER) == pytest.approx((4e-6, 3e-6, 6e-6))


def test_targets_by_library_and_section():
    assert verdicts(OP_E10) == [("≤ 1.05× base", True)]
    assert verdicts(OP_E256) == [("≤ 1.10× base", True)]
    assert verdicts(OP_E64_BF16) == [("≤ 1.05× base", False)]
    assert verdicts(MODEL) == [("≤ 1.10× base", False)]  # per round 1.15, 1.05, 1.12
    assert verdicts(PROTO) == [("≤ 0.05× peft", True), ("≤ 0.33× torch", True)]
    assert verdicts(LAYER) == []


SCALE_LOAD = {
    "section": "scale", "kind": "load", "case": "scale load + patch + forward: E=256 r=16, 4 layers", "isa": "avx512",
    "info": {"library_bytes": 2 * 10**9, "layers": 4},
    "rounds": [
        {"load_s": 0.5, "patch_s": 1.5, "extra_rss": 2.2e9, "extra_rss_after_del": 2.1e9, "peak_extra": 2.4e9},
        {"load_s": 0.7, "patch_s": 1.9, "extra_rss": 2.0e9, "extra_rss_after_del": 2.0e9, "peak_extra": 2.6e9},
        {"load_s": 0.6, "patch_s": 1.2, "extra_rss": 2.4e9, "extra_rss_after_del": 2.3e9, "peak_extra": 3.0e9},
    ],
}  # fmt: skip
SCALE_BUILD = {
    "section": "scale", "kind": "build", "case": "scale build: 256 + 3 general adapters, 4 layers", "isa": "avx512",
    "info": {"adapters": 259, "layers": 4},
    "rounds": [{"build_s": 3.0, "peak_extra": 2.5 * 2**30, "input_bytes": 2 * 2**30, "one_adapter_bytes": 2**26,
                "output_bytes": 2**30}],
}  # fmt: skip


def test_ratios_in_extra_info_include_the_speedup_over_peft():
    r = ratios(OP_E10)
    assert set(r) == {"ours/base", "ours/peft", "peft/ours"}
    assert (r["ours/base"]["median"], r["ours/base"]["min"], r["ours/base"]["max"]) == pytest.approx((1.03, 1.02, 1.1))
    assert r["peft/ours"]["median"] == pytest.approx(1 / 0.51) and r["peft/ours"]["max"] == pytest.approx(0.45 / 0.1545)
    assert set(ratios(OP_E256)) == {"ours/base"}
    assert set(ratios(PROTO)) == {"ours/peft", "peft/ours", "ours/torch"}


def test_scale_multiples_and_targets():
    s = scale_summary(SCALE_LOAD)
    assert s["extra_rss_x"] == pytest.approx((1.1, 1.0, 1.2))  # of the library's 2e9 bytes
    assert s["peak_x"] == pytest.approx((1.3, 1.2, 1.5))
    assert s["load_patch_s_per_gb"] == pytest.approx((1.0, 0.9, 1.3))  # (load + patch) / 2 GB
    assert scale_verdicts(SCALE_LOAD) == [("extra RSS ≤ 1.10× library", True), ("peak ≤ 1.25× library", False),
                                          ("load + patch ≤ 1 s/GB", True)]  # fmt: skip
    b = scale_summary(SCALE_BUILD)
    assert b["build_s_per_gib"] == pytest.approx((1.5, 1.5, 1.5))
    assert b["peak_output_x"][0] == pytest.approx(2.5)
    assert b["peak_over_bound"][0] == pytest.approx(2.5 / (1.25 + 1 / 16))  # 1.25× output + one adapter
    assert scale_verdicts(SCALE_BUILD) == [("≤ 2 s/GiB input", True), ("peak ≤ 1.25× output + one adapter", False)]


def test_results_md(tmp_path):
    data = _data([OP_E10, OP_E256, OP_E64_BF16, MODEL, LAYER, PROTO, SCALE_LOAD, SCALE_BUILD])
    text = render(data)
    assert "- CPU: AMD EPYC (2 cores); vector flags the OS shows: avx2 fma f16c" in text
    avx = "- AVX-512 visible: no; AVX-512-BF16 visible: no; torch CPU capability: AVX2; routed kernel ISA: avx2"
    assert avx in text
    assert "- GPU: none (the GPU cases were skipped)" in text
    assert "torch threads: 2" in text and "triton 3.9.0" in text
    assert "load average (1, 5, 15 min) 3.50, 2.25, 1.00 at the start, 4.00, 3.00, 2.00 at the end" in text
    assert "- run started 2026-11-23T23:49:48+00:00, took 612 s;" in text
    assert "- 3 interleaved rounds per case (7 at least for the one-layer rows)" in text
    assert "- command: `pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/latest.json`" in text
    assert "| case | ISA | base | ours | PEFT | ours × base | ours × PEFT | target |" in text
    assert "| case | ISA | base | ours | added per call | ours × base | target |" in text
    assert "| case | ISA | ours | PEFT | torch | ours × PEFT | ours × torch | target |" in text
    row = f"| {OP_E10['case']} | avx2 | 100.00 ms | 110.00 ms | 200.00 ms | 1.030 (1.020–1.100) | 0.510 (0.343–0.550) |"
    assert row + " ≤ 1.05× base: met |" in text
    bf16 = f"| {OP_E64_BF16['case']} | avx2 | 10.00 ms | 10.60 ms |  | 1.060 (1.040–1.070) |  | ≤ 1.05× base: missed |"
    assert bf16 in text
    assert f"| {LAYER['case']} | avx2 | 10.0 µs | 14.0 µs | 4.0 µs (3.0–6.0) | 1.400 (1.273–1.600) |  |" in text
    protos = "| avx2 | 32.00 ms | 800.00 ms | 120.00 ms | 0.040 (0.025–0.050) | 0.267 (0.167–0.333) |"
    assert f"| {PROTO['case']} {protos} ≤ 0.05× peft: met; ≤ 0.33× torch: met |" in text
    load = (f"| {SCALE_LOAD['case']} | avx512 | 1.86 GiB | 3 | 600.00 ms | 1.500 s | 1.00 (0.90–1.30) s | "
            "1.10 (1.00–1.20) | 1.05 (1.00–1.15) | 1.30 (1.20–1.50) | extra RSS ≤ 1.10× library: met; "
            "peak ≤ 1.25× library: missed; load + patch ≤ 1 s/GB: met |")  # fmt: skip
    assert load in text
    build = f"| {SCALE_BUILD['case']} | avx512 | 2.00 GiB (259 files) | 1.00 GiB | 3.000 s | 1.50 (1.50–1.50) s |"
    assert build in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main([str(path), "-o", str(out)]) == 0
    assert out.read_text().rstrip("\n") == text.rstrip("\n")


def test_avx512_machine_and_forced_isa_are_named():
    data = _data([OP_E10], machine={"avx512": True, "avx512_bf16": True, "torch_cpu_capability": "AVX512",
                                    "kernel_isa": "avx512", "kernel_isa_forced": "avx2"})  # fmt: skip
    text = render(data)
    avx = "AVX-512 visible: yes; AVX-512-BF16 visible: yes; torch CPU capability: AVX512; routed kernel ISA: avx512 "
    assert avx + "(forced by GENKNOWSUB_FAST_CPU_ISA=avx2)" in text
    assert "AVX-512 visible: yes, AVX-512-BF16 visible: yes" in summary(from_pytest_json(data))


def test_a_json_without_the_start_time_says_only_when_it_ended():
    data = _data([OP_E10])
    del data["genknowsub_fast"]["started"]  # pytest-benchmark's "datetime" is when the JSON was written
    assert "- run started before 2026-11-24T00:00:00+00:00, took 612 s;" in render(data)
    assert "started before 2026-11-24T00:00:00+00:00, load average" in summary(from_pytest_json(data))


def test_subset_and_failed_runs_say_so():
    data = _data([OP_E10], selection="-m quick", exitstatus=2)
    for text in (render(data), summary(from_pytest_json(data))):
        assert "SUBSET run (-m quick)" in text and "INTERRUPTED or FAILED (pytest exit status 2)" in text
    assert "SUBSET" not in summary(from_pytest_json(_data([OP_E10])))


def test_readme_block_is_filled_from_the_json(tmp_path):
    op_t1 = _op("E10_r4", 10, 1, [1.0] * 3, [1.2] * 3)
    data = _data([OP_E10, OP_E256, OP_E64_BF16, op_t1, MODEL, PROTO, SCALE_LOAD, SCALE_BUILD])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- speed-table -->\nold numbers\n<!-- /speed-table -->\n\n## after\n")
    assert main([str(path), "-o", str(tmp_path / "R.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("<!-- /speed-table -->\n\n## after\n")
    head = "Measured by `make bench` on AMD EPYC (2 cores; AVX-512 visible: no, AVX-512-BF16 visible: no; torch sees "
    assert head + "AVX2), routed kernel ISA of every CPU number: avx2, avx512;" in text
    assert "load average 3.5 at the start" in text and "over 3 interleaved rounds" in text
    # The op matrix: one row per module and library, one column per dtype and T; missed cells carry the mark.
    assert "| op: ours × base | fp32 T=1 | fp32 T=512 | bf16 T=1 | bf16 T=512 | target |" in text
    assert "| qkv_proj E10_r4 | 1.20 (1.20–1.20) ✗ | 1.03 (1.02–1.10) |  |  | ≤ 1.05× base |" in text
    assert "| qkv_proj E256_r16 |  | 1.08 (1.07–1.09) |  |  | ≤ 1.10× base |" in text
    assert "| qkv_proj E64_r8 |  |  | 1.06 (1.04–1.07) ✗ |  | ≤ 1.05× base |" in text
    assert f"| {MODEL['case']} | 1.12 (1.05–1.15) | 0.747 (0.700–0.767) |  | ≤ 1.10× base: missed |" in text
    assert f"| {PROTO['case']} |  | 0.040 (0.025–0.050) | 0.267 (0.167–0.333) |" in text
    scale = (f"| {SCALE_LOAD['case']} | load + patch 1.00 (0.90–1.30) s/GB; extra RSS 1.10 (1.00–1.20)× library; "
             "peak 1.30 (1.20–1.50)× library (1.86 GiB) |")  # fmt: skip
    assert scale in text
    assert f"| {SCALE_BUILD['case']} | 1.50 (1.50–1.50) s/GiB input; peak 2.50 (2.50–2.50)× output," in text


def test_readme_needs_the_pytest_json(tmp_path):
    rows = {"benchmarks": [{"group": "gpu op x", "name": "x", "extra_info": {"impl": "base"}, "stats": {"median": 1}}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="pytest benchmarks/ only"):
        main([str(path), "-o", str(tmp_path / "R.md"), "--readme", str(tmp_path / "README.md")])


def test_a_run_without_cases_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_data([])))
    with pytest.raises(ValueError, match="no benchmark case recorded"):
        main([str(path), "-o", str(tmp_path / "R.md")])


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="speed-table"):
        update_readme(str(readme), "table")


def test_the_eval_compare_block_survives_a_rewrite(tmp_path):
    out = tmp_path / "RESULTS.md"
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval\n\n| a | b |", append=True)  # created
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_data([MODEL])))
    assert main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmark results\n") and text.count(EVAL_BEGIN) == 1
    # The block names no ISA: it is kept, under a note saying so.
    assert f"{EVAL_BEGIN}\n{UNNAMED_ISA_NOTE}\n\n## eval\n\n| a | b |\n{EVAL_END}" in text
    assert main([str(path), "-o", str(out)]) == 0
    assert out.read_text().count(UNNAMED_ISA_NOTE) == 1  # a second rewrite adds no second note
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval\n\nnew", append=True)  # replaced in place
    assert out.read_text().count(EVAL_BEGIN) == 1 and "new" in out.read_text() and "| a | b |" not in out.read_text()


def test_the_vllm_block_survives_a_rewrite_too(tmp_path):
    out = tmp_path / "RESULTS.md"
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval", append=True)
    replace_block(str(out), VLLM_BEGIN, VLLM_END, "## vLLM\n\n| a | b |", append=True)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_data([MODEL])))
    assert main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(EVAL_BEGIN) == 1 and text.count(VLLM_BEGIN) == 1
    assert f"{VLLM_BEGIN}\n{UNNAMED_ISA_NOTE}\n\n## vLLM\n\n| a | b |\n{VLLM_END}" in text


def test_a_kept_block_that_names_its_isa_is_kept_verbatim(tmp_path):
    out = tmp_path / "RESULTS.md"
    body = "## vLLM\n\n- device: CPU: X (2 cores; ...; routed kernel ISA avx512)\n\n| a | b |"
    replace_block(str(out), VLLM_BEGIN, VLLM_END, body, append=True)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_data([MODEL])))
    assert main([str(path), "-o", str(out)]) == 0
    assert f"{VLLM_BEGIN}\n{body}\n{VLLM_END}" in out.read_text() and UNNAMED_ISA_NOTE not in out.read_text()


def test_gpu_cases_render_with_their_device_checks_and_graph_ratios():
    name = "gpu op qkv_proj 3072->9216 T=1 E10_r4 bf16"
    times = {"base": [10e-6] * 3, "ours": [30e-6] * 3, "base_graph": [8e-6] * 3, "ours_graph": [9e-6, 9.2e-6, 8.8e-6],
             "peft": [100e-6] * 3}  # fmt: skip
    case = _case("gpu op", name, times, isa="NVIDIA H200", output_check={"ours": "ok (32 tokens)"},
                 predicted_ratio={"ours": 1.52})  # fmt: skip
    text = render(_data([case], machine={"gpu": "NVIDIA H200"}))
    assert "- GPU: NVIDIA H200" in text
    assert "| ours_graph × base_graph |" in text and "ours_fused" not in text
    row = (f"| {name} | NVIDIA H200 | 10.0 µs | 30.0 µs | 100.0 µs | 8.0 µs | 9.0 µs | 3.000 (3.000–3.000) | "
           "1.125 (1.100–1.150) | 0.300 (0.300–0.300) | ours 1.52 | ours: ok (32 tokens) | "
           "ours_graph ≤ 1.15× base_graph: met |")  # fmt: skip
    assert row in text
