"""Portable backend: plain PyTorch regimes, correct on any device and dtype, with autograd.

The prepared runner (``genknowsub_fast.runner``) sends a call here when the compiled CPU kernel cannot take it (another
device, autograd, float64, no compiler) and Triton is not in use. One routed linear call does at most four GEMM-sized
things and never builds a (T, E, d_out) tensor:

1. routing scores ``x·pᵀ`` in float32 (x converted exactly) against the float32 prototypes;
2. top-k (ties to the lower index) + softmax over the k;
3. shrink ``x·Aᵀ``: every expert at once ("dense"), per token over its k selected experts ("gather"), or per expert
   over the tokens that chose it ("grouped");
4. expand ``y += H (s·Bᵀ)`` into the base output: one addmm ("dense"), a batched GEMM over the k selected experts
   ("gather") or an index_add per expert ("grouped").

Regime table (CPU fp32, 2 threads, Phi-3-mini shapes; measured with the previous release's benchmarks):
- dense costs E·r / d_out of an extra GEMM on top of the base: shrink+expand measured 2.5 % of the base o_proj
  (3072→3072) at E·r = 40, T = 512, and 33 % at E·r = 512; so dense only while E·r ≤ TORCH_DENSE_MAX_ER.
- at E·r = 512 the gathered path reads k·r rows per token instead of E·r: T = 1 o_proj overhead 3 % (vs 20 % dense);
  it copies k·r·(d_in + d_out) values per token, so past GATHER_MAX_T tokens the per-expert grouped loop wins
  (its cost is E small GEMMs, ~25 µs each, independent of T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedExperts

TORCH_DENSE_MAX_ER = 128
GATHER_MAX_T = 16
REGIMES = ("dense", "gather", "grouped")


def choose_regime(num_tokens: int, num_experts: int, rank: int) -> str:
    """The torch regime for a call: "dense", "gather" or "grouped" (see the module docstring)."""
    if num_experts * rank <= TORCH_DENSE_MAX_ER:
        return "dense"
    return "gather" if num_tokens <= GATHER_MAX_T else "grouped"


# -------------------------------------------------------------------------------------------------------------- routing


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing scores are float32 for every model dtype (float64 stays float64, for references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def route_scores(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Signed scores ``x·p_e`` (T, E), accumulated in float32 (float64 for float64 inputs)."""
    work = score_dtype(torch.promote_types(x.dtype, prototypes.dtype))
    return F.linear(x.to(work), prototypes.to(work))


def topk_softmax(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k of ``logits`` (T, E) with ties to the lower index, and the softmax of ``top/temperature`` over the k.

    ``torch.topk`` does not say which of two equal values it returns (on CPU it returned [28, 26, 27] for 40 equal
    logits); a stable descending sort keeps equal logits in index order, so the lower index wins, as in the reference.
    """
    top, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    top, idx = top[:, :top_k], idx[:, :top_k]
    work = torch.promote_types(top.dtype, torch.float32)
    return torch.softmax(top.to(work) / temperature, dim=-1), idx


def route_from_scores(scores: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) and indices (T, k) from signed scores (T, E)."""
    return topk_softmax(scores.abs(), top_k, temperature)


def route(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) float32 and expert indices (T, k) int64 for x (T, d_in)."""
    return route_from_scores(route_scores(x, prototypes), top_k, temperature)


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
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y += routed LoRA delta`` for x (T, d_in), y (T, d_out), both in ``packed``'s dtype; returns y.

    ``regime`` overrides :func:`choose_regime` (tests use it to cover every path on small shapes). ``scores`` are
    signed routing scores computed elsewhere (e.g. summed over tensor-parallel shards); by default they come from x.
    The update is in place also under autograd (y is the base layer's output, which its backward does not need).
    """
    t = x.shape[0]
    if t == 0:
        return y
    e, r = packed.num_experts, packed.rank
    regime = regime or choose_regime(t, e, r)
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    if scores is None:
        scores = route_scores(x, packed.prototypes)
    w, idx = route_from_scores(scores, top_k, temperature)
    if regime == "dense":
        h_all = F.linear(x, packed.a_flat).view(t, e, r)
        if packed.mixing == "output":
            coef = torch.zeros(t, e, dtype=h_all.dtype, device=h_all.device).scatter_(1, idx, w.to(h_all.dtype))
            hc = h_all * coef.unsqueeze(-1)
        else:
            h = torch.gather(h_all, 1, idx.unsqueeze(-1).expand(t, top_k, r))
            g = _mix_coefficients(h, w, "weights")
            hc = torch.zeros_like(h_all).scatter_add(1, idx.unsqueeze(-1).expand(t, top_k, r), g)
        return y.addmm_(hc.reshape(t, e * r), packed.b_flat)
    if regime == "gather":
        a_sel = packed.a[idx].view(t, top_k * r, -1)  # (T, k·r, d_in)
        h = torch.bmm(a_sel, x.unsqueeze(-1)).view(t, top_k, r)
        g = _mix_coefficients(h, w, packed.mixing).view(t, 1, top_k * r)
        b_sel = packed.b_t[idx].view(t, top_k * r, -1)  # (T, k·r, d_out)
        y.unsqueeze(1).baddbmm_(g, b_sel)
        return y
    return _grouped_(y, x, packed, w, idx)


def _grouped_(y: torch.Tensor, x: torch.Tensor, packed: PackedExperts, w: torch.Tensor, idx: torch.Tensor):
    """Per-expert shrink and expand over the tokens that chose each expert (tokens sorted by expert once)."""
    t, k = idx.shape
    r = packed.rank
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=packed.num_experts).tolist()
    tok_sorted = order // k
    h = x.new_empty(t * k, r)
    spans = []
    start = 0
    for ex, n in enumerate(counts):
        if n:
            h[order[start : start + n]] = F.linear(x[tok_sorted[start : start + n]], packed.a[ex])
            spans.append((ex, start, n))
        start += n
    g = _mix_coefficients(h.view(t, k, r), w, packed.mixing).view(t * k, r)
    for ex, start, n in spans:
        y.index_add_(0, tok_sorted[start : start + n], g[order[start : start + n]] @ packed.b_t[ex])
    return y


__all__ = [
    "choose_regime",
    "route",
    "route_scores",
    "route_from_scores",
    "topk_softmax",
    "add_routed_delta_",
    "score_dtype",
    "REGIMES",
]
