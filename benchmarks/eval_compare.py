"""One small local multiple-choice task scored three ways, with time and accuracy: `score_choices`, lm-eval through
the `genknowsub` model, and the naive per-option loop (the original code's).

    GKF_BENCH_THREADS=1 python benchmarks/eval_compare.py [--examples 64] [--rounds 5] [--readme README.md]

(``make eval-compare``). One torch thread by default in ``make``: on the shared 2-core machine at load average ~10,
the 64-example `score_choices` run took a median 21.7 s with two threads and 1.1 s with one (OpenMP workers waiting
for a core), which says nothing about the scorers.

Model: a random Phi-3 (hidden 256, 2 layers, vocab 512) patched with a GenKnowSub library of 6 synthetic task
experts (rank 8, 3 general adapters subtracted), top-k 3; task: random 4-choice examples over a closed word list,
saved as JSONL with an lm-eval task YAML (all local, no hub). The three scorers run interleaved in each round after
one untimed warm-up round; the table gives the median and range of the rounds. Writes the table into the
``<!-- eval-compare -->`` block of RESULTS.md (write_results.py keeps that block) and, with ``--readme``, into the
README's ``<!-- eval-table -->`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.write_results import EVAL_BEGIN, EVAL_END, replace_block  # noqa: E402

README_BEGIN, README_END = "<!-- eval-table -->", "<!-- /eval-table -->"


def build(root: str, n_examples: int, seed: int):
    """Model, library, tokenizer, examples; saved under ``root`` for lm-eval."""
    import genknowsub_fast as gkf
    from genknowsub_fast.evaluate.formats import lm_eval_task_yaml
    from genknowsub_fast.synthetic import PHI3_TARGETS, make_choice_examples, make_phi3, make_tokenizer, write_adapters

    base = make_phi3("small", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, os.path.join(root, "adapters"), 6, 3, rank=8, target_modules=PHI3_TARGETS, seed=seed)
    lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
    lib.save(os.path.join(root, "lib.safetensors"))
    tok = make_tokenizer(base.config.vocab_size, seed=seed)
    base.save_pretrained(os.path.join(root, "model"))
    tok.save_pretrained(os.path.join(root, "model"))
    examples = make_choice_examples(n_examples, num_choices=4, seed=seed)
    data = os.path.join(root, "task.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    os.makedirs(os.path.join(root, "tasks"))
    with open(os.path.join(root, "tasks", "bench.yaml"), "w") as f:
        f.write(lm_eval_task_yaml("genknowsub_bench", data))
    return gkf.patch_model(base, lib, top_k=3), tok, examples


def measure(n_examples: int, rounds: int, batch_size: int, seed: int) -> dict:
    """Time the three scorers (interleaved rounds) and collect their accuracies."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from genknowsub_fast.evaluate import accuracy, score_choices, score_choices_naive
    from genknowsub_fast.integrations.lm_eval import GenKnowSubLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = tempfile.mkdtemp(prefix="gkf_eval_compare_")
    model, tok, examples = build(root, n_examples, seed)
    lm = GenKnowSubLM(
        pretrained=os.path.join(root, "model"),
        library=os.path.join(root, "lib.safetensors"),
        top_k=3,
        device="cpu",
        dtype="float32",
        batch_size=batch_size,
    )
    manager = TaskManager(include_path=os.path.join(root, "tasks"), include_defaults=False)

    def ours():
        return score_choices(model, tok, examples, batch_size=batch_size, progress=False)

    def naive():
        return score_choices_naive(model, tok, examples, progress=False)

    def harness():
        return simple_evaluate(
            model=lm, tasks=["genknowsub_bench"], task_manager=manager, log_samples=False, verbosity="ERROR"
        )

    runs = {"naive": naive, "ours": ours, "lm_eval": harness}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for r in range(rounds + 1):  # round 0 warms up (allocator, dataset cache, lazy imports) and is not counted
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            if r:
                times[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for ra, rb in zip(outputs["ours"], outputs["naive"]) for a, b in zip(ra, rb))
    kw = {"progress": False}
    acc = {
        "naive": (
            accuracy(outputs["naive"], examples),
            accuracy(score_choices_naive(model, tok, examples, reduction="sum_continuation", **kw), examples),
        ),
        "ours": (
            accuracy(outputs["ours"], examples),
            accuracy(score_choices(model, tok, examples, reduction="sum_continuation", **kw), examples),
        ),
        "lm_eval": (None, outputs["lm_eval"]["results"]["genknowsub_bench"]["acc,none"]),
    }
    return {
        "times": times,
        "accuracy": acc,
        "max_abs_diff": diff,
        "examples": n_examples,
        "options": sum(len(e["choices"]) for e in examples),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "lm_eval_version": lm_eval.__version__,
        "machine": describe(),
    }


def table(m: dict) -> str:
    """The markdown block: one row per scorer."""
    naive = statistics.median(m["times"]["naive"])
    rows = [
        ("naive per-option loop (the original code's)", "naive"),
        (f"`score_choices` (batch {m['batch_size']}, shared-prefix KV cache)", "ours"),
        (f"lm-eval {m['lm_eval_version']} `--model genknowsub` (batch {m['batch_size']})", "lm_eval"),
    ]
    lines = [
        f"{m['examples']} examples × 4 options ({m['options']} sequences), random Phi-3 (hidden 256, 2 layers) patched "
        f"with 6 GKS experts (r=8, top-k 3), CPU: {m['machine']}, torch {torch.__version__}, {m['threads']} torch "
        f"thread(s); median "
        f"(range) of {m['rounds']} interleaved rounds after a warm-up, measured by `{m['command']}`. "
        f"Largest |score_choices − naive| NLL: {m['max_abs_diff']:.1e}.",
        "",
        "| scorer | time | speed-up vs naive | accuracy (mean NLL, the paper's) | accuracy (sum of continuation, "
        "lm-eval `acc`) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in rows:
        ts = m["times"][key]
        med = statistics.median(ts)
        mean_acc, sum_acc = m["accuracy"][key]
        lines.append(
            f"| {label} | {med:.2f} s ({min(ts):.2f}–{max(ts):.2f}) | {naive / med:.2f}× | "
            f"{'—' if mean_acc is None else f'{mean_acc:.3f}'} | {sum_acc:.3f} |"
        )
    lines.append("")
    lines.append("lm-eval's time includes building its task and requests from the JSONL (the model is loaded once).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--readme", help="also fill this README's eval-table block")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("GKF_BENCH_THREADS", min(2, os.cpu_count() or 1))))
    m = measure(args.examples, args.rounds, args.batch_size, args.seed)
    threads = os.environ.get("GKF_BENCH_THREADS")
    env = [f"GKF_BENCH_THREADS={threads}"] if threads else []
    m["command"] = " ".join([*env, "python", "benchmarks/eval_compare.py", *(argv or sys.argv[1:])])
    text = table(m)
    print(text)
    section = f"## Zero-shot evaluation: score_choices vs lm-eval vs the naive loop\n\n{text}\n"
    replace_block(args.output, EVAL_BEGIN, EVAL_END, section, append=True)
    print(f"updated {args.output}")
    if args.readme:
        replace_block(args.readme, README_BEGIN, README_END, text, append=False)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
