"""RESULTS.md is computed from the JSON: ratios per group, and the target verdicts."""

import json

from benchmarks.write_results import main, render


def _bench(group, impl, median):
    return {"group": group, "name": f"test[{impl}]", "extra_info": {"impl": impl}, "stats": {"median": median}}


def test_ratios_and_verdicts(tmp_path):
    data = {
        "datetime": "2026-11-24T00:00:00",
        "benchmarks": [
            _bench("op qkv_proj 3072->9216 E10_r4 T=512", "base", 0.200),
            _bench("op qkv_proj 3072->9216 E10_r4 T=512", "peft", 0.400),
            _bench("op qkv_proj 3072->9216 E10_r4 T=512", "ours", 0.205),
            _bench("model decode 32 tokens", "base", 0.100),
            _bench("model decode 32 tokens", "ours", 0.125),
        ],
    }
    text = render(data, "cmd")
    assert "| op qkv_proj 3072->9216 E10_r4 T=512 | ours | 205.00 ms | 1.025 | 0.512 | ≤ 1.05× base: met |" in text
    assert "| model decode 32 tokens | ours | 125.00 ms | 1.250 |  | ≤ 1.10× base: missed |" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main([str(path), "-o", str(out)]) == 0
    written = out.read_text()
    assert "- command: `pytest benchmarks/ --benchmark-only" in written
    assert written.split("| case |")[1] == text.split("| case |")[1]


def test_readme_block_is_filled_from_the_json(tmp_path):
    data = {
        "datetime": "2026-11-24T00:00:00",
        "benchmarks": [
            _bench("prototypes phi3-mini E10_r4 1280 problems", "peft", 0.800),
            _bench("prototypes phi3-mini E10_r4 1280 problems", "torch", 0.130),
            _bench("prototypes phi3-mini E10_r4 1280 problems", "ours", 0.020),
            _bench("model prefill T=512", "base", 0.300),
            _bench("model prefill T=512", "ours", 0.321),
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- speed-table -->\nold numbers\n<!-- /speed-table -->\n\n## after\n")
    assert main([str(path), "-o", str(tmp_path / "R.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("<!-- /speed-table -->\n\n## after\n")
    assert "| model prefill T=512 | 1.07 |  | ≤ 1.10× base: met |" in text
    assert "| prototypes phi3-mini E10_r4 1280 problems |  | 0.025 | ≤ 0.05× peft: met; ≤ 0.33× torch: met |" in text


def test_readme_without_markers_is_an_error(tmp_path):
    import pytest

    from benchmarks.write_results import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="speed-table"):
        update_readme(str(readme), "table")


def test_the_eval_compare_block_survives_a_rewrite(tmp_path):
    from benchmarks.write_results import EVAL_BEGIN, EVAL_END, replace_block

    out = tmp_path / "RESULTS.md"
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval\n\n| a | b |", append=True)  # created
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"datetime": "x", "benchmarks": [_bench("model decode 32 tokens", "base", 0.1)]}))
    assert main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmark results") and text.count(EVAL_BEGIN) == 1
    assert f"{EVAL_BEGIN}\n## eval\n\n| a | b |\n{EVAL_END}" in text
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval\n\nnew", append=True)  # replaced in place
    assert out.read_text().count(EVAL_BEGIN) == 1 and "new" in out.read_text() and "| a | b |" not in out.read_text()


def test_the_vllm_block_survives_a_rewrite_too(tmp_path):
    from benchmarks.write_results import EVAL_BEGIN, EVAL_END, VLLM_BEGIN, VLLM_END, replace_block

    out = tmp_path / "RESULTS.md"
    replace_block(str(out), EVAL_BEGIN, EVAL_END, "## eval", append=True)
    replace_block(str(out), VLLM_BEGIN, VLLM_END, "## vLLM\n\n| a | b |", append=True)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"datetime": "x", "benchmarks": [_bench("model decode 32 tokens", "base", 0.1)]}))
    assert main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(EVAL_BEGIN) == 1 and text.count(VLLM_BEGIN) == 1
    assert f"{VLLM_BEGIN}\n## vLLM\n\n| a | b |\n{VLLM_END}" in text
