"""The ``genknowsub-fast`` command: ``demo``, ``build``, ``info``, ``inspect``, ``eval``.

Every argument and output path is checked before any work; every error is one line on stderr and exit code 2 (pass
``--traceback`` before the subcommand to see the full traceback of an unexpected error instead).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from .args import (
    OneLineParser,
    adapter_options,
    add_adapter_options,
    non_negative_int,
    one_line,
    positive_int,
    warn_one_line,
)


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", nargs="+", required=True, metavar="DIR",
        help="task adapter directories (PEFT format; for Trainer runs the checkpoint to use, RUN/checkpoint-N)",
    )  # fmt: skip
    p.add_argument("--general", nargs="+", default=[], metavar="DIR", help="general-knowledge adapter directories")
    p.add_argument(
        "--gks", choices=("param", "delta"), default=None, help="GenKnowSub mode (default: param with --general)"
    )
    p.add_argument(
        "--prototypes", choices=("exact", "power", "svd"), default="exact",
        help="exact: top right singular vector (default); power: PEFT's 15-step power iteration; svd: full SVD (slow)",
    )  # fmt: skip
    add_adapter_options(p)
    p.add_argument("-o", "--output", required=True, help="library file to write (.safetensors)")


def _run_build(args: argparse.Namespace) -> int:
    from ..library import LoraLibrary
    from ..paths import check_output_file

    check_output_file(args.output, "--output")
    # Written module by module as it is built: the library is never held in memory whole.
    lib = LoraLibrary.from_adapters(
        args.task,
        args.general or None,
        gks=args.gks or "auto",
        prototypes=args.prototypes,
        output=args.output,
        **adapter_options(args),
    )
    print(f"wrote {args.output}: {lib!r}")
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="library file written by `build` or LoraLibrary.save")


def _run_info(args: argparse.Namespace) -> int:
    from ..library import LoraLibrary

    lib = LoraLibrary.load(args.library)
    print(repr(lib))
    print(f"experts: {', '.join(lib.expert_names)}")
    if lib.gks:
        print(f"general knowledge subtracted ({lib.gks}): {', '.join(lib.general_names)}")
    if lib.added_names:
        print(f"added after the subtraction: {', '.join(lib.added_names)}")
    if lib.base_model_class:
        print(f"base model class: {lib.base_model_class}")
    if lib.base_model_name:
        print(f"base model: {lib.base_model_name}")
    if lib.routing:
        print(f"default routing: {lib.routing}")
    n_params = sum(m.num_experts * m.rank * (m.d_in + m.d_out) for m in lib.modules.values())
    print(f"{len(lib.modules)} modules, {n_params / 1e6:.2f} M adapter parameters")
    width = max(len(p) for p in lib.modules)
    for path, m in lib.modules.items():
        ranks = sorted(set(m.ranks.tolist()))
        print(f"  {path:<{width}}  {m.d_in:>6} → {m.d_out:<6} rank {'/'.join(map(str, ranks))}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size", choices=("tiny", "small", "bench", "phi3-mini"), default="small",
        help="random Phi-3 size (default: small; phi3-mini is the real shape and needs about 46 GB of memory)",
    )  # fmt: skip
    p.add_argument("--tasks", type=positive_int, default=6, help="number of task adapters")
    p.add_argument("--general", type=non_negative_int, default=3, help="number of general adapters")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of the synthetic adapters (default: 8)")
    p.add_argument("--top-k", type=positive_int, default=3, help="experts per token (at most --tasks)")
    p.add_argument("--tokens", type=positive_int, default=128, help="prompt length of the prefill timing")
    p.add_argument("--decode", type=positive_int, default=16, help="decode steps timed")
    p.add_argument(
        "--repeats", type=positive_int, default=5,
        help="timing rounds, each timing base, PEFT and patched in turn (the median and range are reported)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="directory for the adapters, library and plots (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model, adapters and tokens (default: 0)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _add_inspect(p: argparse.ArgumentParser) -> None:
    from .inspect_command import add_arguments

    add_arguments(p)


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspect_command import run

    return run(args)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from .eval_command import add_arguments

    add_arguments(p)


def _run_eval(args: argparse.Namespace) -> int:
    from .eval_command import run

    return run(args)


# name → (add_arguments(parser), run(args) -> exit code, help)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "demo": (_add_demo, _run_demo, "random Phi-3 + synthetic adapters → GKS library → patched model vs PEFT"),
    "build": (_add_build, _run_build, "build a library file from PEFT adapter directories"),
    "info": (_add_info, _run_info, "describe a library file"),
    "inspect": (
        _add_inspect,
        _run_inspect,
        "prototype similarity, ΔW spectra and routing statistics of a library (+ PNG plots)",
    ),
    "eval": (_add_eval, _run_eval, "zero-shot multiple-choice accuracy of a model patched with a library (JSONL)"),
}


def _message(exc: Exception) -> str:
    """The one-line message of an error; a refused pickle names the command line's flag, not the Python argument."""
    from ..library.adapters import PickledAdapterError

    if isinstance(exc, PickledAdapterError):
        return (
            f"adapter {exc.path!r} is a pickled adapter_model.bin; loading pickles can run arbitrary code. Convert it "
            "to safetensors, or pass --allow-pickle if you trust it (only tensors are read)"
        )
    return one_line(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``genknowsub-fast``; returns the exit code (2 on any error, with a one-line message)."""
    parser = OneLineParser(prog="genknowsub-fast", description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    prog = f"genknowsub-fast {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = warn_one_line(prog)
        try:
            return SUBCOMMANDS[args.command][1](args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # torch, safetensors and OS errors too: one line, never a traceback
            if args.traceback and not isinstance(exc, ValueError):
                raise
            print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
