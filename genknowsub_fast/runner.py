"""RoutedLinear: one target layer's experts, validated and packed once, run with a per-(device, dtype) plan.

This is the only place where a call is dispatched to a backend. Patching, the functional op, vLLM and evaluation all
go through it:

- at construction every argument is checked (shapes, routing options, mixing, backend name), never per call;
- the first call on a (device, dtype) packs the experts for it (:mod:`backends.packing`) and picks the backend:
  Triton for CUDA tensors when it can run, otherwise the compiled CPU kernel for CPU calls it takes (float dtypes it
  was built for, no autograd), otherwise the portable torch regimes;
- later calls on the same (device, dtype) reuse that plan: the per-call work is one test of the input against the
  cached plan, the kernel's own dtype/autograd test and the launch. A CPU-kernel plan keeps the op's overload and its
  packed arguments, so ``runner(x, W, b)`` is one GEMM on x as it comes (any leading shape) and one op call.

Routing scores are float32 on every backend; ties go to the lower expert index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import cpu_kernel, torch_ops
from .backends.packing import COMPUTE_DTYPES, PackedExperts, check_factors, check_mixing
from .experts import ModuleExperts
from .options import RoutingOptions

BACKENDS = ("auto", "torch", "triton")


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


_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _keeps_everything(source: torch.dtype, target: torch.dtype) -> bool:
    """True when experts in ``source`` are represented exactly in ``target`` (the same dtype or a wider one)."""
    return source == target or _PRECISION.get(target, 0) > _PRECISION.get(source, 9)


@dataclass
class _Plan:
    """What one (device, dtype) runs: the packed experts and the backend objects that read them."""

    device: torch.device
    dtype: torch.dtype
    backend: str  # "triton", "cpu" (compiled kernel when it takes the call, else torch regimes) or "torch"
    packed: PackedExperts
    triton: object = None  # the Triton backend's prepared layer
    kernel: object = None  # "cpu": the compiled op's overload, called directly with kernel_args
    kernel_args: tuple = ()  # (prototypes, a, b_t, top_k, temperature, weights_mixing, scores=None, screen)
    screen: object = None  # "cpu": the bfloat16 prototypes of screened routing (cpu_kernel.screen_prototypes), or None


class RoutedLinear:
    """The prepared per-layer runner: Arrow-routed LoRA experts of one linear layer.

    Args:
        experts: the layer's :class:`~genknowsub_fast.experts.ModuleExperts`.
        options: validated :class:`~genknowsub_fast.options.RoutingOptions` (top_k, temperature, mixing), as
            :func:`~genknowsub_fast.options.resolve_routing` makes them where the user's call enters; ``top_k`` must
            not exceed this layer's experts, and ``mixing="weights"`` needs one shared rank and scaling.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).
        device, dtype: pack for this device and dtype now (default: on the first call, for the input's).
        name: a label for messages (the module path).
    """

    def __init__(
        self,
        experts: ModuleExperts,
        options: RoutingOptions,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "",
    ):
        if not isinstance(experts, ModuleExperts):
            raise ValueError(f"experts must be a ModuleExperts, got {type(experts).__name__}")
        if not isinstance(options, RoutingOptions):
            raise ValueError(
                "options must be a RoutingOptions (see genknowsub_fast.options.resolve_routing), got "
                f"{type(options).__name__}"
            )
        if not experts.is_packed:  # packed experts were checked when they were packed
            check_factors(experts.a, experts.b, experts.scaling, experts.prototypes)
        options.check_experts(experts.num_experts)
        check_mixing(options.mixing, experts.scaling, experts.ranks)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.experts = experts
        self.options = options
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
    def top_k(self) -> int:
        return self.options.top_k

    @property
    def temperature(self) -> float:
        return self.options.temperature

    @property
    def mixing(self) -> str:
        return self.options.mixing

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
        packed = e.packed_for(device, dtype, self.mixing)
        if packed is not e.packed and _keeps_everything(e.dtype, dtype) and device.type != "meta":
            # One copy of the experts: the plan's packing holds them as precisely as the source did, so the runner
            # keeps that one and lets the source go (a library the caller still holds keeps its own).
            self.experts = ModuleExperts.from_packed(packed, e.scaling.to(device), e.ranks.to(device))
        plan = _Plan(device, dtype, backend, packed)
        if backend == "triton":
            from .backends import triton_ops

            plan.triton = triton_ops.prepare(packed, self.options)
        elif device.type == "cpu" and dtype in cpu_kernel.KERNEL_DTYPES and cpu_kernel.available():
            plan.backend = "cpu"
            plan.kernel = cpu_kernel.op().default
            mixing = self.mixing == "weights"
            plan.screen = cpu_kernel.screen_prototypes(packed.prototypes)
            plan.kernel_args = (packed.prototypes, packed.a, packed.b_t, self.top_k, self.temperature, mixing, None,
                                plan.screen)  # fmt: skip
        self._plan = plan
        return self

    def _plan_for(self, x: torch.Tensor) -> _Plan:
        plan = self._plan
        if plan is None or x.dtype is not plan.dtype or x.device != plan.device:
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
            return cpu_kernel.add_delta_(y, x, plan.packed, self.top_k, self.temperature, scores, plan.screen)
        return torch_ops.add_routed_delta_(y, x, plan.packed, self.top_k, self.temperature, scores=scores)

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x Wᵀ + bias + delta`` for x (..., d_in), or the delta alone when ``weight`` is None."""
        plan = self._plan
        if plan is None or x.dtype is not plan.dtype or x.device != plan.device:
            plan = self._plan_for(x)
        if weight is None and bias is not None:
            raise ValueError("bias given without weight: a delta-only call takes neither")
        if plan.triton is not None:
            x2 = x.reshape(-1, x.shape[-1])
            y = plan.triton(x2 if x2.is_contiguous() else x2.contiguous(), weight, bias)
            return y.view(*x.shape[:-1], self.d_out)
        # x and y keep their leading shape: the compiled op takes (..., d) tensors, so no reshape or view is paid per
        # call (docs/design.md, "What a call costs").
        if not x.is_contiguous():
            x = x.contiguous()
        y = F.linear(x, weight, bias) if weight is not None else x.new_zeros(*x.shape[:-1], self.d_out)
        if plan.kernel is not None and cpu_kernel.takes(x, y):  # no autograd; y in x's dtype (autocast may differ)
            plan.kernel(y, x, *plan.kernel_args)
            return y
        shape = y.shape
        y = torch_ops.add_routed_delta_(y.view(-1, shape[-1]), x.view(-1, x.shape[-1]), plan.packed, self.top_k,
                                        self.temperature)  # fmt: skip
        return y.view(shape)

    def route_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Signed routing scores ``x·p_e`` (T, E) in float32 for x (..., d_in)."""
        plan = self._plan_for(x)
        return torch_ops.route_scores(x.reshape(-1, x.shape[-1]), plan.packed.prototypes)

    def route(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (T, k) float32 and expert indices (T, k) int64 for x (..., d_in)."""
        if scores is None:
            scores = self.route_scores(x)
        return torch_ops.route_from_scores(scores, self.top_k, self.temperature)


__all__ = ["RoutedLinear", "resolve_backend", "triton_status", "BACKENDS"]
