"""``pytest benchmarks/`` (pytest-benchmark) collects every section's cases and a quick subset of each; one real case
runs through pytest-benchmark into a JSON that holds its interleaved rounds, ratios and machine, and write_results.py
turns that JSON into RESULTS.md. Plain ``pytest`` (testpaths = tests) never collects benchmarks/ itself."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.write_results import main as write_results

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (it is in the [test] extra)")


def _pytest(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _collected(*args: str) -> list[str]:
    proc = _pytest("benchmarks/", "--collect-only", "-q", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_every_section_is_collected_and_the_quick_subset_covers_each():
    full = _collected()
    quick = _collected("-m", "quick")
    tests = ("test_cpu_op[", "test_cpu_model[", "test_cpu_prototypes[", "test_scale_build[", "test_scale_load[",
             "test_gpu_op[", "test_gpu_model[")  # fmt: skip
    for name in tests:
        assert any(name in n for n in full), name
        assert any(name in n for n in quick), name
    assert sum("test_cpu_op[" in n for n in full) == 64  # 4 modules × 4 libraries × 2 dtypes × 2 T
    for case in ("prefill-float32", "prefill-bfloat16", "decode-float32", "decode-bfloat16"):
        assert any(f"test_cpu_model[{case}]" in n for n in full), case
    assert any("test_cpu_model[prefill-" in n for n in quick) and any("test_cpu_model[decode-" in n for n in quick)
    assert set(quick) < set(full)


def test_plain_pytest_does_not_collect_benchmarks():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("benchmarks/")]


@pytest.mark.slow
def test_one_case_runs_through_pytest_benchmark_into_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = _pytest("benchmarks/test_model.py", "-k", "test_cpu_layer and not T16", "--benchmark-only",
                   "--interleaved-rounds", "3", f"--benchmark-json={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (bench,) = data["benchmarks"]
    info = bench["extra_info"]
    # One pytest-benchmark round is one interleaved round: 7 for the one-layer rows (at least 7, whatever is asked).
    assert bench["stats"]["rounds"] == 7 and len(info["times"]["base"]) == len(info["times"]["ours"]) == 7
    ratio = info["ratios"]["ours/base"]
    per_round = sorted(o / b for o, b in zip(info["times"]["ours"], info["times"]["base"]))
    assert ratio["median"] == pytest.approx(per_round[3]) and ratio["min"] == pytest.approx(per_round[0])
    machine = data["machine_info"]["genknowsub_fast"]["machine"]
    assert info["isa"] == machine["kernel_isa"] and {"avx512", "avx512_bf16", "cpu"} <= set(machine)
    assert data["genknowsub_fast"]["selection"] == "-k 'test_cpu_layer and not T16'"
    assert data["genknowsub_fast"]["exitstatus"] == 0
    started = datetime.datetime.fromisoformat(data["genknowsub_fast"]["started"])
    written = datetime.datetime.fromisoformat(data["datetime"])
    assert started <= written <= started + datetime.timedelta(seconds=data["genknowsub_fast"]["elapsed_s"] + 60)
    results = tmp_path / "RESULTS.md"
    assert write_results([str(out), "-o", str(results)]) == 0
    text = results.read_text()
    assert f"| {info['case']} | {info['isa']} |" in text and "SUBSET run (-k 'test_cpu_layer and not T16')" in text
