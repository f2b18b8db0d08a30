"""RoutedLinear: one target layer's experts, validated and packed once, run with a per-(device, dtype) plan.

This is the only place where a call is dispatched to a backend. Patching, the functional op, vLLM and evaluation all
go through it:

- at construction every argument is checked (shapes, routing options, mixing, backend name), never per call;
- the first call on a (device, dtype) packs the experts for it (:mod:`backends.packing`) and picks the backend:
  Triton for CUDA tensors when it can run, otherwise the compiled CPU kernel for CPU calls it takes (float dtypes it
  was built for, no autograd), otherwise the portable torch regimes;
- later calls on the same (device, dtype) reuse that plan: the per-call work is one identity test on the cached plan,
  the kernel's own dtype/autograd test and the launch.

Routing scores are float32 on every backend; ties go to the lower expert index.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import cpu_kernel, torch_ops
from .backends.packing import COMPUTE_DTYPES, PackedExperts, check_factors, check_mixing, pack_experts
from .experts import ModuleExperts

BACKENDS = ("auto", "torch", "triton")


def check_routing_args(top_k: object, temperature: object, num_experts: int) -> tuple[int, float]:
    """Validated ``(top_k, temperature)`` as (int, float); ValueError naming the argument otherwise.

    ``top_k`` is any integer (numpy integers too, not bool) in [1, num_experts]; ``temperature`` any finite real > 0
    (not bool).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= int(top_k) <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")
    ok = not isinstance(temperature, bool) and isinstance(temperature, numbers.Real)
    if not (ok and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return int(top_k), float(temperature)


def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not when it cannot."""
    try:
        from .backends import triton_ops
    except ImportError as exc:  # triton missing or the kernels failed to import
        return False, f"Triton backend unavailable: {exc}"
    return triton_ops.status()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto", "torch", "triton") to the backend that runs on ``device``; ValueError if it cannot.

    "auto" is Triton on CUDA devices when Triton can run, else "torch" (which uses the compiled CPU kernel where it
    applies). Asking for Triton where it cannot run is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto" and device.type != "cuda":
        return "torch"
    ok, why = triton_status()
    if backend == "triton":
        if not ok:
            raise ValueError(f'backend="triton" cannot run: {why}')
        return "triton"
    return "triton" if ok else "torch"


@dataclass
class _Plan:
    """What one (device, dtype) runs: the packed experts and the backend objects that read them."""

    device: torch.device
    dtype: torch.dtype
    backend: str  # "triton", "cpu" (compiled kernel when it takes the call, else torch regimes) or "torch"
    packed: PackedExperts
    triton: object = None  # the Triton backend's prepared layer


class RoutedLinear:
    """The prepared per-layer runner: Arrow-routed LoRA experts of one linear layer.

    Args:
        experts: the layer's :class:`~genknowsub_fast.experts.ModuleExperts`.
        top_k: experts per token, in [1, E].
        temperature: softmax temperature > 0.
        mixing: ``"output"`` (PEFT's Arrow) or ``"weights"`` (merged A and B, one shared scaling and rank).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).
        device, dtype: pack for this device and dtype now (default: on the first call, for the input's).
        name: a label for messages (the module path).
    """

    def __init__(
        self,
        experts: ModuleExperts,
        top_k: int = 3,
        temperature: float = 1.0,
        mixing: str = "output",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "",
    ):
        if not isinstance(experts, ModuleExperts):
            raise ValueError(f"experts must be a ModuleExperts, got {type(experts).__name__}")
        check_factors(experts.a, experts.b, experts.scaling, experts.prototypes)
        self.top_k, self.temperature = check_routing_args(top_k, temperature, experts.num_experts)
        check_mixing(mixing, experts.scaling, experts.ranks)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.experts = experts
        self.mixing = mixing
        self.backend = backend
        self.name = name
        self._plan: _Plan | None = None
        if device is not None or dtype is not None:
            self.prepare(torch.device(device) if device is not None else experts.a.device, dtype or experts.a.dtype)

    def __getstate__(self) -> dict:
        # The plan (packed tensors, backend objects) is rebuilt on the first call after unpickling or copying.
        return {**self.__dict__, "_plan": None}

    # ---------------------------------------------------------------------------------------------------- properties
    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def rank(self) -> int:
        return self.experts.rank

    @property
    def d_in(self) -> int:
        return self.experts.d_in

    @property
    def d_out(self) -> int:
        return self.experts.d_out

    @property
    def packed(self) -> PackedExperts | None:
        """The packed experts of the current plan (None before the first call or :meth:`prepare`)."""
        return self._plan.packed if self._plan is not None else None

    @property
    def active_backend(self) -> str | None:
        """What the current plan runs: "triton", "cpu" (the compiled kernel where it takes a call) or "torch"."""
        return self._plan.backend if self._plan is not None else None

    def __repr__(self) -> str:
        plan = f", plan={self._plan.backend}/{str(self._plan.dtype).replace('torch.', '')}" if self._plan else ""
        return (
            f"RoutedLinear({self.name or 'layer'}: {self.num_experts} experts, {self.d_in}→{self.d_out}, "
            f"top_k={self.top_k}, temperature={self.temperature}, mixing={self.mixing!r}{plan})"
        )

    # -------------------------------------------------------------------------------------------------------- plans
    def prepare(self, device: torch.device, dtype: torch.dtype) -> RoutedLinear:
        """Pack for ``device`` and ``dtype`` and pick the backend now (the first call does it otherwise)."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{self.name or 'routed layer'}: inputs must be one of {COMPUTE_DTYPES}, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # calls compare against x.device, which has an index
            device = torch.device("cuda", torch.cuda.current_device())
        backend = resolve_backend(self.backend, device)
        e = self.experts
        packed = pack_experts(e.a, e.b, e.scaling, e.prototypes, self.mixing, e.ranks, dtype=dtype, device=device)
        triton_layer = None
        if backend == "triton":
            from .backends import triton_ops

            triton_layer = triton_ops.prepare(packed, self.top_k, self.temperature)
        elif device.type == "cpu" and dtype in cpu_kernel.KERNEL_DTYPES and cpu_kernel.available():
            backend = "cpu"
        self._plan = _Plan(device, dtype, backend, packed, triton_layer)
        return self

    def _plan_for(self, x: torch.Tensor) -> _Plan:
        plan = self._plan
        if plan is None or x.dtype != plan.dtype or x.device != plan.device:
            if x.shape[-1] != self.d_in:
                raise ValueError(f"{self.name or 'routed layer'}: x has d_in={x.shape[-1]}, expected {self.d_in}")
            plan = self.prepare(x.device, x.dtype)._plan
        return plan

    # -------------------------------------------------------------------------------------------------------- calls
    def add_delta_(self, y: torch.Tensor, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``y += routed delta`` for x (T, d_in) and y (T, d_out) in x's dtype; returns y.

        ``scores``: signed float32 routing scores (T, E) computed elsewhere, e.g. summed over tensor-parallel shards
        of x (see :meth:`route_scores`); by default they come from x.
        """
        plan = self._plan_for(x)
        if plan.triton is not None:
            return plan.triton.add_delta_(y, x, scores)
        if plan.backend == "cpu" and cpu_kernel.takes(x, y):
            return cpu_kernel.add_delta_(y, x, plan.packed, self.top_k, self.temperature, scores)
        return torch_ops.add_routed_delta_(y, x, plan.packed, self.top_k, self.temperature, scores=scores)

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x Wᵀ + bias + delta`` for x (..., d_in), or the delta alone when ``weight`` is None."""
        plan = self._plan_for(x)
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if plan.triton is not None:
            y = plan.triton(x2, weight, bias)
        else:
            if weight is not None:
                y = F.linear(x2, weight, bias)
            elif bias is not None:
                raise ValueError("bias given without weight: a delta-only call takes neither")
            else:
                y = x2.new_zeros(x2.shape[0], self.d_out)
            if plan.backend == "cpu" and cpu_kernel.takes(x2, y):
                cpu_kernel.add_delta_(y, x2, plan.packed, self.top_k, self.temperature)
            else:
                y = torch_ops.add_routed_delta_(y, x2, plan.packed, self.top_k, self.temperature)
        return y.view(*x.shape[:-1], self.d_out)

    def route_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Signed routing scores ``x·p_e`` (T, E) in float32 for x (..., d_in)."""
        plan = self._plan_for(x)
        return torch_ops.route_scores(x.reshape(-1, x.shape[-1]), plan.packed.prototypes)

    def route(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (T, k) float32 and expert indices (T, k) int64 for x (..., d_in)."""
        if scores is None:
            scores = self.route_scores(x)
        return torch_ops.route_from_scores(scores, self.top_k, self.temperature)


__all__ = ["RoutedLinear", "check_routing_args", "resolve_backend", "triton_status", "BACKENDS"]
