"""Argument checking shared by the ``genknowsub-fast`` subcommands: numbers are checked while the command line is
parsed, so a bad ``--top-k`` or ``--tokens`` is refused before any work, and every parse error is one line."""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``PROG: error: MESSAGE``) and exit code 2, like every
    other error of the command; ``--help`` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = _number(text, int, "an integer ≥ 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = _number(text, int, "an integer ≥ 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """Options for reading adapter directories, shared by ``build`` and ``inspect --task/--general``."""
    p.add_argument(
        "--base-model-name",
        default=None,
        metavar="NAME",
        help="the base model all adapters were trained on, when they name it in different ways (e.g. a hub id and a "
        "local path); their own names are then not compared",
    )
    p.add_argument(
        "--ignore-modules-to-save",
        action="store_true",
        help="leave out whole-module weights the adapters saved (modules_to_save, e.g. lm_head) instead of refusing",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled adapter_model.bin files (tensors only)")


def adapter_options(args: argparse.Namespace) -> dict:
    """The :meth:`LoraLibrary.from_adapters` keyword arguments of :func:`add_adapter_options`."""
    return {
        "allow_pickle": args.allow_pickle,
        "base_model_name": args.base_model_name,
        "ignore_modules_to_save": args.ignore_modules_to_save,
    }


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message with every run of whitespace (newlines included) made one space; the
    exception's type is named unless it is a ValueError (the package's bad-input errors say what is wrong)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def warn_one_line(prog: str):
    """A ``warnings.showwarning`` replacement that prints ``PROG: warning: MESSAGE`` on one line of stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    return show


__all__ = [
    "OneLineParser",
    "add_adapter_options",
    "adapter_options",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "one_line",
    "warn_one_line",
]
