"""Problems and references shared by the Triton kernel tests.

Kernel tests run on CUDA when there is a device, else on CPU tensors in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The interpreter is slow and computes bfloat16 dots wrongly, so CPU runs
use tiny odd shapes and float32/float16 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from genknowsub_fast import reference
from genknowsub_fast.backends.packing import PackedExperts, pack_experts
from genknowsub_fast.options import RoutingOptions
from tests.tolerances import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 only on a GPU: the Triton interpreter computes bfloat16 tl.dot wrongly.
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


def require_triton() -> None:
    """Skip unless the Triton kernels can run here (CUDA, or the interpreter set before import)."""
    from genknowsub_fast.backends import triton_ops

    ok, why = triton_ops.status()
    if not ok:
        pytest.skip(why)


@dataclass
class Problem:
    """One routed-LoRA layer in float64: x (T, d_in), A (E, r, d_in), B (E, d_out, r), scaling (E,), P (E, d_in)."""

    x: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: torch.Tensor
    prototypes: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.a.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def packed(self, dtype: torch.dtype, mixing: str = "output", device: torch.device = DEVICE) -> PackedExperts:
        """The backends' layout in ``dtype`` on ``device`` (pack_experts folds the scaling in float32 or better; the
        prototypes stay float32)."""
        return pack_experts(self.a, self.b, self.scaling, self.prototypes, mixing=mixing, dtype=dtype, device=device)

    def layer(self, dtype: torch.dtype, top_k: int, temperature: float, mixing: str = "output", **overrides):
        """``triton_ops.prepare`` of these experts; ``overrides``: regime / split / fuse_base."""
        from genknowsub_fast.backends import triton_ops

        return triton_ops.prepare(self.packed(dtype, mixing), RoutingOptions(top_k, temperature, mixing), **overrides)

    def cast(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """x, weight and bias in ``dtype`` on DEVICE."""
        return {n: getattr(self, n).to(device=DEVICE, dtype=dtype) for n in ("x", "weight", "bias")}

    def reference(self, dtype: torch.dtype, top_k: int, temperature: float, mixing: str = "output", base: bool = True):
        """(float64 reference, same-dtype reference) of ``x Wᵀ + bias + delta`` (the delta alone without ``base``)."""

        def run(dt):
            c = lambda t: t.to(dt)  # noqa: E731
            w, b = (c(self.weight), c(self.bias)) if base else (None, None)
            args = (c(self.x), c(self.a), c(self.b), c(self.scaling), c(self.prototypes), top_k, temperature, mixing)
            return reference.routed_lora(*args, w, b)

        return run(torch.float64), run(dtype)


def make_problem(
    t: int,
    e: int,
    r: int,
    d_in: int,
    d_out: int,
    seed: int = 0,
    ranks: list[int] | None = None,
    shared_scaling: bool = False,
    margin: bool = True,
) -> Problem:
    """A float64 problem whose routing has a clear top-k margin when ``margin`` (needs d_in >= e).

    With ``margin`` the prototypes are orthonormal and each token is a combination of them with coefficient
    magnitudes spaced 0.7 / E apart in a random order (plus 1e-3 noise), so |x·p| of neighbours in the ranking differ
    by far more than float16 rounding of the logits. ``ranks`` zero-pads expert i beyond ranks[i].
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    a = torch.randn(e, r, d_in, generator=g, dtype=f64) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g, dtype=f64) / r**0.5
    if ranks is not None:
        for i, ri in enumerate(ranks):
            a[i, ri:] = 0
            b[i, :, ri:] = 0
    scaling = torch.full((e,), 0.75, dtype=f64) if shared_scaling else 0.5 + torch.rand(e, generator=g, dtype=f64)
    if margin:
        if d_in < e:
            raise ValueError("a clear routing margin needs d_in >= E (orthonormal prototypes)")
        q, _ = torch.linalg.qr(torch.randn(d_in, e, generator=g, dtype=f64))
        protos = q.T.contiguous()
        mags = torch.linspace(1.0, 0.3, e, dtype=f64)
        coef = torch.stack([mags[torch.randperm(e, generator=g)] for _ in range(t)]) if t else torch.zeros(0, e)
        signs = torch.randint(0, 2, (t, e), generator=g).to(f64) * 2 - 1
        x = (coef.to(f64) * signs) @ protos + 1e-3 * torch.randn(t, d_in, generator=g, dtype=f64)
        x = x * 2.0
    else:
        protos = torch.randn(e, d_in, generator=g, dtype=f64)
        protos = protos / protos.norm(dim=1, keepdim=True)
        x = torch.randn(t, d_in, generator=g, dtype=f64)
    weight = torch.randn(d_out, d_in, generator=g, dtype=f64) / d_in**0.5
    bias = torch.randn(d_out, generator=g, dtype=f64)
    return Problem(x, a, b, scaling, protos, weight, bias)


def random_routing(t: int, e: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (T, k) int64 and softmax-like weights (T, k) float64, for expand-only tests."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    w = torch.softmax(torch.randn(t, k, generator=g, dtype=torch.float64), dim=-1)
    return idx.to(torch.int64), w


def shrink_coefficients(
    x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, mixing: str
) -> torch.Tensor:
    """Reference expand coefficients g (T, k·r) for given routing, in x's dtype (scaling lives in b_t, not here)."""
    t, k = idx.shape
    h = torch.einsum("tkrd,td->tkr", a[idx], x)  # (T, k, r)
    wk = w.to(x.dtype).unsqueeze(-1)
    if mixing == "output":
        g = wk * h
    else:
        g = wk * (wk * h).sum(dim=1, keepdim=True)
    return g.reshape(t, -1)


def dense_coefficients(g: torch.Tensor, idx: torch.Tensor, num_experts: int, block_r: int, na: int) -> torch.Tensor:
    """The route pass's dense coefficients C (T, na) from compact ones g (T, k·r): slot j of token t at columns
    idx[t, j]·block_r + s, zero elsewhere."""
    t, k = idx.shape
    r = g.shape[1] // k if k else 0
    out = torch.zeros(t, na, dtype=g.dtype)
    for j in range(k):
        cols = idx[:, j : j + 1].long() * block_r + torch.arange(r)
        out.scatter_(1, cols, g[:, j * r : (j + 1) * r])
    return out


def check(ours: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """assert_close_to_reference on CPU copies."""
    assert_close_to_reference(ours.detach().cpu(), ref64.detach().cpu(), ref_same.detach().cpu(), dtype, what)


def check_delta(layer, prob: Problem, dtype: torch.dtype, top_k: int, temperature: float, mixing: str = "output",
                what: str = "") -> torch.Tensor:  # fmt: skip
    """The layer's delta alone (a delta-only call) against the reference delta: the tolerance then scales with the
    delta, not with ``x Wᵀ + b``, so one expert's wrong contribution cannot hide under the base output."""
    delta = layer(prob.x.to(device=DEVICE, dtype=dtype))
    check(delta, *prob.reference(dtype, top_k, temperature, mixing, base=False), dtype, f"delta, {what}")
    return delta


def reference_pair(fn, *args64, dtype: torch.dtype):
    """fn on the float64 arguments and on the same arguments cast to ``dtype`` (the same-dtype reference)."""
    ref64 = fn(*args64)
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64]
    return ref64, fn(*cast)


__all__ = [
    "DEVICE",
    "DTYPES",
    "ON_GPU",
    "Problem",
    "check",
    "check_delta",
    "dense_coefficients",
    "make_problem",
    "random_routing",
    "reference",
    "reference_pair",
    "require_triton",
    "shrink_coefficients",
]
