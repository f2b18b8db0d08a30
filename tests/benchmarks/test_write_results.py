"""RESULTS.md and the README speed table are computed from the interleaved CPU JSON: ratios per round, their median
and spread, absolute medians, target verdicts, the run's record (CPU, versions, load, command), kept blocks."""

import json

import pytest

from benchmarks.results_cpu import added, ratio, summary, verdicts
from benchmarks.write_results import (
    EVAL_BEGIN,
    EVAL_END,
    VLLM_BEGIN,
    VLLM_END,
    main,
    render,
    replace_block,
    update_readme,
)

OP = "op qkv_proj 3072->9216 {lib} T={t} float32"


def _case(section, name, times, **info):
    return {"section": section, "case": name, "times": times, "calls": dict.fromkeys(times, 1), "info": info}


def _op(lib, e, t, base, ours, peft=None, dtype="float32"):
    times = {"base": base, "ours": ours, **({"peft": peft} if peft else {})}
    name = OP.format(lib=lib, t=t).replace("float32", dtype)
    return _case("op", name, times, module="qkv_proj", library=lib, experts=e, tokens=t, dtype=dtype)


def _data(cases, **extra):
    return {
        "format": "interleaved",
        "datetime": "2026-11-24T00:00:00+00:00",
        "elapsed_s": 612.3,
        "command": "python -m benchmarks.bench_cpu --json benchmarks/results/latest.json",
        "repeats": 3,
        "quick": False,
        "interrupted": False,
        "loadavg_start": [3.5, 2.25, 1.0],
        "loadavg_end": [4.0, 3.0, 2.0],
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "cpu_flags": ["avx2", "fma", "f16c"],
            "torch_cpu_capability": "AVX2",
            "kernel_isa": "avx2",
        },  # fmt: skip
        "versions": {
            "torch": "2.13.0+cpu",
            "triton": "3.9.0",
            "peft": "0.18.0",
            "transformers": "4.57.0",
            "python": "3.11.7",
            "threads": 2,
        },  # fmt: skip
        "cases": cases,
        **extra,
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


def test_results_md(tmp_path):
    data = _data([OP_E10, OP_E256, OP_E64_BF16, MODEL, LAYER, PROTO])
    text = render(data)
    assert "- CPU: AMD EPYC (2 cores); vector flags the OS shows: avx2 fma f16c (no AVX-512 visible" in text
    assert "- torch CPU capability: AVX2; routed kernel ISA: avx2" in text
    assert "torch threads: 2" in text and "triton 3.9.0" in text
    assert "load average (1, 5, 15 min) 3.50, 2.25, 1.00 at the start, 4.00, 3.00, 2.00 at the end" in text
    assert "- command: `python -m benchmarks.bench_cpu --json benchmarks/results/latest.json`" in text
    assert "| case | base | ours | PEFT | ours × base | ours × PEFT | target |" in text
    assert "| case | base | ours | added per call | ours × base | target |" in text
    assert "| case | ours | PEFT | torch | ours × PEFT | ours × torch | target |" in text
    row = f"| {OP_E10['case']} | 100.00 ms | 110.00 ms | 200.00 ms | 1.030 (1.020–1.100) | 0.510 (0.343–0.550) |"
    assert row + " ≤ 1.05× base: met |" in text
    assert f"| {OP_E64_BF16['case']} | 10.00 ms | 10.60 ms |  | 1.060 (1.040–1.070) |  | ≤ 1.05× base: missed |" in text
    assert f"| {LAYER['case']} | 10.0 µs | 14.0 µs | 4.0 µs (3.0–6.0) | 1.400 (1.273–1.600) |  |" in text
    protos = "| 32.00 ms | 800.00 ms | 120.00 ms | 0.040 (0.025–0.050) | 0.267 (0.167–0.333) |"
    assert f"| {PROTO['case']} {protos} ≤ 0.05× peft: met; ≤ 0.33× torch: met |" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main([str(path), "-o", str(out)]) == 0
    assert out.read_text().rstrip("\n") == text.rstrip("\n")


def test_quick_and_interrupted_runs_say_so():
    data = _data([OP_E10], quick=True, interrupted=True)
    for text in (render(data), summary(data)):
        assert "QUICK smoke run" in text and "INTERRUPTED" in text
    assert "QUICK" not in summary(_data([OP_E10]))


def test_readme_block_is_filled_from_the_json(tmp_path):
    data = _data([OP_E10, OP_E256, OP_E64_BF16, _op("E10_r4", 10, 1, [1.0] * 3, [1.2] * 3), MODEL, PROTO])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- speed-table -->\nold numbers\n<!-- /speed-table -->\n\n## after\n")
    assert main([str(path), "-o", str(tmp_path / "R.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("<!-- /speed-table -->\n\n## after\n")
    assert "Measured by `make bench` on AMD EPYC (2 cores; torch sees AVX2, the kernel runs avx2)" in text
    assert "load average 3.5 at the start" in text and "over 3 interleaved rounds" in text
    # The op matrix: one row per module and library, one column per dtype and T; missed cells carry the mark.
    assert "| op: ours × base | fp32 T=1 | fp32 T=512 | bf16 T=1 | bf16 T=512 | target |" in text
    assert "| qkv_proj E10_r4 | 1.20 (1.20–1.20) ✗ | 1.03 (1.02–1.10) |  |  | ≤ 1.05× base |" in text
    assert "| qkv_proj E256_r16 |  | 1.08 (1.07–1.09) |  |  | ≤ 1.10× base |" in text
    assert "| qkv_proj E64_r8 |  |  | 1.06 (1.04–1.07) ✗ |  | ≤ 1.05× base |" in text
    assert f"| {MODEL['case']} | 1.12 (1.05–1.15) | 0.747 (0.700–0.767) |  | ≤ 1.10× base: missed |" in text
    assert f"| {PROTO['case']} |  | 0.040 (0.025–0.050) | 0.267 (0.167–0.333) |" in text


def test_readme_needs_the_interleaved_json(tmp_path):
    rows = {"benchmarks": [{"group": "gpu op x", "name": "x", "extra_info": {"impl": "base"}, "stats": {"median": 1}}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="interleaved"):
        main([str(path), "-o", str(tmp_path / "R.md"), "--readme", str(tmp_path / "README.md")])


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
    assert text.startswith("# Benchmark results (CPU)") and text.count(EVAL_BEGIN) == 1
    assert f"{EVAL_BEGIN}\n## eval\n\n| a | b |\n{EVAL_END}" in text
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
    assert f"{VLLM_BEGIN}\n## vLLM\n\n| a | b |\n{VLLM_END}" in text
