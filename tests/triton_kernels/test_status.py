"""triton_ops.status(): whether the Triton kernels can run here, and why not. These tests do not skip where Triton
cannot run: that is the case they check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from genknowsub_fast.triton_kernels import launch as launch_mod

from genknowsub_fast.backends import triton_ops


def test_status_says_how_the_kernels_were_built():
    """status() is True exactly when the kernels can run (built for the interpreter, or a CUDA device), and its
    reason names the case."""
    ok, why = triton_ops.status()
    interpreted = launch_mod.interpreted()
    assert ok == (interpreted or torch.cuda.is_available())
    if interpreted:
        assert "interpreter" in why.lower()
    elif ok:
        assert "CUDA device" in why
    else:
        assert "TRITON_INTERPRET" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are what a machine without CUDA says")
def test_status_refuses_without_cuda_or_interpreter():
    """In a fresh process without TRITON_INTERPRET (and no GPU) status() is False and says to set it; setting it
    after the kernels were imported is named as such; prepare() refuses CPU experts there."""
    code = (
        "import os, torch\n"
        "from genknowsub_fast.backends import triton_ops\n"
        "from genknowsub_fast.backends.packing import pack_experts\n"
        "from genknowsub_fast.options import RoutingOptions\n"
        "print(triton_ops.status())\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print(triton_ops.status())\n"
        "p = pack_experts(torch.ones(2, 1, 4), torch.ones(2, 3, 1), torch.ones(2), torch.eye(2, 4))\n"
        "try:\n"
        "    triton_ops.prepare(p, RoutingOptions(1))\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, second, refused = out.strip().splitlines()[-3:]
    assert first.startswith("(False,") and "TRITON_INTERPRET is not set" in first
    assert second.startswith("(False,") and "set after" in second
    assert refused.startswith("refused:") and "TRITON_INTERPRET=1" in refused
