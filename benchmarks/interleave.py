"""Interleaved timing: the implementations of one case run alternately, round after round, inside one measurement.

A ratio taken from two separate measurements moves with whatever else the machine did in between (±8 % between runs
here when base and ours were separate pytest-benchmark cases). Here every round times one block of each
implementation back to back, the order flipping every round (so neither side always runs first), and a ratio is
taken per round from the blocks of that round; the reported ratio is the median over rounds, with its spread.

A *run* is a callable that times one block itself and returns seconds per call (so a run can do untimed set-up
first, e.g. the prompt of a decode); :func:`block` makes one from a plain function, :func:`cuda_block` from a batch
of GPU calls. :class:`Rounds` runs one interleaved round per call: ``pytest benchmarks/`` (benchmarks/conftest.py)
makes it the target of a pytest-benchmark measurement, so one benchmark round is one interleaved round.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

Run = Callable[[], float]
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """A progress line (shown by pytest with ``-s``): seconds since the start, the load average, ``msg``."""
    print(f"[{time.perf_counter() - _T0:6.1f} s, load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def block(fn: Callable[[], object], calls: int) -> Run:
    """A run of ``calls`` back-to-back calls of ``fn``, returning seconds per call."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls

    return run


def cuda_block(fn: Callable[[], object], calls: int) -> Run:
    """A run of ``fn`` on a CUDA device, timed with CUDA events around it; ``fn`` makes ``calls`` calls (seconds per
    call). The run waits for the device at its end, so the next block starts on an idle GPU."""
    import torch

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / calls

    return run


def calls_for(fn: Callable[[], object], block_s: float, max_calls: int = 100_000) -> int:
    """Calls of ``fn`` that fill about ``block_s`` seconds (at least 1), timed after one warm-up call.

    The warm-up call is timed too: when it alone lasts ``block_s`` the answer is 1 without another call (a slow
    implementation, e.g. PEFT's E=64 prototypes at seconds per call, is then not run twice for nothing).
    """
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 >= block_s:
        return 1
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one * 4 < block_s:  # short calls: time a few more for a steadier estimate
        n = max(2, min(max_calls, int(block_s / 4 / max(one, 1e-9))))
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        one = (time.perf_counter() - t0) / n
    return max(1, min(max_calls, round(block_s / max(one, 1e-9))))


class Rounds:
    """Interleaved rounds of ``runs``, one per call: each run times one block, the order flipping every round.

    ``times[name]`` holds seconds per call of every recorded round. A call with ``record=False`` is a warm-up round
    (caches, allocator, lazily built state): it runs every block and keeps nothing. An instance is the target of a
    pytest-benchmark ``pedantic`` run (one benchmark round = one interleaved round) as well as of :func:`interleave`.
    """

    def __init__(self, runs: dict[str, Run]):
        if not runs:
            raise ValueError("no runs to interleave")
        self.runs = dict(runs)
        self.times: dict[str, list[float]] = {name: [] for name in self.runs}
        self._round = 0

    def __call__(self, record: bool = True) -> None:
        names = list(self.runs)
        if not record:
            for name in names:
                self.runs[name]()
            return
        for name in names if self._round % 2 == 0 else reversed(names):
            self.times[name].append(self.runs[name]())
        self._round += 1


def interleave(runs: dict[str, Run], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each run, one value per round; the order of the runs flips every round.

    ``warmup`` untimed rounds come first (caches, allocator, lazily built state).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rounds = Rounds(runs)
    for _ in range(warmup):
        rounds(record=False)
    for _ in range(repeats):
        rounds()
    return rounds.times


def ratio_stats(times: dict[str, list[float]], impl: str, ref: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ``times[impl][i] / times[ref][i]``: a ratio per round, never across rounds."""
    num, den = times[impl], times[ref]
    if len(num) != len(den) or not num:
        raise ValueError(f"{impl!r} and {ref!r} need the same non-zero number of rounds, got {len(num)} and {len(den)}")
    ratios = [n / d for n, d in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


__all__ = ["Run", "Rounds", "progress", "block", "cuda_block", "calls_for", "interleave", "ratio_stats"]
