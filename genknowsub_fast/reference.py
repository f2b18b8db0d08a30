"""Naive PyTorch references: the ground truth of every test.

Everything here is written for readability, not speed: it materialises ΔW = B·A, loops where the maths loops and
works in whatever dtype it is given (pass float64 for the ground truth). Nothing here imports PEFT.

Shapes (docs/design.md): A (E, r, d_in), B (E, d_out, r), scaling (E,), prototypes (E, d_in), x (T, d_in).
Mixed ranks are represented by zero-padding A's rows and B's columns up to r_max; padding contributes nothing.
"""

from __future__ import annotations

import torch

__all__ = [
    "gks_param",
    "gks_delta",
    "combine_factors",
    "prototypes_svd",
    "prototypes_of_sum_svd",
    "canonical_sign",
    "route",
    "routed_lora",
    "expand_with_routing",
]


def gks_param(
    task: list[tuple[torch.Tensor, torch.Tensor]], general: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factor-wise GenKnowSub: ``A_i - mean_g A_g`` and ``B_i - mean_g B_g`` (all ranks equal; scalings kept)."""
    if not general:
        return [(a.clone(), b.clone()) for a, b in task]
    mean_a = sum(a for a, _ in general) / len(general)
    mean_b = sum(b for _, b in general) / len(general)
    return [(a - mean_a, b - mean_b) for a, b in task]


def gks_delta(
    task: list[tuple[torch.Tensor, torch.Tensor, float]], general: list[tuple[torch.Tensor, torch.Tensor, float]]
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Exact GenKnowSub on ΔW: ``ΔW_i - mean_g ΔW_g`` written as concatenated factors with scaling 1.

    Each entry is ``(A, B, s)``. The result's ``A' = [A_i; A_g1; ...]`` and ``B' = [s_i B_i, -s_g B_g / G, ...]``.
    """
    out = []
    g = len(general)
    for a, b, s in task:
        a_parts = [a] + [ag for ag, _, _ in general]
        b_parts = [s * b] + [-(sg / g) * bg for _, bg, sg in general]
        out.append((torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1), 1.0))
    return out


def combine_factors(
    task: torch.Tensor,
    general: list[torch.Tensor],
    general_weights: list[float],
    add: list[torch.Tensor] = (),
    add_weights: list[float] = (),
    task_weight: float = 1.0,
) -> torch.Tensor:
    """One factor (A or B) of one expert after the original code's factor-wise combination, term by term:
    ``task_weight·F − Σ_g w_g F_g + Σ_a u_a F_a``."""
    out = task_weight * task
    for w, f in zip(general_weights, general, strict=True):
        out = out - w * f
    for u, f in zip(add_weights, add, strict=True):
        out = out + u * f
    return out


def canonical_sign(p: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude is positive (prototypes are defined up to sign)."""
    if p.numel() == 0:
        return p
    idx = p.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(p, -1, idx))
    sign[sign == 0] = 1
    return p * sign


def prototypes_svd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each ``B_e A_e`` by a full SVD of the materialised ΔW (zero ΔW → zero row)."""
    rows = []
    for e in range(a.shape[0]):
        dw = b[e] @ a[e]
        if not torch.any(dw != 0):
            rows.append(torch.zeros(a.shape[-1], dtype=a.dtype, device=a.device))
            continue
        _, _, vh = torch.linalg.svd(dw, full_matrices=False)
        rows.append(vh[0])
    return canonical_sign(torch.stack(rows)) if rows else a.new_zeros(0, a.shape[-1])


def prototypes_of_sum_svd(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per expert, the top right singular vector of ``Σ_m B_m A_m`` over several modules (A_m (E, r, d_in), B_m
    (E, d_out, r), one pair per module; equal shapes), by a full SVD of the materialised sum."""
    rows = []
    for e in range(a[0].shape[0]):
        dw = sum(bm[e] @ am[e] for am, bm in zip(a, b, strict=True))
        rows.append(torch.linalg.svd(dw, full_matrices=False)[2][0])
    return canonical_sign(torch.stack(rows))


def route(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow routing: logits ``|x·p_e|``, top-k (ties to the lower index), softmax of ``logit/T`` over the k."""
    logits = (x @ prototypes.T).abs()
    # A stable descending sort keeps equal logits in index order, so ties go to the lower expert index.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    top = torch.gather(logits, -1, order)
    weights = torch.softmax(top / temperature, dim=-1)
    return weights, order


def expand_with_routing(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    mixing: str = "output",
) -> torch.Tensor:
    """The LoRA delta for given routing, one token at a time (no weight, no bias)."""
    t = x.shape[0]
    out = x.new_zeros(t, b.shape[1])
    for i in range(t):
        idx = indices[i]
        w = weights[i]
        if mixing == "output":
            for j in range(idx.shape[0]):
                e = int(idx[j])
                out[i] += w[j] * scaling[e] * (b[e] @ (a[e] @ x[i]))
        elif mixing == "weights":
            a_mix = sum(w[j] * a[int(idx[j])] for j in range(idx.shape[0]))
            b_mix = sum(w[j] * b[int(idx[j])] for j in range(idx.shape[0]))
            out[i] = scaling[int(idx[0])] * (b_mix @ (a_mix @ x[i]))
        else:
            raise ValueError(f"unknown mixing {mixing!r}")
    return out


def routed_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: torch.Tensor,
    prototypes: torch.Tensor,
    top_k: int,
    temperature: float,
    mixing: str = "output",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Arrow-routed LoRA for x (..., d_in): ``W0 x + b + delta`` or only the delta when ``weight`` is None."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    w, idx = route(x2, prototypes, top_k, temperature)
    y = expand_with_routing(x2, a, b, scaling, w, idx, mixing)
    if weight is not None:
        y = y + x2 @ weight.T
        if bias is not None:
            y = y + bias
    return y.reshape(*lead, y.shape[-1])
