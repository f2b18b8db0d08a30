"""Interleaved patched/base time ratios of the compiled CPU routed-LoRA op at Phi-3-mini shapes.

base = ``F.linear(x, W)`` in the model dtype; ours = the same ``F.linear`` followed by ``cpu_kernel.add_delta_`` (what
a patched layer does). Each repeat times a block of base calls and a block of our calls back to back (the order
alternates between repeats, so a drift in machine load hits both), and gives one ratio; the result is the median
ratio over the repeats and its spread (min, max).

    python benchmarks/cpu_kernel_ratios.py --shape qkv --dtype bfloat16 --experts 256 --rank 16 --tokens 1 512

``ratios(...)`` returns the same numbers for other scripts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genknowsub_fast.backends.packing import padded_rows  # noqa: E402

# (d_in, d_out) of Phi-3-mini's four LoRA target modules
SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}
TOP_K = 3


@dataclass
class Layer:
    """One module's experts in the layout the op reads (the fields of PackedExperts that cpu_kernel uses)."""

    prototypes: torch.Tensor  # (E, d_in) float32
    a: torch.Tensor  # (E, r, d_in)
    b_t: torch.Tensor  # (E, r, d_out), padded row stride
    weight: torch.Tensor  # (d_out, d_in): the base layer
    num_experts: int
    rank: int
    mixing: str = "output"

    @property
    def d_in(self) -> int:
        return self.a.shape[2]

    @property
    def d_out(self) -> int:
        return self.b_t.shape[2]


def make_layer(shape: str, dtype: torch.dtype, experts: int, rank: int, seed: int = 0) -> Layer:
    """Random experts and base weight of a module of ``shape`` (a key of SHAPES)."""
    d_in, d_out = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(experts, d_in, generator=g), dim=1)
    a = (torch.randn(experts, rank, d_in, generator=g) / d_in**0.5).to(dtype)
    b_t = padded_rows((torch.randn(experts, rank, d_out, generator=g) / rank**0.5).to(dtype))
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    return Layer(protos, a, b_t, weight, experts, rank)


@dataclass
class Ratio:
    median: float
    low: float
    high: float
    base_ms: float  # median time of one base call
    ours_ms: float


def _block(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def ratios(
    shape: str, dtype: torch.dtype, experts: int, rank: int, tokens: int, repeats: int = 5, block_s: float = 0.3
) -> Ratio:
    """Median ours/base time ratio over ``repeats`` interleaved repeats of blocks of about ``block_s`` seconds."""
    from genknowsub_fast.backends import cpu_kernel

    if not cpu_kernel.available():
        raise RuntimeError("the compiled CPU kernel is not available")
    layer = make_layer(shape, dtype, experts, rank)
    x = torch.randn(tokens, layer.d_in, generator=torch.Generator().manual_seed(1)).to(dtype)

    def base():
        return F.linear(x, layer.weight)

    def ours():
        return cpu_kernel.add_delta_(F.linear(x, layer.weight), x, layer, TOP_K, 1.0)

    with torch.no_grad():
        base(), ours()  # warm-up
        n = max(1, int(block_s / max(_block(base, 1), 1e-6)))
        r, tb, to = [], [], []
        for i in range(repeats):
            if i % 2 == 0:
                b, o = _block(base, n), _block(ours, n)
            else:
                o, b = _block(ours, n), _block(base, n)
            r.append(o / b)
            tb.append(b)
            to.append(o)
    return Ratio(statistics.median(r), min(r), max(r), statistics.median(tb) * 1e3, statistics.median(to) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["qkv"])
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-s", type=float, default=0.3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, top_k {TOP_K}")
    for shape in args.shape:
        for dt in args.dtype:
            for t in args.tokens:
                res = ratios(shape, getattr(torch, dt), args.experts, args.rank, t, args.repeats, args.block_s)
                print(
                    f"{shape:8s} {dt:9s} E={args.experts:<4d} r={args.rank:<3d} T={t:<4d} ratio {res.median:.3f} "
                    f"[{res.low:.3f}, {res.high:.3f}]  base {res.base_ms:.3f} ms  ours {res.ours_ms:.3f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
