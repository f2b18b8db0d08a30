"""Per-call cost of one patched layer of a small model, against the same layer unpatched: what Python adds.

A hidden-256 Phi-3 (the demo's "small" size), 6 task + 3 general adapters of rank 8 with GenKnowSub, top-k 3; one
target module called directly at T = 1 (decode) and T = 16. Base and patched calls are interleaved in the same loop
(patching the module, timing a block of calls, unpatching, timing a block of calls, ...), so machine noise hits both
alike; each repeat gives a median per-call time of each, and the report is the median over repeats with the spread.

    python benchmarks/layer_overhead.py [--module qkv_proj] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def _per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(module_kind: str = "qkv_proj", tokens: int = 1, repeats: int = 7, calls: int = 2000) -> dict:
    """Median per-call µs of the base and patched layer (interleaved), their difference and the spread."""
    import genknowsub_fast as gkf
    from genknowsub_fast.synthetic import make_phi3, write_adapters

    torch.manual_seed(0)
    model = make_phi3("small")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(model, d, 6, 3, rank=8)
        lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
    path = next(p for p in lib.modules if p.endswith(module_kind))
    layer = dict(model.named_modules())[path]
    x = torch.randn(1, tokens, layer.in_features)
    base_us, ours_us = [], []
    with torch.no_grad():
        for _ in range(repeats):
            base_us.append(1e6 * _per_call(lambda: layer(x), calls))
            with gkf.patched(model, lib, top_k=3):
                layer(x)  # first call may pack
                ours_us.append(1e6 * _per_call(lambda: layer(x), calls))
    diffs = [o - b for o, b in zip(ours_us, base_us)]
    return {
        "module": path,
        "tokens": tokens,
        "base_us": statistics.median(base_us),
        "ours_us": statistics.median(ours_us),
        "added_us": statistics.median(diffs),
        "added_us_spread": (min(diffs), max(diffs)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="qkv_proj")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for t in (1, 16):
        r = measure(args.module, t, args.repeats, args.calls)
        lo, hi = r["added_us_spread"]
        print(
            f"{r['module']} T={t}: base {r['base_us']:.1f} µs, patched {r['ours_us']:.1f} µs, "
            f"added {r['added_us']:.1f} µs (spread {lo:.1f}..{hi:.1f}; {args.repeats} repeats × {args.calls} calls, "
            f"torch {r['torch']}, {r['threads']} threads)"
        )


if __name__ == "__main__":
    main()
