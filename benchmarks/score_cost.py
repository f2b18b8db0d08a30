"""How much of a bf16 patched layer's time goes to the float32 routing scores.

A patched bf16 nn.Linear (Phi-3-mini shapes, random experts) is timed whole, and beside it, in the same loop, the
score computation it does (``x`` converted to float32, ``x · Pᵀ`` against the float32 prototypes) and the bf16 score
product it replaces (``x · P_bf16ᵀ`` in bf16). Rounds interleave the three; the table gives medians over rounds and
the interquartile range of the ratio.

    python benchmarks/score_cost.py [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {"o_proj": (3072, 3072), "qkv_proj": (3072, 9216)}
EXPERTS = ((10, 4), (64, 8))
TOKENS = (1, 128)


def _library(d_in: int, d_out: int, e: int, r: int):
    from genknowsub_fast import LoraLibrary
    from genknowsub_fast.experts import ModuleExperts
    from genknowsub_fast.ops import arrow_prototypes

    g = torch.Generator().manual_seed(0)
    a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g) / r**0.5
    experts = ModuleExperts(a, b, torch.full((e,), 2.0), arrow_prototypes(a, b), torch.full((e,), r))
    return LoraLibrary({"proj": experts}, [f"e{i}" for i in range(e)])


class _One(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(rounds: int) -> Iterator[dict]:
    """One row per (shape, experts, T), yielded as soon as it is measured."""
    import genknowsub_fast as gkf
    from genknowsub_fast.backends import torch_ops

    for name, (d_in, d_out) in SHAPES.items():
        for e, r in EXPERTS:
            model = _One(d_in, d_out).to(torch.bfloat16).eval()
            gkf.patch_model(model, _library(d_in, d_out, e, r), top_k=3)
            layer = gkf.patched_layers(model)["proj"]
            p32 = layer.runner.packed.prototypes
            p16 = p32.to(torch.bfloat16)
            for t in TOKENS:
                x = torch.randn(t, d_in, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
                reps = max(3, 400 // t)
                lay, s32, s16 = [], [], []
                with torch.no_grad():
                    for _ in range(rounds):
                        lay.append(_time(lambda x=x, lin=model.proj: lin(x), reps))
                        s32.append(_time(lambda x=x, p=p32: torch_ops.route_scores(x, p), reps))
                        s16.append(_time(lambda x=x, p=p16: F.linear(x, p), reps))
                frac = [a / b for a, b in zip(s32, lay, strict=True)]
                extra = [(a - c) / b for a, b, c in zip(s32, lay, s16, strict=True)]
                q = statistics.quantiles(frac, n=4)
                yield {
                    "shape": f"{name} {d_in}->{d_out}",
                    "experts": f"E{e} r{r}",
                    "T": t,
                    "layer_us": statistics.median(lay) * 1e6,
                    "scores_fp32_us": statistics.median(s32) * 1e6,
                    "scores_bf16_us": statistics.median(s16) * 1e6,
                    "fp32_scores_share": statistics.median(frac),
                    "share_q1": q[0],
                    "share_q3": q[2],
                    "fp32_over_bf16_extra_share": statistics.median(extra),
                }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds, bf16 layer, top_k=3")
    print("| shape | experts | T | layer µs | fp32 scores µs | bf16 scores µs | fp32 scores / layer (IQR) | "
          "fp32 − bf16 scores / layer |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for row in measure(args.rounds):
        print(
            f"| {row['shape']} | {row['experts']} | {row['T']} | {row['layer_us']:.0f} | {row['scores_fp32_us']:.1f} | "
            f"{row['scores_bf16_us']:.1f} | {row['fp32_scores_share']:.3f} "
            f"({row['share_q1']:.3f}-{row['share_q3']:.3f}) | {row['fp32_over_bf16_extra_share']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
