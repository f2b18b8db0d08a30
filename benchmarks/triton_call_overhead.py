"""Per-call host overhead of the Triton path, without a GPU: the launches are recorded, not run.

    TRITON_INTERPRET=1 python -m benchmarks.triton_call_overhead      # from the repository root

Times ``TritonLayer.__call__`` (the prepared layer: plan lookup, workspace allocations, the launch calls up to the
kernel) on small CPU tensors in delta-only calls, with ``triton_kernels.launch.recording()`` active so no kernel runs:
what remains is the Python and torch work of a call, which on a GPU is paid on top of Triton's own launch cost
(not included). Median and spread over repeated runs of 300 calls.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from genknowsub_fast.triton_kernels import launch  # noqa: E402

from genknowsub_fast.backends import triton_ops  # noqa: E402
from genknowsub_fast.backends.packing import pack_experts  # noqa: E402
from genknowsub_fast.options import RoutingOptions  # noqa: E402


def measure(t: int, repeats: int = 9, calls: int = 300) -> tuple[list[float], int]:
    """(per-call µs of each repeat, launches per call) for a delta-only call of T tokens, E=10 r=4, fp32."""
    g = torch.Generator().manual_seed(0)
    e, r, d_in, d_out = 10, 4, 64, 96
    packed = pack_experts(
        torch.randn(e, r, d_in, generator=g), torch.randn(e, d_out, r, generator=g), torch.ones(e),
        torch.randn(e, d_in, generator=g),
    )  # fmt: skip
    layer = triton_ops.prepare(packed, RoutingOptions(3))
    x = torch.randn(t, d_in, generator=g)
    out = []
    for _ in range(repeats):
        with launch.recording() as rec:
            t0 = time.perf_counter()
            for _ in range(calls):
                layer(x)
            out.append((time.perf_counter() - t0) / calls * 1e6)
    return out, len(rec) // calls


def main() -> int:
    for t in (1, 256):
        us, n = measure(t)
        med, lo, hi = statistics.median(us), min(us), max(us)
        print(f"T={t}: {n} launches/call, {med:.1f} µs per call (min {lo:.1f}, max {hi:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
