"""Interleaved timing: the implementations of one case run alternately, round after round, inside one measurement.

A ratio taken from two separate measurements moves with whatever else the machine did in between (±8 % between runs
here when base and ours were separate pytest-benchmark cases). Here every round times one block of each
implementation back to back, the order flipping every round (so neither side always runs first), and a ratio is
taken per round from the blocks of that round; the reported ratio is the median over rounds, with its spread.

A *run* is a callable that times one block itself and returns seconds per call (so a run can do untimed set-up
first, e.g. the prompt of a decode); :func:`block` makes one from a plain function.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

Run = Callable[[], float]


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


def interleave(runs: dict[str, Run], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each run, one value per round; the order of the runs flips every round.

    ``warmup`` untimed rounds come first (caches, allocator, lazily built state).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            out[name].append(runs[name]())
    return out


def ratio_stats(times: dict[str, list[float]], impl: str, ref: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ``times[impl][i] / times[ref][i]``: a ratio per round, never across rounds."""
    num, den = times[impl], times[ref]
    if len(num) != len(den) or not num:
        raise ValueError(f"{impl!r} and {ref!r} need the same non-zero number of rounds, got {len(num)} and {len(den)}")
    ratios = [n / d for n, d in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


__all__ = ["Run", "block", "calls_for", "interleave", "ratio_stats"]
