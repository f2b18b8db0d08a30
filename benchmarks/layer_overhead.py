"""Per-call cost of one patched layer of a small model against the same layer unpatched: what Python adds.

The demo's hidden-256 Phi-3 ("small"), 6 task + 3 general adapters of rank 8 with GenKnowSub, top-k 3; one target
module (layer 0's ``qkv_proj``, 256 -> 768) called as a module, at T = 1 (decode) and T = 16. At this size the routed
work is a few microseconds, so what the patched forward and the runner do in Python per call is most of the added
time. Base and patched blocks alternate inside one measurement (the model is patched for each patched block, and
unpatched for each base block), and the added time is taken per round.

    python -m benchmarks.layer_overhead [--module qkv_proj] [--repeats 7] [--block-s 0.2]

``make bench`` runs these cases, and the whole hidden-256 model's prefill / decode, through ``benchmarks.bench_cpu``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator

import torch

from benchmarks.cpu_model import ModelSet, patched_run
from benchmarks.interleave import block, calls_for, interleave

SIZE, TASKS, GENERAL, RANK = "small", 6, 3, 8  # the demo's defaults
TOKENS = (1, 16)


def run_cases(
    ms: ModelSet,
    module: str = "qkv_proj",
    tokens: tuple[int, ...] = TOKENS,
    repeats: int = 7,
    block_s: float = 0.2,
    progress: Callable[[str], None] = print,
) -> Iterator[dict]:
    """Base and patched calls of layer 0's ``module`` at each T (float32), as JSON rows (yielded as measured)."""
    model = ms.models["float32"]
    path = next(p for p in ms.library.modules if ".layers.0." in p and p.endswith(f".{module}"))
    layer = dict(model.named_modules())[path]
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, layer.in_features, generator=torch.Generator().manual_seed(1))
            calls = calls_for(lambda x=x: layer(x), block_s)
            runs = {
                "base": block(lambda x=x: layer(x), calls),
                "ours": patched_run(model, ms.library, block(lambda x=x: layer(x), calls)),
            }
            times = interleave(runs, repeats, warmup=1)
            added = [(o - b) * 1e6 for o, b in zip(times["ours"], times["base"])]
            name = f"layer {module} {layer.in_features}->{layer.out_features} T={t} float32 ({ms.description})"
            info = dict(module=path, tokens=t, dtype="float32", added_us=statistics.median(added),
                        added_us_min=min(added), added_us_max=max(added))  # fmt: skip
            progress(
                f"{name}: base {statistics.median(times['base']) * 1e6:.1f} µs, ours "
                f"{statistics.median(times['ours']) * 1e6:.1f} µs, added {statistics.median(added):.1f} µs "
                f"[{min(added):.1f}, {max(added):.1f}]"
            )
            yield dict(section="layer", case=name, times=times, calls={"base": calls, "ours": calls}, info=info)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="qkv_proj", choices=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-s", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ms = cpu_model.build(SIZE, TASKS, GENERAL, RANK, max(TOKENS), ["float32"], peft=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for _ in run_cases(ms, args.module, TOKENS, args.repeats, args.block_s):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
