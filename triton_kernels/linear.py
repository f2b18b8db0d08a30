"""One routed LoRA linear: a layer's experts as the kernels read them (:class:`PreparedExperts`, one object passed to
every launch function), and the launch sequence of each regime (``dispatch.py`` says how the regime is chosen).

- decode: route kernel → shrink kernel → expand kernel (``decode.py``); with a base weight on a GPU they compute the
  delta into a float32 buffer on a side stream beside the base GEMM (they need only x), and ``y += delta`` follows;
- dense: route pass (1 kernel, 2 with split-K) → one kernel computing ``x Wᵀ + bias + delta`` (fused-base plan: no
  cuBLAS call, y written once), or cuBLAS then the dense expand into its output;
- grouped: base GEMM → route pass (routing and per-block pair counts) → scatter of the pairs by expert → grouped
  shrink → grouped expand (atomics into y).

Nothing here reads a device value back to the host, so every sequence can be captured in a CUDA graph (the side
stream forks from and joins the caller's stream, which capture records). Arguments are not checked here:
``genknowsub_fast.backends.triton_ops.prepare`` validates a layer once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import decode
from .dispatch import REGIMES, LayerSpec, Plan, plan_for
from .expand import expand_dense_
from .grouped import align_pairs_by_expert, grouped_expand_, grouped_shrink
from .pieces import split_prototypes
from .route_shrink import route_shrink

__all__ = ["REGIMES", "Plan", "PreparedExperts", "add_delta_", "device_info", "routed_linear", "row_major"]


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_info(device: torch.device) -> tuple[tuple[int, int] | None, int | None]:
    """(compute capability, SM count) of a CUDA device; (None, None) elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None, None
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are unit-stride and equally spaced (what the kernels index), else a contiguous copy.

    The kernels take one row stride per operand, so padded rows (the CPU packing pads ``b_t`` rows to an odd number
    of cache lines) are read in place; a (E, r, d_out) tensor qualifies when ``stride(0) == r·stride(1)``.
    """
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        return t.contiguous()
    return t


@dataclass(eq=False)
class PreparedExperts:
    """One layer's experts as the kernels read them, with its routing options and its dispatch-table key.

    ``prototypes`` (E, d_in) float32; ``p_route`` what the route pass dots against (the prototypes for float32 layers,
    else their 16-bit pieces with ``inv_scale``: ``pieces.split_prototypes``); ``a`` (E·r, d_in) and ``b_t``
    (E, r, d_out) in the compute dtype, rows unit-stride. Build it with :meth:`build`.
    """

    prototypes: torch.Tensor
    p_route: torch.Tensor
    inv_scale: float
    a: torch.Tensor
    b_t: torch.Tensor
    top_k: int
    temperature: float
    mix_weights: bool
    spec: LayerSpec

    @classmethod
    def build(
        cls,
        prototypes: torch.Tensor,
        a: torch.Tensor,
        b_t: torch.Tensor,
        top_k: int,
        temperature: float,
        mix_weights: bool,
        regime: str | None = None,
        split: int | None = None,
        fuse_base: bool | None = None,
        p_route: torch.Tensor | None = None,
        inv_scale: float | None = None,
    ) -> PreparedExperts:
        """From float32 prototypes (E, d_in), A (E, r, d_in) or (E·r, d_in) and Bᵀ (E, r, d_out); the overrides go into
        the table key. ``p_route`` / ``inv_scale``: pieces already split (the custom op passes them back in)."""
        e, r, d_out = b_t.shape
        dtype, device = b_t.dtype, b_t.device
        prototypes = prototypes.to(torch.float32)
        if p_route is None:
            if dtype == torch.float32:
                p_route, inv_scale = prototypes, 1.0
            else:
                p_route, inv_scale = split_prototypes(prototypes, dtype)
                p_route = p_route.to(device)
        capability, num_sms = device_info(device)
        spec = LayerSpec(e, r, int(top_k), prototypes.shape[1], d_out, dtype, capability, num_sms, regime, split,
                         fuse_base, bool(mix_weights))  # fmt: skip
        a2 = row_major(a.reshape(e * r, -1))
        return cls(prototypes, p_route, float(inv_scale), a2, row_major(b_t), int(top_k), float(temperature),
                   bool(mix_weights), spec)  # fmt: skip

    @classmethod
    def on_meta(cls, spec: LayerSpec) -> PreparedExperts:
        """Meta tensors of ``spec``'s shapes: launches recorded with them (``launch.recording``) are exactly a real
        layer's, on a machine without the device (the AOT compile and the cost model use this)."""
        e, r, d_in, dt = spec.num_experts, spec.rank, spec.d_in, spec.dtype
        new = lambda *s, dtype=dt: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
        protos = new(e, d_in, dtype=torch.float32)
        p_route = protos if dt == torch.float32 else new(e, 3 * d_in)
        return cls(protos, p_route, 1.0, new(e * r, d_in), new(e, r, spec.d_out), spec.top_k, 1.0, spec.mix_weights,
                   spec)  # fmt: skip

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    @property
    def d_out(self) -> int:
        return self.spec.d_out

    def plan(self, num_tokens: int, has_scores: bool = False, has_weight: bool = True) -> Plan:
        """The dispatch table's plan for a call of ``num_tokens`` tokens (``dispatch.plan_for``, cached)."""
        return plan_for(self.spec, num_tokens, has_scores, has_weight)


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def add_delta_(
    layer: PreparedExperts,
    y: torch.Tensor,
    x: torch.Tensor,
    plan: Plan,
    accumulate: bool,
    scores: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y (+)= routed delta`` in place for x (T, d_in), y (T, d_out); returns y.

    Without ``accumulate`` y's contents are ignored and overwritten. ``weight``/``bias`` are read only by a fused-base
    plan, which then writes ``x Wᵀ + bias + delta``. ``scores`` (T, E) float32: caller-given routing scores.
    """
    if x.shape[0] == 0:
        return y
    if plan.regime == "decode":
        buffers = decode.workspace(x, layer.top_k, plan.decode)
        decode.route_shrink(layer, x, plan.decode, buffers, scores)
        return decode.expand_(layer, y, plan.decode, buffers, accumulate)
    c, idx, w, counts = route_shrink(layer, x, plan.route, scores)
    if plan.regime == "dense":
        return expand_dense_(layer, y, c, plan.expand, accumulate, x, weight, bias)
    gp = plan.grouped
    sorted_pairs, block_expert = align_pairs_by_expert(
        idx, counts, x.shape[0], layer.num_experts, gp.block_m, plan.route.block_t, gp.scatter_chunk
    )
    hw = grouped_shrink(layer, x, w, sorted_pairs, block_expert, gp)
    if not accumulate:
        y.zero_()  # the grouped expand only adds (atomics)
    return grouped_expand_(layer, y, hw, w, sorted_pairs, block_expert, gp)


def _decode_beside_base(
    layer: PreparedExperts, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan, scores
) -> torch.Tensor:
    """Decode with a base weight: the three decode kernels compute the delta into a float32 buffer on a side stream
    while cuBLAS computes the base (on a GPU), then ``y += delta`` (one rounding into y) is all that waits for both.

    The buffers are allocated on the caller's stream before the fork, so the caching allocator cannot hand them to
    other work until the caller's stream has passed the final add, which runs after the join. Off a GPU (meta tensors
    when recording, the interpreter in tests) the same launches run in order.
    """
    buffers = decode.workspace(x, layer.top_k, plan.decode)
    delta = torch.empty(x.shape[0], layer.d_out, device=x.device, dtype=torch.float32)
    if not x.is_cuda:
        decode.route_shrink(layer, x, plan.decode, buffers, scores)
        decode.expand_(layer, delta, plan.decode, buffers, False)
        return F.linear(x, weight, bias).add_(delta)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device.index)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        decode.route_shrink(layer, x, plan.decode, buffers, scores)
        decode.expand_(layer, delta, plan.decode, buffers, False)
    y = F.linear(x, weight, bias)
    main.wait_stream(side)
    return y.add_(delta)


def routed_linear(
    layer: PreparedExperts,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scores: torch.Tensor | None = None,
    plan: Plan | None = None,
    beside: bool | None = None,
) -> torch.Tensor:
    """``x Wᵀ + bias + delta`` for x (T, d_in), or only the delta when ``weight`` is None (arguments already valid).

    A weight whose rows are not unit-stride (GPT-2 Conv1D passes a transposed view) is never fused: cuBLAS computes
    the base and the expand adds into it. ``beside``: run a decode call's delta beside the base GEMM (default: on
    CUDA tensors; the AOT recording and the tests force it to reach that sequence without a GPU).
    """
    t = x.shape[0]
    fusable = weight is not None and weight.stride(-1) == 1
    if plan is None:
        plan = layer.plan(t, scores is not None, fusable)
    elif plan.fuses_base and not fusable:
        plan = layer.plan(t, scores is not None, False)
    if weight is None or plan.fuses_base:
        y = torch.empty(t, layer.d_out, device=x.device, dtype=x.dtype)
        return add_delta_(layer, y, x, plan, weight is not None, scores, weight, bias)
    if plan.regime == "decode" and t > 0 and (x.is_cuda if beside is None else beside):
        return _decode_beside_base(layer, x, weight, bias, plan, scores)
    y = F.linear(x, weight, bias)
    return add_delta_(layer, y, x, plan, True, scores)
