"""Test-session setup shared by every test directory."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, so it must be set before anything imports triton: without
# a GPU the Triton kernels run in the interpreter (numpy), which is what the kernel tests under tests/ use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
