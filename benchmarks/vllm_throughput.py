"""Output tokens/s of vLLM serving Phi-3 + GenKnowSub/Arrow (make_llm) against vLLM serving the same Phi-3 alone.

Usage (in an environment with vLLM, e.g. ``make bench-vllm``, which runs it in .venv-vllm):

    python benchmarks/vllm_throughput.py [--repeats 7] [--results benchmarks/RESULTS.md] [--workdir DIR]

Both engines are built once and kept alive (small KV caches); each repeat times one ``generate`` of 16 prompts x 64
new tokens (greedy, EOS ignored) on each engine, in alternating order, and the ratio of that repeat is ours / base in
tokens per second. The median ratio and its spread over the repeats go into the ``vllm-throughput`` block of
benchmarks/RESULTS.md (``write_results.py`` keeps that block when it rewrites the file).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS, NEW_TOKENS = 16, 64
PROMPT_LENGTHS = (16, 64)  # each prompt's length is drawn in this range
NUM_EXPERTS, NUM_GENERAL, RANK, TOP_K = 10, 3, 8, 3
TARGET = 0.90  # the serving target: >= 0.90x base throughput
DTYPE = "bfloat16"
ENGINE_KWARGS = dict(
    dtype=DTYPE, skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=NUM_PROMPTS
)


def build(workdir: str) -> tuple[str, str, str]:
    """Save the bench-size random Phi-3 and a GKS library (10 task experts of rank 8, 3 general) under ``workdir``."""
    import genknowsub_fast as gkf
    from genknowsub_fast.synthetic import PHI3_SIZES, make_phi3, write_adapters

    model_dir, lib_path = os.path.join(workdir, "phi3-bench"), os.path.join(workdir, "lib.safetensors")
    hidden, inter, layers, heads, vocab = PHI3_SIZES["bench"]
    desc = f"Phi-3 hidden {hidden}, {layers} layers, {heads} heads, vocab {vocab}"
    if not os.path.exists(lib_path):
        print(f"building {desc} and its library in {workdir}", flush=True)
        model = make_phi3("bench")
        model.save_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad = write_adapters(model, os.path.join(workdir, "adapters"), NUM_EXPERTS, NUM_GENERAL, rank=RANK)
        gkf.LoraLibrary.from_adapters(ad.task, general_adapters=ad.general).save(lib_path)
    return model_dir, lib_path, desc


def prompts(vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lo, hi = PROMPT_LENGTHS
    lengths = torch.randint(lo, hi + 1, (NUM_PROMPTS,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def timed(llm, batch: list[list[int]]) -> tuple[float, list[list[int]]]:
    """(output tokens per second, the generated tokens) of one generate call over ``batch``."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return sum(map(len, tokens)) / dt, tokens


def measure(model_dir: str, lib_path: str, vocab: int, repeats: int) -> dict:
    import vllm
    from vllm import LLM

    from genknowsub_fast.vllm import make_llm

    batch = prompts(vocab)
    engines = {}
    try:
        engines["base"] = LLM(model_dir, **ENGINE_KWARGS)
        engines["ours"] = make_llm(model_dir, lib_path, top_k=TOP_K, **ENGINE_KWARGS)
        warm = {name: timed(llm, batch)[1] for name, llm in engines.items()}  # first calls: allocations, caches
        changed = sum(a != b for a, b in zip(warm["base"], warm["ours"], strict=True))
        rows = []
        for rep in range(repeats):
            order = ("base", "ours") if rep % 2 == 0 else ("ours", "base")
            tps = {name: timed(engines[name], batch)[0] for name in order}
            rows.append((tps["base"], tps["ours"], tps["ours"] / tps["base"]))
            print(
                f"repeat {rep + 1}/{repeats}: base {tps['base']:.1f} tok/s, ours {tps['ours']:.1f} tok/s, "
                f"ratio {rows[-1][2]:.3f}",
                flush=True,
            )
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    return {"rows": rows, "changed": changed, "vllm": vllm.__version__}


def render(result: dict, desc: str, command: str) -> str:
    import torch

    from benchmarks.machine import describe

    rows = result["rows"]
    ratios = [r[2] for r in rows]
    med = statistics.median(ratios)
    verdict = "met" if med >= TARGET else "missed"
    lines = [
        "## vLLM serving throughput (CPU)",
        "",
        f"Written by `benchmarks/vllm_throughput.py` (`make bench-vllm`); regenerate with `{command}`.",
        f"Output tokens/s of one `generate` of {NUM_PROMPTS} prompts ({PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens) "
        f"x {NEW_TOKENS} new tokens (greedy, EOS ignored), {DTYPE}: vLLM alone (base) against `make_llm` with a GKS "
        f"library of {NUM_EXPERTS} experts, rank {RANK}, top-{TOP_K} (ours), on {desc}. Both engines alive, "
        f"{len(rows)} repeats in alternating order; vLLM's default CPU thread binding.",
        "",
        f"- device: CPU: {describe()}; vLLM {result['vllm']}, torch {torch.__version__}",
        f"- run: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- routing changed the greedy output of {result['changed']}/{NUM_PROMPTS} prompts",
        "",
        "| repeat | base tok/s | ours tok/s | ours / base |",
        "|---:|---:|---:|---:|",
        *(f"| {i + 1} | {b:.1f} | {o:.1f} | {r:.3f} |" for i, (b, o, r) in enumerate(rows)),
        "",
        f"Median ratio **{med:.3f}** (min {min(ratios):.3f}, max {max(ratios):.3f}); target ≥ {TARGET:.2f}× base: "
        f"{verdict}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--workdir", help="where the model and library are saved (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from benchmarks.write_results import VLLM_BEGIN, VLLM_END, replace_block
    from genknowsub_fast.synthetic import PHI3_SIZES

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        model_dir, lib_path, desc = build(workdir)
        result = measure(model_dir, lib_path, PHI3_SIZES["bench"][4], args.repeats)
    block = render(result, desc, "make bench-vllm")
    replace_block(args.results, VLLM_BEGIN, VLLM_END, block, append=True)
    print(block)
    print(f"wrote the vllm-throughput block of {args.results}")
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: nothing runs on import
    raise SystemExit(main())
