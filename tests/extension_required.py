"""Tests of compiled ops: a missing extension is a failure where a C++ compiler exists, a skip only where none does."""

from __future__ import annotations

import shutil

import pytest

from genknowsub_fast.backends import extension


def require_op(name: str) -> None:
    """Fail (compiler present) or skip (no compiler) unless ``torch.ops.genknowsub_fast_C.<name>`` is loaded."""
    if not extension.has_op(name):
        why = extension.status()[1]
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is here but the extension did not load: {why}")
        pytest.skip(f"no C++ compiler: {why}")
