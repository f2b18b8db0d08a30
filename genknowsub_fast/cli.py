"""The ``genknowsub-fast`` command: ``demo``, ``build``, ``info``, ``inspect``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", nargs="+", required=True, metavar="DIR", help="task adapter directories (PEFT format)")
    p.add_argument("--general", nargs="*", default=[], metavar="DIR", help="general-knowledge adapter directories")
    p.add_argument(
        "--gks", choices=("param", "delta"), default=None, help="GenKnowSub mode (default: param with --general)"
    )
    p.add_argument("--prototypes", choices=("exact", "power", "svd"), default="exact")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled adapter_model.bin files")
    p.add_argument("-o", "--output", required=True, help="library file to write (.safetensors)")


def _run_build(args: argparse.Namespace) -> int:
    from .library import LoraLibrary

    lib = LoraLibrary.from_adapters(
        args.task,
        args.general or None,
        gks=args.gks or "auto",
        prototypes=args.prototypes,
        allow_pickle=args.allow_pickle,
        progress=True,
    )
    lib.save(args.output)
    print(f"wrote {args.output}: {lib!r}")
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="library file written by `build` or LoraLibrary.save")


def _run_info(args: argparse.Namespace) -> int:
    from .library import LoraLibrary

    lib = LoraLibrary.load(args.library)
    print(repr(lib))
    print(f"experts: {', '.join(lib.expert_names)}")
    if lib.gks:
        print(f"general knowledge subtracted ({lib.gks}): {', '.join(lib.general_names)}")
    if lib.base_model_class:
        print(f"base model class: {lib.base_model_class}")
    if lib.routing:
        print(f"default routing: {lib.routing}")
    n_params = sum(m.a.numel() + m.b.numel() for m in lib.modules.values())
    print(f"{len(lib)} modules, {n_params / 1e6:.2f} M adapter parameters")
    width = max(len(p) for p in lib.modules)
    for path, m in lib.modules.items():
        ranks = sorted(set(m.ranks.tolist()))
        print(f"  {path:<{width}}  {m.d_in:>6} → {m.d_out:<6} rank {'/'.join(map(str, ranks))}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("tiny", "small", "bench", "phi3-mini"), default="small", help="Phi-3 size")
    p.add_argument("--tasks", type=int, default=6, help="number of task adapters")
    p.add_argument("--general", type=int, default=3, help="number of general adapters")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128, help="prompt length of the prefill timing")
    p.add_argument("--decode", type=int, default=16, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (the median is reported)")
    p.add_argument("--out", default=None, help="directory for the adapters, library and plots (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _add_inspect(p: argparse.ArgumentParser) -> None:
    from .analytics.cli import add_arguments

    add_arguments(p)


def _run_inspect(args: argparse.Namespace) -> int:
    from .analytics.cli import run

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
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``genknowsub-fast``; returns the exit code (2 on bad input, with a one-line error)."""
    parser = argparse.ArgumentParser(prog="genknowsub-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][1](args)
    except ValueError as exc:
        print(f"genknowsub-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
