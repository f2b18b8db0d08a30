"""cli_args: argument types that refuse bad numbers while parsing, and one-line messages."""

import argparse

import pytest

from genknowsub_fast.cli.args import OneLineParser, non_negative_int, one_line, positive_float, positive_int


def test_number_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and positive_float("0.5") == 0.5
    for fn, text in ((positive_int, "0"), (positive_int, "1.5"), (non_negative_int, "-1"), (positive_float, "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float("-0.0")


def test_one_line():
    assert one_line(ValueError("bad\n  input")) == "bad input"
    assert one_line(OSError(2, "No such file")) == "FileNotFoundError: [Errno 2] No such file"
    assert one_line(RuntimeError()) == "RuntimeError: (no message)"


def test_parser_errors_are_one_line(capsys):
    p = OneLineParser(prog="tool")
    p.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--n", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tool: error: argument --n: expected an integer ≥ 1, got '0' (see tool --help)\n"
