"""``genknowsub-fast eval``: zero-shot multiple-choice accuracy of a HF model patched with a library.

Reads a JSONL file (one ``{"context": str, "choices": [str, ...], "label": int}`` object a line, optional ``"id"``),
scores it with :func:`genknowsub_fast.evaluate.score_choices`, prints the accuracy and, with ``--out``, writes the
per-example scores as JSON. Every argument and the output path are checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's arguments (numbers are checked while parsing)."""
    from ..evaluate.formats import REDUCTIONS, TEMPLATES
    from .args import positive_float, positive_int

    p.add_argument("--model", required=True, metavar="DIR", help="HF causal LM directory (save_pretrained)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --model)")
    p.add_argument("--library", required=True, metavar="LIB", help="library file (genknowsub-fast build)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help='one {"context","choices","label"} a line')
    p.add_argument(
        "--template",
        default="plain",
        help=f"option format: {', '.join(TEMPLATES)}, or a string with {{context}} and {{choice}} (default: plain)",
    )
    p.add_argument("--reduction", default="mean", help=f"{', '.join(REDUCTIONS)} (default: mean, the paper's)")
    p.add_argument(
        "--top-k", type=positive_int, help="experts per token (default: the library's, else min(3, experts))"
    )
    p.add_argument(
        "--temperature", type=positive_float, help="routing softmax temperature (default: the library's, else 1)"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="options per forward pass (default: 16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help=f"{', '.join(_DTYPES)} (default: float32)")
    p.add_argument("--out", metavar="FILE.json", help="write the accuracy and per-example scores here")


def read_jsonl(path: str) -> list[dict]:
    """The examples of a JSONL file, checked (ValueError naming the line)."""
    from ..evaluate.formats import check_examples

    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            try:
                check_examples([ex], need_labels=True)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {str(exc).removeprefix('example 0: ')}") from None
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _check_dir(path: str, what: str, needs: tuple[str, ...]) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a directory")
    if not any(os.path.isfile(os.path.join(path, n)) for n in needs):
        raise ValueError(f"{what} {path!r} has none of {', '.join(needs)}")


def _check_args(args: argparse.Namespace):
    """Everything checked before the model loads; returns (examples, library, dtype, device, routing options)."""
    import torch

    from ..evaluate.formats import REDUCTIONS, resolve_template
    from ..library import LoraLibrary
    from ..paths import check_output_file

    resolve_template(args.template)
    if args.reduction not in REDUCTIONS:
        raise ValueError(f"--reduction {args.reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if args.dtype not in _DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: expected one of {', '.join(_DTYPES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: expected cpu or cuda")
    _check_dir(args.model, "--model", ("config.json",))
    _check_dir(args.tokenizer or args.model, "--tokenizer", ("tokenizer.json", "tokenizer_config.json"))
    if not os.path.exists(args.library):  # a directory is named as such by LoraLibrary.load below
        raise ValueError(f"--library {args.library!r} does not exist")
    if not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data!r} does not exist")
    if args.out:
        check_output_file(args.out, "--out")
    examples = read_jsonl(args.data)
    library = LoraLibrary.load(args.library)
    try:  # --out records the values used
        routing = library.routing_options(args.top_k, args.temperature)
    except ValueError as exc:
        raise ValueError(f"--top-k / --temperature: {exc} in library {args.library!r}") from None
    return examples, library, getattr(torch, args.dtype), device, routing


def run(args: argparse.Namespace) -> int:
    """Check, load, patch, score; print the accuracy; write ``--out``. Bad input: ValueError (one line, exit 2)."""
    examples, library, dtype, device, routing = _check_args(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genknowsub_fast as gkf

    from ..evaluate.scoring import accuracy, predictions, score_choices
    from ..paths import write_atomically

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).to(device=device, dtype=dtype).eval()
    except (OSError, KeyError) as exc:  # transformers' "not a model / tokenizer directory" errors
        raise ValueError(f"cannot load {args.model!r}: {' '.join(str(exc).split())[:300]}") from None
    gkf.patch_model(model, library, top_k=routing.top_k, temperature=routing.temperature)
    start = time.perf_counter()
    scores = score_choices(
        model,
        tokenizer,
        examples,
        template=args.template,
        reduction=args.reduction,
        batch_size=args.batch_size,
        progress=True,
    )
    seconds = time.perf_counter() - start
    acc = accuracy(scores, examples)
    preds = predictions(scores)
    print(f"accuracy {acc:.4f} on {len(examples)} examples ({args.reduction}, top-k {routing.top_k}, {seconds:.1f} s)")
    if args.out:
        rows = []
        for i, (ex, s, p) in enumerate(zip(examples, scores, preds)):
            row = {"index": i, "label": ex["label"], "prediction": p, "correct": p == ex["label"], "scores": s}
            if "id" in ex:
                row["id"] = ex["id"]
            rows.append(row)
        result = {
            "accuracy": acc,
            "num_examples": len(examples),
            "model": args.model,
            "library": args.library,
            "data": args.data,
            "template": args.template,
            "reduction": args.reduction,
            "top_k": routing.top_k,
            "temperature": routing.temperature,
            "seconds": seconds,
            "examples": rows,
        }

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)

        write_atomically(args.out, write)
        print(f"wrote {args.out}")
    return 0
