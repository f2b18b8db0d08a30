"""GenKnowSub: subtracting general knowledge from task LoRA experts, per target module.

Two modes, both with one coefficient per general adapter (``weights``; GenKnowSub's average is ``1/G`` each):

- ``"param"`` (what PEFT's ``use_gks=True`` and the original code do): the factors themselves are combined,
  ``A_i ← A_i − Σ_g w_g A_g`` and ``B_i ← B_i − Σ_g w_g B_g``. All ranks must agree; the general adapters' scalings are
  not used (the task expert keeps its own). Note that ``B_i A_i`` is not ``ΔW_i − Σ w_g ΔW_g``: cross terms remain.
- ``"delta"`` (the paper's formula, exact on ΔW): ``ΔW_i − Σ_g w_g ΔW_g`` written as concatenated factors with
  scaling 1: ``A_i' = [A_i ; A_g1 ; …]``, ``B_i' = [s_i B_i , −w_1 s_g1 B_g1 , …]``. Ranks add up; mixed ranks work.

Everything here works on plain tensors of one module; :class:`genknowsub_fast.library.LoraLibrary` applies it to every
module of a library.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GKS_MODES = ("param", "delta")

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, d_in), B (d_out, r))
ScaledFactors = tuple[torch.Tensor, torch.Tensor, float]  # (A, B, scaling)


def mean_weights(num_general: int) -> list[float]:
    """GenKnowSub's default coefficients: the plain average, ``1/G`` per general adapter (none for G = 0)."""
    return [1.0 / num_general] * num_general if num_general else []


def check_weights(weights: Sequence[float], num_general: int, what: str = "general_weights") -> list[float]:
    """The coefficients as floats; ValueError unless there is one finite number per general adapter."""
    weights = list(weights)
    if len(weights) != num_general:
        raise ValueError(f"{what} has {len(weights)} entries for {num_general} adapters")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not torch.isfinite(torch.tensor(float(w))):
            raise ValueError(f"{what} must be finite numbers, got {weights!r}")
        out.append(float(w))
    return out


def subtract_param(task: Sequence[Factors], general: Sequence[Factors], weights: Sequence[float]) -> list[Factors]:
    """Factor-wise GenKnowSub: ``(A_i − Σ_g w_g A_g, B_i − Σ_g w_g B_g)`` for every task expert i."""
    if not general:
        return [(a, b) for a, b in task]
    sum_a = sum(w * a for w, (a, _) in zip(weights, general, strict=True))
    sum_b = sum(w * b for w, (_, b) in zip(weights, general, strict=True))
    return [(a - sum_a, b - sum_b) for a, b in task]


def subtract_delta(
    task: Sequence[ScaledFactors], general: Sequence[ScaledFactors], weights: Sequence[float]
) -> list[ScaledFactors]:
    """Exact GenKnowSub on ΔW: ``s_i B_i A_i − Σ_g w_g s_g B_g A_g`` as concatenated factors with scaling 1."""
    a_g = [a for a, _, _ in general]
    b_g = [-(w * s) * b for w, (_, b, s) in zip(weights, general, strict=True)]
    return [(torch.cat([a, *a_g], dim=0), torch.cat([s * b, *b_g], dim=1), 1.0) for a, b, s in task]


__all__ = ["GKS_MODES", "mean_weights", "check_weights", "subtract_param", "subtract_delta"]
