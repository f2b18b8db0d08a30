"""Exact Arrow prototypes for many modules at once: the compiled extension when available, torch.linalg otherwise.

The extension (csrc/) is not wired in yet: every call runs the torch.linalg path of torch_ops.exact_prototypes.
"""

from __future__ import annotations

import torch

from . import torch_ops


def exact_prototypes_batched(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prototypes and zero masks for each (A (E, r, d_in), B (E, d_out, r)) pair, in A's dtype."""
    protos, zeros = [], []
    for a, b in zip(a_list, b_list, strict=True):
        p, z = torch_ops.exact_prototypes(a, b)
        protos.append(p)
        zeros.append(z)
    return protos, zeros
