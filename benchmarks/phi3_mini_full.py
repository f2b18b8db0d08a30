"""A random full-size Phi-3-mini (32 layers) in bfloat16, patched with E = 10 rank-4 experts (+ 1 general adapter,
GKS) on all four target modules: prefill and decode, base and patched interleaved per round.

The model is built on the meta device and materialised on the CPU (7.6 GB in bfloat16), so that it fits where a
float32 build would not. Run (about 2 minutes on 2 cores, 9 GB of memory):

    python -m benchmarks.phi3_mini_full --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import genknowsub_fast as gkf
from benchmarks import scale
from benchmarks.cpu_model import decode_run, patched_run
from benchmarks.interleave import block, interleave, ratio_stats
from benchmarks.machine import describe


def materialised_phi3_mini(layers: int = 32, seed: int = 0) -> torch.nn.Module:
    """Phi-3-mini with random weights (std 0.02; norms 1, biases 0) in bfloat16, built on the meta device first."""
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(scale.phi3_mini_config(layers)).to(torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
        rotary = model.model.rotary_emb  # its buffers were left uninitialised by to_empty
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, general = scale.write_adapters(tmp, 32, experts=10, general=1, rank=4, progress=lambda *a, **k: None)
        library = gkf.LoraLibrary.from_adapters(task, general, progress=False)
    model = materialised_phi3_mini()
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(describe(), flush=True)
    with torch.no_grad():
        for name, make in (
            (f"prefill T={args.prompt}", lambda: block(lambda: model(ids), 1)),
            (f"decode {args.steps} tokens (per token)", lambda: decode_run(model, ids, args.steps)),
        ):
            times = interleave({"base": make(), "ours": patched_run(model, library, make())}, args.rounds)
            med, lo, hi = ratio_stats(times, "ours", "base")
            base = statistics.median(times["base"]) * 1e3
            print(f"{name}: ours/base median {med:.3f} [{lo:.3f}, {hi:.3f}], base {base:.1f} ms ({args.rounds} rounds)")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
