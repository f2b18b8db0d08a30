"""Per-call cost of one patched layer of a small model against the same layer unpatched: what Python adds.

The demo's hidden-256 Phi-3 ("small"), 6 task + 3 general adapters of rank 8 with GenKnowSub, top-k 3; one target
module (layer 0's ``qkv_proj``, 256 -> 768) called as a module, at T = 1 (decode) and T = 16. At this size the routed
work is a few microseconds, so what the patched forward and the runner do in Python per call is most of the added
time. Base and patched blocks alternate inside one measurement (the model is patched for each patched block, and
unpatched for each base block), and the added time is taken per round.

    python -m benchmarks.layer_overhead [--module qkv_proj] [--repeats 7] [--block-s 0.2]

``make bench`` runs these cases, and the whole hidden-256 model's prefill / decode, as ``benchmarks/test_model.py``'s
``test_cpu_layer`` and ``test_cpu_small_model``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.cpu_model import ModelSet, patched_run
from benchmarks.interleave import block, calls_for, interleave

SIZE, TASKS, GENERAL, RANK = "small", 6, 3, 8  # the demo's defaults
TOKENS = (1, 16)


def case(ms: ModelSet, module: str, tokens: int, block_s: float) -> dict:
    """Base and patched calls of layer 0's ``module`` at T = ``tokens`` (float32): the runs, calls per block, the case
    name and its JSON fields, for the ``interleaved`` fixture of benchmarks/conftest.py (or :func:`interleave`)."""
    model = ms.models["float32"]
    path = next(p for p in ms.library.modules if ".layers.0." in p and p.endswith(f".{module}"))
    layer = dict(model.named_modules())[path]
    x = torch.randn(1, tokens, layer.in_features, generator=torch.Generator().manual_seed(1))

    def call() -> None:
        with torch.no_grad():
            layer(x)

    calls = calls_for(call, block_s)
    runs = {"base": block(call, calls), "ours": patched_run(model, ms.library, block(call, calls))}
    name = f"layer {module} {layer.in_features}->{layer.out_features} T={tokens} float32 ({ms.description})"
    return dict(runs=runs, calls=dict.fromkeys(runs, calls), name=name,
                info=dict(module=path, tokens=tokens, dtype="float32"))  # fmt: skip


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
    for t in TOKENS:
        c = case(ms, args.module, t, args.block_s)
        times = interleave(c["runs"], args.repeats, warmup=1)
        added = [(o - b) * 1e6 for o, b in zip(times["ours"], times["base"])]
        print(
            f"{c['name']}: base {statistics.median(times['base']) * 1e6:.1f} µs, ours "
            f"{statistics.median(times['ours']) * 1e6:.1f} µs, added {statistics.median(added):.1f} µs "
            f"[{min(added):.1f}, {max(added):.1f}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
