"""benchmarks/gpu_check.sh in its dry run (any machine): the stage budgets bound the whole run under 7 minutes, the
run is offline, every stage is planned with the commands the real run uses (and those commands' flags are accepted),
and the summary and exit status report failures, budgets cut short and interrupted benchmarks as specified."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["preflight", "install", "tests", "bench", "model", "costmodel", "extension", "results"]


def dry_run(tmp_path: Path, fake: str = "") -> tuple[int, str, str]:
    """(exit status, output, summary.txt) of a dry run writing to tmp_path."""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "GKF_GPU_CHECK_DRY_RUN": "1", "GKF_GPU_CHECK_FAKE": fake}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    return proc.returncode, proc.stdout + proc.stderr, summary


def _status(summary: str) -> dict[str, tuple[str, int]]:
    """stage → (status, budget) from the summary table."""
    out = {}
    for line in summary.splitlines():
        cols = line.split()
        if cols and cols[0] in STAGES:
            out[cols[0]] = (cols[1], int(cols[3]))
    return out


def test_budgets_bound_the_run_under_seven_minutes(tmp_path):
    rc, out, summary = dry_run(tmp_path)
    assert rc == 0, out
    budgets = dict(re.findall(r"(\w+)=(\d+)s", out.splitlines()[0]))
    grace = int(re.search(r"\+(\d+)s grace each", out).group(1))
    bound = int(re.search(r"bound: (\d+) s of (\d+) s", out).group(1))
    limit = int(re.search(r"bound: \d+ s of (\d+) s", out).group(1))
    assert list(budgets) == STAGES
    assert bound == sum(int(b) for b in budgets.values()) + grace * len(STAGES)
    assert bound <= limit == 420
    assert {s: b for s, (_, b) in _status(summary).items()} == {s: int(b) for s, b in budgets.items()}
    assert all(status == "ok" for status, _ in _status(summary).values())


def test_offline_and_every_stage_planned(tmp_path):
    _, out, _ = dry_run(tmp_path)
    assert "HF_HUB_OFFLINE=1" in out and "TRANSFORMERS_OFFLINE=1" in out
    planned = re.findall(r"\[dry run\] (\w+) \((\d+) s\)", out)
    assert [s for s, _ in planned] == STAGES
    assert "--no-index" in out and "--no-deps" in out, "the install must not reach a package index"
    # The extension is built after every JIT-compiling stage, for this GPU only.
    assert planned.index(("extension", "70")) > planned.index(("model", "50"))
    assert "TORCH_CUDA_ARCH_LIST=" in out


def test_planned_commands_take_their_flags(tmp_path, capsys):
    """The benchmark and cost-model command lines of the plan parse with the scripts' own argument parsers."""
    from benchmarks import bench_gpu, gpu_model

    _, out, _ = dry_run(tmp_path)
    for stage in ("bench", "model"):
        line = next(ln for ln in out.splitlines() if f"[dry run] {stage} " in ln)
        argv = shlex.split(line.split("benchmarks.bench_gpu", 1)[1])
        args = bench_gpu.parse_args(argv)
        assert args.quick and (args.no_model if stage == "bench" else args.model_only)
    line = next(ln for ln in out.splitlines() if "[dry run] costmodel " in ln)
    argv = shlex.split(line.split("benchmarks.gpu_model", 1)[1].split(">")[0])
    argv[argv.index("--json") + 1] = str(tmp_path / "model.json")
    assert gpu_model.main(argv) == 0
    assert json.loads((tmp_path / "model.json").read_text())["table"]


def test_an_interrupted_benchmark_is_reported_not_failed(tmp_path):
    rows = [{"group": g, "name": f"{g}[base]", "extra_info": {}, "stats": {"median": 1e-5}} for g in ("a", "b")]
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"interrupted": True, "benchmarks": rows}))
    rc, out, summary = dry_run(tmp_path, "bench=124")
    assert rc == 0, out
    status = _status(summary)
    assert status["bench"][0] == "interrupted" and status["results"][0] == "ok"
    assert "2 cases in bench_gpu.json (interrupted)" in summary


@pytest.mark.parametrize(("fake", "rc", "stage", "status"), [
    ("tests=1", 1, "tests", "failed(1)"),
    ("tests=124", 3, "tests", "interrupted"),
    ("extension=137", 3, "extension", "interrupted"),
    ("costmodel=1,bench=124", 1, "costmodel", "failed(1)"),
])  # fmt: skip
def test_exit_status(tmp_path, fake, rc, stage, status):
    got, out, summary = dry_run(tmp_path, fake)
    assert got == rc, out
    assert _status(summary)[stage][0] == status
    assert f"exit status {rc}" in summary


def test_a_failed_preflight_runs_nothing(tmp_path):
    rc, out, summary = dry_run(tmp_path, "preflight=2")
    assert rc == 2
    assert "preflight failed: nothing else runs" in out
    assert "[dry run] install" not in out and summary == ""
