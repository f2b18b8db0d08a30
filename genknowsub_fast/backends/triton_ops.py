"""Triton backend: ``prepare(packed, options) -> TritonLayer``, what the prepared runner calls on CUDA.

A layer is validated and laid out once, when prepared, into one
:class:`~genknowsub_fast.triton_kernels.linear.PreparedExperts` (float32 prototypes, their 16-bit pieces for the
route pass, A as (E·r, d_in), Bᵀ, the routing options and the dispatch-table key), which every launch function takes
as its one argument. Each call then looks up its plan in the table's cache and launches:

- directly, in eager mode without autograd;
- through the ``torch.ops.genknowsub_fast.routed_linear`` custom op while torch.compile traces (the compiled graph
  holds one opaque node) and whenever autograd must see the call: the op has a registered backward, so the kernels
  never write in place into a tensor autograd needs. The backward is the portable torch regimes' (``torch_ops``): it
  recomputes the delta differentiably from the saved inputs and returns gradients for x, the base weight and bias,
  the experts' factors and the prototypes (or caller scores) as far as each requires them.

Routing arguments (top_k in [1, E], temperature > 0, shapes) are the caller's job (``genknowsub_fast.options``
validates them once); this module rejects only what it cannot run: a dtype or device the kernels do not take.

Importing this module imports Triton; ``runner.triton_status`` turns an ImportError into a reason string.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from genknowsub_fast.triton_kernels import launch as launch_mod
from genknowsub_fast.triton_kernels import linear
from genknowsub_fast.triton_kernels.linear import PreparedExperts

from ..options import RoutingOptions
from . import torch_ops
from .packing import PackedExperts

__all__ = ["SUPPORTED_DTYPES", "TritonLayer", "prepare", "status"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NAMESPACE = "genknowsub_fast"


def status() -> tuple[bool, str]:
    """(True, how) when the Triton kernels can run here, else (False, why not).

    They run on a CUDA device, or on CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 was set before the
    kernels were imported (Triton reads it when the kernels are decorated).
    """
    env = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if launch_mod.interpreted():
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on the host, slowly"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if env:
        return False, (
            "TRITON_INTERPRET=1 was set after genknowsub_fast.triton_kernels was imported; set it before importing "
            "triton or genknowsub_fast"
        )
    return False, "no CUDA device, and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to run on CPU, slowly)"


# ------------------------------------------------------------------------------------------------------- custom op
# The op's schema is flat (tensors and scalars): _op_args is the one place a PreparedExperts is flattened into it, and
# _from_op_args the one place it is rebuilt.


def _op_args(layer: PreparedExperts) -> tuple:
    s = layer.spec
    return (
        layer.prototypes, layer.p_route, layer.a, layer.b_t, layer.inv_scale, layer.top_k, layer.temperature,
        layer.mix_weights, s.regime or "auto", s.split or 0, -1 if s.fuse_base is None else int(s.fuse_base),
    )  # fmt: skip


def _from_op_args(prototypes, p_route, a, b_t, inv_scale, top_k, temperature, mix_weights, regime, split, fuse_base):
    return PreparedExperts.build(
        prototypes, a, b_t, top_k, temperature, mix_weights, None if regime == "auto" else regime,
        None if split == 0 else split, None if fuse_base < 0 else bool(fuse_base), p_route, inv_scale,
    )  # fmt: skip


@torch.library.custom_op(f"{NAMESPACE}::routed_linear", mutates_args=())
def routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scores: torch.Tensor | None,
    prototypes: torch.Tensor,
    p_route: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    inv_scale: float,
    top_k: int,
    temperature: float,
    mix_weights: bool,
    regime: str = "auto",
    split: int = 0,
    fuse_base: int = -1,
) -> torch.Tensor:
    """``x Wᵀ + bias + routed delta`` (T, d_out), or the delta alone when ``weight`` is None.

    The layer's tensors as :func:`_op_args` flattens them (prototypes (E, d_in) float32, p_route their pieces or the
    prototypes, a (E·r, d_in), b_t (E, r, d_out)); ``regime="auto"``, ``split=0`` and ``fuse_base=-1`` use the table.
    """
    layer = _from_op_args(prototypes, p_route, a, b_t, inv_scale, top_k, temperature, mix_weights, regime, split,
                          fuse_base)  # fmt: skip
    return linear.routed_linear(layer, x, weight, bias, scores)


@routed_linear.register_fake
def _routed_linear_fake(x, weight, bias, scores, prototypes, p_route, a, b_t, *args):
    return x.new_empty(x.shape[0], b_t.shape[-1])


def _setup_context(ctx, inputs, output):
    x, weight, bias, scores, prototypes, _, a, b_t, _, top_k, temperature, mix_weights = inputs[:12]
    ctx.save_for_backward(x, weight, bias, scores, prototypes, a, b_t)
    ctx.routing = (top_k, temperature, mix_weights)


def _backward(ctx, grad_y):
    """Gradients of the torch regimes' forward, recomputed from the saved inputs (float32 scores, the same routing)."""
    x, weight, bias, scores, prototypes, a, b_t = ctx.saved_tensors
    top_k, temperature, mix_weights = ctx.routing
    needs = ctx.needs_input_grad
    e, r, d_out = b_t.shape
    names = ("x", "weight", "bias", "scores", "prototypes", "a", "b_t")
    positions = (0, 1, 2, 3, 4, 6, 7)
    saved = dict(zip(names, (x, weight, bias, scores, prototypes, a, b_t)))
    wanted = [n for n, i in zip(names, positions) if needs[i] and saved[n] is not None]
    grads = dict.fromkeys(names)
    if wanted:
        with torch.enable_grad():
            leaf = {n: (t.detach().requires_grad_(n in wanted) if t is not None else None) for n, t in saved.items()}
            packed = PackedExperts(leaf["prototypes"], leaf["a"].view(e, r, -1), leaf["b_t"], e, r,
                                   "weights" if mix_weights else "output")  # fmt: skip
            xx = leaf["x"]
            if leaf["weight"] is not None:
                y = F.linear(xx, leaf["weight"], leaf["bias"])
            else:
                y = xx.new_zeros(xx.shape[0], d_out)
            y = torch_ops.add_routed_delta_(y, xx, packed, top_k, temperature, scores=leaf["scores"])
            got = torch.autograd.grad(y, [leaf[n] for n in wanted], grad_y, allow_unused=True)
        grads.update(zip(wanted, got))
    return (grads["x"], grads["weight"], grads["bias"], grads["scores"], grads["prototypes"], None, grads["a"],
            grads["b_t"], None, None, None, None, None, None, None)  # fmt: skip


