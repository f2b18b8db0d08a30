"""Per-call cost of ``ops.arrow_prototypes`` on one module against the cost of reading its inputs.

Three timings, interleaved over the repeats (medians, ms):
- read: one pass over A and B (``torch.sum`` of each), the floor of any exact method;
- with_check: the separate finite check that ops.arrow_prototypes ran before (``isfinite(t).all()`` of A and B) plus
  the call, i.e. the previous cost;
- call: ``ops.arrow_prototypes`` as it is now (on the CPU with the extension, the NaN/Inf check happens in its pass).

    python benchmarks/cpu_prototypes_call.py --rank 4 8 [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genknowsub_fast import ops  # noqa: E402


def _ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def call_costs(
    experts: int = 10, rank: int = 4, d_in: int = 3072, d_out: int = 9216, repeats: int = 7, n: int = 20
) -> dict[str, float]:
    """Median ms per call of read / with_check / call (see the module docstring) and the ratio call / read."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(experts, rank, d_in, generator=g)
    b = torch.randn(experts, d_out, rank, generator=g)

    def read():
        a.sum()
        b.sum()

    def with_check():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError("not finite")
        ops.arrow_prototypes(a, b, warn_zero=False)

    def call():
        ops.arrow_prototypes(a, b, warn_zero=False)

    fns = {"read": read, "with_check": with_check, "call": call}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(reversed(fns))
        for k in order:
            times[k].append(_ms(fns[k], n))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["call/read"] = out["call"] / out["read"]
    out["with_check/read"] = out["with_check"] / out["read"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in args.rank:
        res = call_costs(args.experts, r, repeats=args.repeats)
        print(f"E={args.experts} r={r} 3072->9216: " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
