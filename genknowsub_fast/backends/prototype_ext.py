"""Exact Arrow prototypes for many modules at once: the compiled extension when available, torch.linalg otherwise.

With the extension (csrc/prototypes_cpu.cpp, csrc/prototypes_cuda.cu) a whole library — every module of every layer,
of different shapes — is one ``torch.ops.genknowsub_fast_C.arrow_prototypes_batched`` call. Without it (not built,
no compiler, ``GENKNOWSUB_FAST_EXTENSION=off``, or factors on a device the extension has no kernel for) each module
runs the torch.linalg path of torch_prototypes.exact_prototypes; both give the same prototypes up to float rounding,
with the same canonical sign and zero test.
"""

from __future__ import annotations

import time

import torch

from ..experts import all_finite
from . import extension, torch_prototypes

# The CUDA kernel's per-thread accumulators and shared memory are sized for r <= 64 (csrc/prototypes_cuda.h).
CUDA_MAX_RANK = 64
# Libraries bigger than this many factor elements are done in chunks, so that a progress bar can move.
PROGRESS_CHUNK_ELEMENTS = 64 * 2**20


def _extension_can_run(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> bool:
    if not a_list or not extension.has_op("arrow_prototypes_batched"):
        return False
    devices = {t.device for t in a_list} | {t.device for t in b_list}
    if len(devices) != 1:
        return False
    dev = next(iter(devices))
    if dev.type == "cpu":
        return True
    if dev.type == "cuda" and extension.has_cuda_kernels():
        return max(a.shape[1] for a in a_list) <= CUDA_MAX_RANK
    return False


def _extension_op(aa: list[torch.Tensor], bb: list[torch.Tensor]):
    try:
        return torch.ops.genknowsub_fast_C.arrow_prototypes_batched(aa, bb)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "NaN or Inf" in first:  # "arrow_prototypes: A (pair i) contains NaN or Inf", as check_finite words it
            raise ValueError(first.split(": ", 1)[-1]) from None
        raise


def _check(a_list, b_list) -> None:
    if len(a_list) != len(b_list):
        raise ValueError(f"{len(a_list)} A tensors but {len(b_list)} B tensors")
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(
                f"pair {i}: expected A (E, r, d_in) and B (E, d_out, r), got {tuple(a.shape)} and {tuple(b.shape)}"
            )


def check_finite(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> None:
    """ValueError naming the first factor (A or B, and its position) that holds NaN or Inf."""
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        for name, t in (("A", a), ("B", b)):
            if not all_finite(t):
                raise ValueError(f"{name} (pair {i}) contains NaN or Inf")


def exact_prototypes_batched(
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    progress: bool = False,
    use_extension: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prototypes (E, d_in) in A's dtype and zero masks (E,) bool for each (A (E, r, d_in), B (E, d_out, r)) pair.

    ``progress``: show a tqdm bar when the work takes over a second (the library is then processed in chunks).
    ``use_extension``: None = the compiled op when it can run here, True/False to force (tests).
    Non-finite factors raise ValueError naming A or B and the pair: on the CPU the extension finds them in its own
    pass (NaN / Inf make its float64 Gram matrices non-finite), so the data is not read a second time for the check.
    """
    a_list, b_list = list(a_list), list(b_list)
    _check(a_list, b_list)
    if not a_list:
        return [], []
    use = _extension_can_run(a_list, b_list) if use_extension is None else use_extension
    if not (use and a_list[0].device.type == "cpu"):
        check_finite(a_list, b_list)
    if use:
        run = _extension_op
    else:

        def run(aa, bb):
            outs = [torch_prototypes.exact_prototypes(a, b) for a, b in zip(aa, bb)]
            return [o[0] for o in outs], [o[1] for o in outs]

    sizes = [a.numel() + b.numel() for a, b in zip(a_list, b_list)]
    if not progress or sum(sizes) <= PROGRESS_CHUNK_ELEMENTS:
        return _as_lists(run(a_list, b_list))
    chunks, cur, n = [], [], 0
    for i, s in enumerate(sizes):
        cur.append(i)
        n += s
        if n >= PROGRESS_CHUNK_ELEMENTS:
            chunks.append(cur)
            cur, n = [], 0
    if cur:
        chunks.append(cur)
    protos: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    bar = None
    start = time.perf_counter()
    try:
        for k, idx in enumerate(chunks):
            p, z = _as_lists(run([a_list[i] for i in idx], [b_list[i] for i in idx]))
            protos += p
            zeros += z
            if bar is None and time.perf_counter() - start > 1.0 and k + 1 < len(chunks):
                from tqdm.auto import tqdm

                bar = tqdm(total=len(a_list), initial=len(protos), desc="prototypes", unit="module", leave=False)
            elif bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return protos, zeros


def prototypes_by_method(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor], method: str, rng_seed: int | None = None, progress=False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(prototypes, zero masks) per module for ``method``: "exact" (batched, above), "power" (PEFT's 15-step power
    iteration, :func:`torch_prototypes.power_prototypes`) or "svd" (a float64 SVD of each ΔW, for checks). NaN or Inf
    in the factors is a ValueError. A zero mask marks the experts whose prototype is zero (ΔW = 0)."""
    if method == "exact":
        return exact_prototypes_batched(a_list, b_list, progress=progress)
    check_finite(a_list, b_list)
    if method == "power":
        protos = [torch_prototypes.power_prototypes(a, b, rng_seed=rng_seed) for a, b in zip(a_list, b_list)]
    elif method == "svd":
        from .. import reference

        protos = [
            reference.prototypes_svd(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)
            for a, b in zip(a_list, b_list)
        ]
    else:
        raise ValueError(f"unknown prototype method {method!r}; expected 'exact', 'power' or 'svd'")
    return protos, [~(p != 0).any(dim=1) for p in protos]


def _as_lists(res) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    p, z = res
    return list(p), list(z)


__all__ = ["exact_prototypes_batched", "check_finite", "CUDA_MAX_RANK"]