routed_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------- the layer


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class TritonLayer:
    """One module's experts prepared for the Triton kernels. Build it with :func:`prepare`.

    ``layer(x2, weight=None, bias=None)`` returns ``x2 Wᵀ + bias + delta`` (or the delta alone when weight is None);
    ``layer.add_delta_(y, x2, scores=None)`` adds the delta into y in place. x2 is (T, d_in) in the layer's dtype
    and on its device; ``scores`` (T, E) float32 are signed routing scores the caller computed (e.g. summed over
    tensor-parallel shards). Under autograd both go through the custom op and its registered backward.
    """

    def __init__(self, experts: PreparedExperts):
        self.experts = experts
        self.dtype, self.device = experts.a.dtype, experts.a.device
        self._experts_need_grad = any(t.requires_grad for t in (experts.prototypes, experts.a, experts.b_t))

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def d_out(self) -> int:
        return self.experts.d_out

    def plan(self, x2: torch.Tensor, has_scores: bool = False, has_weight: bool = True) -> linear.Plan:
        """The dispatch plan for x2's token count (the table's cache)."""
        return self.experts.plan(x2.shape[0], has_scores, has_weight)

    def _check(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype != self.dtype or x2.device != self.device:
            raise ValueError(
                f"x is {x2.dtype} on {x2.device}, but this Triton layer was prepared for {self.dtype} on {self.device}"
            )
        return linear.row_major(x2)

    def _op(self, x2, weight, bias, scores):
        return torch.ops.genknowsub_fast.routed_linear(x2, weight, bias, scores, *_op_args(self.experts))

    def _through_op(self, *tensors) -> bool:
        if torch.compiler.is_compiling():
            return True
        return torch.is_grad_enabled() and (self._experts_need_grad or _needs_grad(*tensors))

    def __call__(
        self, x2: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x2 Wᵀ + bias + delta`` (T, d_out), or the delta alone when ``weight`` is None."""
        if weight is None and bias is not None:
            raise ValueError("bias given without weight: a delta-only call takes neither")
        if self._through_op(x2, weight, bias):
            return self._op(self._check(x2) if not torch.compiler.is_compiling() else x2, weight, bias, None)
        return linear.routed_linear(self.experts, self._check(x2), weight, bias)

    def add_delta_(self, y: torch.Tensor, x2: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``y += delta`` for y (T, d_out) with unit-stride rows; returns y.

        Under autograd the delta is computed out of place by the custom op and added with ``y.add_``, which autograd
        records; the kernels write into y directly only when no gradient is needed.
        """
        if scores is not None and (scores.dtype != torch.float32 or scores.shape != (x2.shape[0], self.num_experts)):
            raise ValueError(
                f"scores must be float32 of shape ({x2.shape[0]}, {self.num_experts}), got {scores.dtype} "
                f"{tuple(scores.shape)}"
            )
        if self._through_op(x2, y, scores):
            x_in = x2 if torch.compiler.is_compiling() else self._check(x2)
            return y.add_(self._op(x_in, None, None, scores))
        x2 = self._check(x2)
        if y.stride(-1) != 1:
            raise ValueError("y must have unit-stride rows")
        if scores is not None:
            scores = scores.contiguous()
        plan = self.experts.plan(x2.shape[0], scores is not None, False)
        return linear.add_delta_(self.experts, y, x2, plan, True, scores)


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
    ``regime`` ("decode", "dense", "grouped"), ``split`` (slices of d_in) and ``fuse_base`` override the dispatch
    table (tests and benchmarks reach every path this way).
    """
    a, b_t = packed.a, packed.b_t
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton backend takes {SUPPORTED_DTYPES}, got experts of dtype {a.dtype}")
    if b_t.dtype != a.dtype or b_t.device != a.device or packed.prototypes.device != a.device:
        raise ValueError(
            f"packed experts mix dtypes/devices: a {a.dtype} on {a.device}, b_t {b_t.dtype} on {b_t.device}, "
            f"prototypes on {packed.prototypes.device}"
        )
    if a.device.type != "cuda" and not launch_mod.interpreted():
        raise ValueError(
            "the Triton kernels run on CUDA tensors, or on CPU only under TRITON_INTERPRET=1; experts are on "
            f"{a.device}"
        )
    if regime is not None and regime not in linear.REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {linear.REGIMES}")
    if split is not None and split < 1:
        raise ValueError(f"split count must be >= 1, got {split}")
    experts = PreparedExperts.build(packed.prototypes, a, b_t, options.top_k, options.temperature,
                                    packed.mixing == "weights", regime, split, fuse_base)  # fmt: skip
    return TritonLayer(experts)
