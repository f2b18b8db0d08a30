"""Triton backend: ``prepare(packed, options) -> TritonLayer``, what the prepared runner calls on CUDA.

A layer is validated and laid out once, when prepared: the float32 prototypes, their 16-bit pieces for the route pass
(``triton_kernels/pieces.py``), A as (E·r, d_in) and Bᵀ with one row stride. Each call then only looks up its plan
(one dict lookup per token count) and launches: directly in eager mode, through the
``torch.ops.genknowsub_fast.routed_linear`` custom op while torch.compile traces (so the compiled graph holds one opaque
node). Routing arguments (top_k in [1, E], temperature > 0, shapes) are the caller's job (``genknowsub_fast.ops``
validates them once); this module rejects only what it cannot run: a dtype or device the kernels do not take.

Importing this module imports Triton; ``ops.triton_status`` turns an ImportError into a reason string.
"""

from __future__ import annotations

import os

import torch

from genknowsub_fast.triton_kernels import custom_ops, linear
from genknowsub_fast.triton_kernels.pieces import split_prototypes

from ..options import RoutingOptions
from .packing import PackedExperts

__all__ = ["SUPPORTED_DTYPES", "TritonLayer", "prepare", "status"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def status() -> tuple[bool, str]:
    """(True, how) when the Triton kernels can run here, else (False, why not).

    They run on a CUDA device, or on CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 was set before the
    kernels were imported (Triton reads it when the kernels are decorated).
    """
    env = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if custom_ops.interpreted():
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on the host, slowly"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if env:
        return False, (
            "TRITON_INTERPRET=1 was set after genknowsub_fast.triton_kernels was imported; set it before importing "
            "triton or genknowsub_fast"
        )
    return False, "no CUDA device, and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to run on CPU, slowly)"


class TritonLayer:
    """One module's experts prepared for the Triton kernels. Build it with :func:`prepare`.

    ``layer(x2, weight=None, bias=None)`` returns ``x2 Wᵀ + bias + delta`` (or the delta alone when weight is None);
    ``layer.add_delta_(y, x2, scores=None)`` adds the delta into y in place. x2 is (T, d_in) in the layer's dtype
    and on its device; ``scores`` (T, E) float32 are signed routing scores the caller computed (e.g. summed over
    tensor-parallel shards).
    """

    def __init__(
        self,
        packed: PackedExperts,
        top_k: int,
        temperature: float,
        regime: str | None = None,
        split: int | None = None,
        fuse_base: bool | None = None,
    ):
        e, r = packed.num_experts, packed.rank
        self.num_experts, self.rank, self.top_k = e, r, int(top_k)
        self.temperature = float(temperature)
        self.mix_weights = packed.mixing == "weights"
        self.dtype, self.device = packed.a.dtype, packed.a.device
        self.prototypes = packed.prototypes.to(torch.float32).contiguous()
        self.a = linear.row_major(packed.a).reshape(e * r, -1)
        self.b_t = linear.row_major(packed.b_t)
        self.d_in, self.d_out = self.a.shape[1], self.b_t.shape[2]
        if self.dtype == torch.float32:
            self.p_route, self.inv_scale = self.prototypes, 1.0
        else:
            self.p_route, self.inv_scale = split_prototypes(self.prototypes, self.dtype)
            self.p_route = self.p_route.to(self.device)
        self._overrides = (regime, split, fuse_base)
        self._op_overrides = (regime or "auto", split or 0, -1 if fuse_base is None else int(fuse_base))
        self._plans: dict[tuple[int, bool], linear.Plan] = {}

    def plan(self, x2: torch.Tensor, has_scores: bool = False) -> linear.Plan:
        """The dispatch plan for x2's token count (cached per token count and scores flag)."""
        key = (x2.shape[0], has_scores)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = linear.plan_for(x2, self.b_t, self.top_k, has_scores, *self._overrides)
        return plan

    def _check(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype != self.dtype or x2.device != self.device:
            raise ValueError(
                f"x is {x2.dtype} on {x2.device}, but this Triton layer was prepared for {self.dtype} on {self.device}"
            )
        return linear.row_major(x2)

    def _op(self, x2, weight, bias, scores):
        regime, split, fuse = self._op_overrides
        return torch.ops.genknowsub_fast.routed_linear(
            x2, self.prototypes, self.p_route, self.inv_scale, self.a, self.b_t, weight, bias, scores, self.top_k,
            self.temperature, self.mix_weights, regime, split, fuse,
        )  # fmt: skip

    def __call__(
        self, x2: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x2 Wᵀ + bias + delta`` (T, d_out), or the delta alone when ``weight`` is None."""
        if weight is None and bias is not None:
            raise ValueError("bias given without weight: a delta-only call takes neither")
        if torch.compiler.is_compiling():
            return self._op(x2, weight, bias, None)
        x2 = self._check(x2)
        return linear.routed_linear(
            x2, self.prototypes, self.p_route, self.inv_scale, self.a, self.b_t, weight, bias, self.top_k,
            self.temperature, self.mix_weights, self.plan(x2),
        )  # fmt: skip

    def add_delta_(self, y: torch.Tensor, x2: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``y += delta`` in place for y (T, d_out) with unit-stride rows; returns y."""
        if scores is not None and (scores.dtype != torch.float32 or scores.shape != (x2.shape[0], self.num_experts)):
            raise ValueError(
                f"scores must be float32 of shape ({x2.shape[0]}, {self.num_experts}), got {scores.dtype} "
                f"{tuple(scores.shape)}"
            )
        if torch.compiler.is_compiling():
            return y.add_(self._op(x2, None, None, scores))
        x2 = self._check(x2)
        if y.stride(-1) != 1:
            raise ValueError("y must have unit-stride rows")
        if scores is not None:
            scores = scores.contiguous()
        return linear.add_delta_(
            y, x2, self.prototypes, self.p_route, self.inv_scale, self.a, self.b_t, self.top_k, self.temperature,
            self.mix_weights, self.plan(x2, scores is not None), True, scores,
        )  # fmt: skip


def prepare(
    packed: PackedExperts,
    options: RoutingOptions,
    *,
    regime: str | None = None,
    split: int | None = None,
    fuse_base: bool | None = None,
) -> TritonLayer:
    """A :class:`TritonLayer` for ``packed`` routed with ``options`` (validated by the caller's RoutingOptions).

    ValueError when the kernels cannot run these tensors: a dtype other than float16/bfloat16/float32, A and Bᵀ of
    different dtypes or devices, or a device that is neither CUDA nor the CPU under the Triton interpreter.
    ``regime`` ("decode", "dense", "grouped"), ``split`` (k-splits) and ``fuse_base`` override the dispatch table
    (tests and benchmarks reach every path this way).
    """
    a, b_t = packed.a, packed.b_t
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton backend takes {SUPPORTED_DTYPES}, got experts of dtype {a.dtype}")
    if b_t.dtype != a.dtype or b_t.device != a.device or packed.prototypes.device != a.device:
        raise ValueError(
            f"packed experts mix dtypes/devices: a {a.dtype} on {a.device}, b_t {b_t.dtype} on {b_t.device}, "
            f"prototypes on {packed.prototypes.device}"
        )
    if a.device.type != "cuda" and not custom_ops.interpreted():
        raise ValueError(
            "the Triton kernels run on CUDA tensors, or on CPU only under TRITON_INTERPRET=1; experts are on "
            f"{a.device}"
        )
    if regime is not None and regime not in linear.REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {linear.REGIMES}")
    return TritonLayer(packed, options.top_k, options.temperature, regime, split, fuse_base)
