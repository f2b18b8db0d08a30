"""pytest-benchmark set-up of ``pytest benchmarks/ --benchmark-only``: interleaved cases, and what the JSON records.

Every case runs its implementations (base, ours, PEFT where it applies, ...) alternately inside ONE benchmark: the
benchmark's target is one interleaved round (:class:`benchmarks.interleave.Rounds`), so pytest-benchmark's own stats
time a whole round, and each implementation's seconds per call in every round go to ``extra_info["times"]``, with
the per-round ratios (``extra_info["ratios"]``: ``"ours/base"``, ``"ours/peft"``, ``"peft/ours"``, ... as median, min,
max) and the targets met or missed. ``--benchmark-json`` alone thus answers "how much slower than the base, how much
faster than PEFT", and ``benchmarks/write_results.py`` turns it into RESULTS.md and the README table.

The JSON also records the machine (``machine_info["genknowsub_fast"]``: CPU, AVX-512 / AVX-512-BF16 visible, torch's
capability, the routed kernel's ISA, GPU, versions) and the run (``"genknowsub_fast"``: command, rounds, the subset
selected with ``-m`` / ``-k``, when it started, load average before and after, pytest's exit status).

Options: ``--interleaved-rounds N`` (default 5, at least 3). ``GKF_BENCH_THREADS`` sets torch's threads (default:
min(2, cores)). Markers: ``quick`` (a subset that runs in about 3 minutes: ``-m quick``), ``gpu`` (needs CUDA).
"""

from __future__ import annotations

import datetime
import os
import shlex
import time

import pytest
import torch

from benchmarks import machine, report
from benchmarks.interleave import Rounds, Run, progress

_T0 = time.perf_counter()
# pytest-benchmark's own "datetime" is when it writes the JSON, at the end of the run.
_STARTED = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
_LOAD_START = os.getloadavg()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--interleaved-rounds", type=int, default=5, help="interleaved rounds per case (at least 3)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--interleaved-rounds") < 3:
        raise pytest.UsageError("--interleaved-rounds must be at least 3: a median and a spread need rounds")
    torch.set_num_threads(int(os.environ.get("GKF_BENCH_THREADS", min(2, os.cpu_count() or 1))))
    config._gkf_exitstatus = None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    # pytest-benchmark writes its JSON in its own wrapper of this hook, before the plain hooks run: this outer wrapper
    # runs first, so the JSON can say whether the run was complete.
    session.config._gkf_exitstatus = int(exitstatus)
    yield


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["genknowsub_fast"] = {"machine": machine.machine(), "versions": machine.versions()}


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    opt = config.option
    selection = " ".join(f"{flag} {shlex.quote(v)}" for flag, v in (("-m", opt.markexpr), ("-k", opt.keyword)) if v)
    output_json["genknowsub_fast"] = {
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "rounds": config.getoption("--interleaved-rounds"),
        "selection": selection,
        "started": _STARTED,
        "elapsed_s": round(time.perf_counter() - _T0, 1),
        "loadavg_start": [round(v, 2) for v in _LOAD_START],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "exitstatus": config._gkf_exitstatus,
    }


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    """Interleaved rounds per case (``--interleaved-rounds``)."""
    return request.config.getoption("--interleaved-rounds")


@pytest.fixture
def interleaved(benchmark, rounds: int):
    """``run(runs, section=, case=, info=, calls=, isa=, warmup=1, min_rounds=0)``: one interleaved benchmark.

    ``runs`` maps implementation names to :data:`~benchmarks.interleave.Run` callables (each times one block and
    returns seconds per call). After ``warmup`` untimed rounds, pytest-benchmark times ``max(rounds, min_rounds)``
    interleaved rounds; the case's record goes to ``benchmark.extra_info`` and is returned.
    """

    def run(
        runs: dict[str, Run],
        *,
        section: str,
        case: str,
        info: dict,
        calls: dict[str, int],
        isa: str | None = None,
        warmup: int = 1,
        min_rounds: int = 0,
    ) -> dict:
        target = Rounds(runs)
        for _ in range(warmup):
            target(record=False)
        benchmark.group = section
        benchmark.pedantic(target, rounds=max(rounds, min_rounds), iterations=1, warmup_rounds=0)
        record = {
            "section": section,
            "case": case,
            "isa": isa or machine.kernel_isa(),
            "times": target.times,
            "calls": calls,
            "info": info,
        }
        record["ratios"] = report.ratios(record)
        record["targets"] = [{"target": name, "met": ok} for name, ok in report.verdicts(record)]
        benchmark.extra_info.update(record)
        progress(_line(record))
        return record

    return run


def _line(record: dict) -> str:
    r = "; ".join(f"{k} {v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for k, v in record["ratios"].items())
    return f"{record['case']} ({record['isa']}): {r}"
