"""Portable backend: plain PyTorch, fast on CPU and correct on any device.

One routed linear call does at most four GEMM-sized things and never builds a (T, E, d_out) tensor:

1. route (+ shrink): ``x @ [P ; A_all]ᵀ`` in one GEMM ("dense"), or ``x @ Pᵀ`` alone ("gather", "grouped");
2. top-k + softmax on ``|x·p|``;
3. shrink of the selected experts only ("gather": per token, "grouped": per expert over its tokens);
4. expand ``y += H @ (s·Bᵀ)``: one addmm into the base output ("dense"), a batched GEMM over the k selected
   experts ("gather") or an index_add per expert ("grouped").

On the CPU in float32, bfloat16 or float16 without autograd, when the compiled extension is loaded, the "fused" regime
runs all of this in one C++ call (backends/cpu_kernel.py) that reads only the k selected experts per token; the regimes
below are what runs everywhere else (other devices and dtypes, autograd, no compiler).

Regime table (CPU fp32, 2 threads, Phi-3-mini shapes, ``benchmarks/`` and /tmp microbenchmarks of this session):
- dense costs E·r / d_out of an extra GEMM on top of the base: shrink+expand measured 2.5 % of the base o_proj
  (3072→3072) at E·r = 40, T = 512, and 33 % at E·r = 512; so dense only while E·r ≤ DENSE_MAX_ER.
- at E·r = 512 the gathered path reads k·r rows per token instead of E·r: T = 1 o_proj overhead 3 % (vs 20 % dense);
  it copies k·r·(d_in + d_out) values per token, so past GATHER_MAX_T tokens the per-expert grouped loop wins
  (its cost is E small GEMMs, ~25 µs each, independent of T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedExperts

DENSE_MAX_ER = 128
GATHER_MAX_T = 16
POWER_ITERS = 15


def choose_regime(num_tokens: int, num_experts: int, rank: int, fused: bool = False) -> str:
    """The torch backend's regime for a call: "fused", "dense", "gather" or "grouped" (see the module docstring).

    ``fused`` says whether the compiled CPU kernel can take this call (see :func:`fused_kernel_applies`); when it can,
    it always does: it reads only the k selected experts per token and costs one dispatch.
    """
    if fused:
        return "fused"
    if num_experts * rank <= DENSE_MAX_ER:
        return "dense"
    return "gather" if num_tokens <= GATHER_MAX_T else "grouped"


# ----------------------------------------------------------------------------------------------------------- prototypes


def exact_prototypes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vectors of every ``B_e A_e`` without forming ΔW, batched, float64 inside.

    With ``A_eᵀ = Q R`` (thin QR), ``ΔWᵀΔW = Q (R BᵀB Rᵀ) Qᵀ``, so the top eigenvector v of the r×r matrix
    ``R BᵀB Rᵀ`` gives ``p = Q v``. Returns (prototypes in A's dtype with a canonical sign, zero mask (E,) bool):
    experts whose ΔW is zero (or numerically zero) get a zero row and a True in the mask.
    """
    e, r, d_in = a.shape
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    q, rr = torch.linalg.qr(a64.transpose(1, 2))  # (E, d_in, r), (E, r, r)
    gram_b = b64.transpose(1, 2) @ b64  # (E, r, r)
    m = rr @ gram_b @ rr.transpose(1, 2)
    m = 0.5 * (m + m.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(m)  # ascending
    top = evecs[..., -1:]  # (E, r, 1)
    p = (q @ top).squeeze(-1)  # (E, d_in)
    # ΔW counts as zero when its top singular value squared is below rounding of the factor norms.
    scale = a64.square().sum((1, 2)) * b64.square().sum((1, 2))
    zero = evals[:, -1] <= (64 * torch.finfo(torch.float64).eps) ** 2 * scale
    zero |= scale == 0
    p = torch.where(zero[:, None], torch.zeros_like(p), p)
    p = _canonical_sign(p)
    return p.to(a.dtype), zero


def power_prototypes(
    a: torch.Tensor, b: torch.Tensor, iters: int = POWER_ITERS, rng_seed: int | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """PEFT's approximation, kept for comparison: ``iters`` steps of power iteration on ``Aᵀ(BᵀB)A`` per expert.

    Like PEFT, each expert starts from ``randn(d_in)`` drawn from a generator seeded with ``rng_seed`` (the same start
    for every expert), iterates in float32 and casts back to A's dtype.
    """
    rows = []
    for i in range(a.shape[0]):
        a32 = a[i].to(torch.float32)
        b32 = b[i].to(torch.float32)
        c = b32.T @ b32
        gen = None
        if rng_seed is not None:
            gen = torch.Generator(device=a32.device.type)
            gen.manual_seed(int(rng_seed))
        v = torch.randn(a32.shape[1], dtype=torch.float32, device=a32.device, generator=gen)
        v = v / (v.norm() + eps)
        for _ in range(iters):
            w = a32.T @ (c @ (a32 @ v))
            v = w / (w.norm() + eps)
        rows.append(v)
    if not rows:
        return a.new_zeros(0, a.shape[2])
    return torch.stack(rows).to(a.dtype)


def _canonical_sign(p: torch.Tensor) -> torch.Tensor:
    if p.numel() == 0:
        return p
    idx = p.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(p, -1, idx))
    return p * torch.where(sign == 0, torch.ones_like(sign), sign)


# -------------------------------------------------------------------------------------------------------------- routing


def topk_softmax(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k of ``logits`` (T, E) and the softmax of ``top/temperature`` over the k, computed in float32 or better."""
    top, idx = torch.topk(logits, top_k, dim=-1, sorted=True)
    work = torch.promote_types(top.dtype, torch.float32)
    w = torch.softmax(top.to(work) / temperature, dim=-1)
    return w, idx


def route(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) float32 and expert indices (T, k) int64 for x (T, d_in)."""
    return topk_softmax(F.linear(x, prototypes).abs_(), top_k, temperature)


# ---------------------------------------------------------------------------------------------------- routed LoRA delta


def _mix_coefficients(h: torch.Tensor, w: torch.Tensor, mixing: str) -> torch.Tensor:
    """Turn per-selected-expert shrinks h (T, k, r) into expand coefficients (T, k, r).

    "output": ``w_j · h_j``. "weights": every selected expert's B gets ``w_j · Σ_i w_i h_i`` (the merged A applied once,
    then the merged B).
    """
    w = w.to(h.dtype).unsqueeze(-1)
    if mixing == "output":
        return h * w
    return w * (h * w).sum(dim=1, keepdim=True)


def add_routed_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedExperts,
    top_k: int,
    temperature: float,
    regime: str | None = None,
) -> torch.Tensor:
    """``y += routed LoRA delta`` in place for x (T, d_in), y (T, d_out); returns y.

    ``regime`` overrides :func:`choose_regime` (tests use it to cover every path on small shapes).
    """
    t = x.shape[0]
    if t == 0:
        return y
    e, r = packed.num_experts, packed.rank
    regime = regime or choose_regime(t, e, r, fused_kernel_applies(y, x, packed))
    if regime == "fused":
        _fused_cpu_(y, x, packed, top_k, temperature)
        return y
    if regime == "dense":
        s = F.linear(x, packed.route_shrink)  # (T, E + E·r): routing logits and every shrink in one GEMM
        w, idx = topk_softmax(s[:, :e].abs(), top_k, temperature)
        h_all = s[:, e:].view(t, e, r)
        if packed.mixing == "output":
            coef = torch.zeros(t, e, dtype=s.dtype, device=s.device).scatter_(1, idx, w.to(s.dtype))
            hc = h_all * coef.unsqueeze(-1)
        else:
            h = torch.gather(h_all, 1, idx.unsqueeze(-1).expand(t, top_k, r))
            g = _mix_coefficients(h, w, "weights")
            hc = torch.zeros_like(h_all).scatter_add_(1, idx.unsqueeze(-1).expand(t, top_k, r), g)
        return y.addmm_(hc.view(t, e * r), packed.b_flat)
    w, idx = route(x, packed.prototypes, top_k, temperature)
    if regime == "gather":
        a_sel = packed.a[idx].view(t, top_k * r, -1)  # (T, k·r, d_in)
        h = torch.bmm(a_sel, x.unsqueeze(-1)).view(t, top_k, r)
        g = _mix_coefficients(h, w, packed.mixing)
        b_sel = packed.b_t[idx].view(t, top_k * r, -1)  # (T, k·r, d_out)
        y.unsqueeze(1).baddbmm_(g.view(t, 1, top_k * r), b_sel)
        return y
    if regime == "grouped":
        return _grouped_(y, x, packed, w, idx)
    raise ValueError(f"unknown regime {regime!r}; expected 'fused', 'dense', 'gather' or 'grouped'")


def cpu_kernel_takes(*tensors: torch.Tensor) -> bool:
    """Whether the patched forward's float32 hot path can hand these tensors to the compiled op: all float32 on the
    CPU, and no autograd through any of them (the kernel has no backward; with gradients on, the torch regimes run)."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def fused_kernel_applies(y: torch.Tensor, x: torch.Tensor, packed: PackedExperts) -> bool:
    """Whether the compiled CPU kernel is loaded and can take this call (see ``cpu_kernel.takes``)."""
    from . import cpu_kernel

    return packed.b_t.dtype == x.dtype and cpu_kernel.takes(x, y) and cpu_kernel.available()


def fused_op():
    """The compiled op, or None when the extension is not loaded (looked up once per process)."""
    from . import cpu_kernel

    return cpu_kernel.op()


def _fused_cpu_(y: torch.Tensor, x: torch.Tensor, packed: PackedExperts, top_k: int, temperature: float) -> None:
    from . import cpu_kernel

    cpu_kernel.add_delta_(y, x, packed, top_k, temperature)


def _grouped_(y: torch.Tensor, x: torch.Tensor, packed: PackedExperts, w: torch.Tensor, idx: torch.Tensor):
    """Per-expert shrink and expand over the tokens that chose each expert (tokens sorted by expert once)."""
    t, k = idx.shape
    r = packed.rank
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=packed.num_experts).tolist()
    tok_sorted = order // k
    h = x.new_empty(t * k, r)
    a = packed.a
    start = 0
    spans = []
    for ex, n in enumerate(counts):
        if n:
            sl = order[start : start + n]
            h[sl] = F.linear(x[tok_sorted[start : start + n]], a[ex])
            spans.append((ex, start, n))
        start += n
    g = _mix_coefficients(h.view(t, k, r), w, packed.mixing).view(t * k, r)
    b_t = packed.b_t
    for ex, start, n in spans:
        sl = order[start : start + n]
        y.index_add_(0, tok_sorted[start : start + n], g[sl] @ b_t[ex])
    return y
