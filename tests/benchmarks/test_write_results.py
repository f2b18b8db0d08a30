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
