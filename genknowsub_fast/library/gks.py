"""GenKnowSub: subtracting general knowledge from task LoRA experts, per target module, and the original code's
variants (weighted general adapters, adapters added after the subtraction, a weight on the task factors).

One recipe covers every variant, with one coefficient per adapter:

- ``t`` (``task_weight``, default 1) on the task expert,
- ``w_g`` (``general_weights``, default the mean ``1/G``) per general adapter, subtracted,
- ``u_a`` (``add_weights``, default 1) per added adapter, added (a negative weight subtracts).

Two modes apply them:

- ``"param"`` (what PEFT's ``use_gks=True`` and the original code do): the factors themselves are combined,
  ``A_i ← t·A_i − Σ_g w_g A_g + Σ_a u_a A_a`` and the same for B. All ranks must agree; only the task expert's scaling
  is used. ``B_i A_i`` is then not the same combination of the ΔW: cross terms remain.
- ``"delta"`` (the paper's formula, exact on ΔW): ``t·ΔW_i − Σ_g w_g ΔW_g + Σ_a u_a ΔW_a`` written as concatenated
  factors with scaling 1: ``A_i' = [A_i ; A_g… ; A_a…]``, ``B_i' = [t s_i B_i , −w_g s_g B_g… , u_a s_a B_a…]``. Ranks
  add up; mixed ranks work.

With the default (mean) general weights the mean is computed as PEFT computes it, ``stack(...).mean(0)``, so that a
library built from adapter directories holds bit for bit the factors PEFT's Arrow model holds after its GenKnowSub.

Everything here works on plain tensors of one module; :class:`genknowsub_fast.library.LoraLibrary` applies it to every
module of a library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GKS_MODES = ("param", "delta")
GKS_AUTO = "auto"  # the default of ``gks``: "param" when general adapters are given, else no GenKnowSub

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, d_in), B (d_out, r))
ScaledFactors = tuple[torch.Tensor, torch.Tensor, float]  # (A, B, scaling)


def resolve_gks(gks: str | None, num_general: int, num_added: int = 0) -> str | None:
    """The GenKnowSub mode to run: ``"auto"`` is ``"param"`` with general adapters and None without.

    ValueError for an unknown mode, for ``"param"``/``"delta"`` without general adapters (PEFT's ``use_gks=True``
    without general adapters raises too), for general adapters with ``gks=None`` (they would be silently ignored), and
    for added adapters without general adapters (they are combined after the subtraction).
    """
    if gks == GKS_AUTO:
        gks = "param" if num_general else None
    elif gks is not None and gks not in GKS_MODES:
        raise ValueError(f"gks must be None, {GKS_AUTO!r} or one of {GKS_MODES}, got {gks!r}")
    elif gks is not None and not num_general:
        raise ValueError(f"gks={gks!r} subtracts general knowledge, but no general adapters were given")
    elif gks is None and num_general:
        raise ValueError(
            f"{num_general} general adapter(s) given with gks=None, which subtracts nothing: pass gks='param' or "
            "'delta' (or leave gks at its default), or leave the general adapters out"
        )
    if num_added and gks is None:
        raise ValueError("add_adapters are combined after GenKnowSub, so they need general adapters as well")
    return gks


def mean_weights(num_general: int) -> list[float]:
    """GenKnowSub's default coefficients: the plain average, ``1/G`` per general adapter (none for G = 0)."""
    return [1.0 / num_general] * num_general if num_general else []


def check_weight(weight: object, what: str) -> float:
    """One coefficient as a float; ValueError unless it is a finite real number (not a bool)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(float(weight)):
        raise ValueError(f"{what} must be a finite number, got {weight!r}")
    return float(weight)


def check_weights(weights: Sequence[float], num_adapters: int, what: str = "general_weights") -> list[float]:
    """The coefficients as floats; ValueError unless there is one finite number per adapter."""
    weights = list(weights)
    if len(weights) != num_adapters:
        raise ValueError(f"{what} has {len(weights)} entries for {num_adapters} adapters")
    return [check_weight(w, f"{what}[{i}]") for i, w in enumerate(weights)]


def weighted_sum(mats: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """``Σ_j w_j M_j``; with ``weights=None`` the plain mean, computed as PEFT computes it (``stack(...).mean(0)``)."""
    if weights is None:
        return torch.stack(list(mats), dim=0).mean(0)
    return sum(w * m for w, m in zip(weights, mats, strict=True))


def combine_param(
    task: Sequence[Factors],
    general: Sequence[Factors],
    general_weights: Sequence[float] | None = None,
    add: Sequence[Factors] = (),
    add_weights: Sequence[float] | None = None,
    task_weight: float = 1.0,
) -> list[Factors]:
    """Factor-wise GenKnowSub: ``(t·A_i − Σ_g w_g A_g + Σ_a u_a A_a, t·B_i − Σ_g w_g B_g + Σ_a u_a B_a)``.

    ``general_weights=None`` is the mean (PEFT's ``stack().mean(0)``); ``add_weights=None`` is 1 per added adapter.
    A term whose adapter list is empty is left out, and ``t = 1`` does not multiply, so with the defaults and no
    added adapters the result is PEFT's ``A_i − mean_g A_g`` bit for bit.
    """
    return apply_param(task, param_terms(general, general_weights, add, add_weights), task_weight)


ParamTerms = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def param_terms(
    general: Sequence[Factors],
    general_weights: Sequence[float] | None = None,
    add: Sequence[Factors] = (),
    add_weights: Sequence[float] | None = None,
) -> ParamTerms:
    """(Σ_g w_g A_g, Σ_g w_g B_g, Σ_a u_a A_a, Σ_a u_a B_a) of :func:`combine_param`, None where a list is empty:
    computed once and applied to any number of task experts with :func:`apply_param`."""
    if add_weights is None:
        add_weights = [1.0] * len(add)
    sub_a = weighted_sum([a for a, _ in general], general_weights) if general else None
    sub_b = weighted_sum([b for _, b in general], general_weights) if general else None
    add_a = weighted_sum([a for a, _ in add], add_weights) if add else None
    add_b = weighted_sum([b for _, b in add], add_weights) if add else None
    return sub_a, sub_b, add_a, add_b


def apply_param(task: Sequence[Factors], terms: ParamTerms, task_weight: float = 1.0) -> list[Factors]:
    """:func:`combine_param` with its sums already made (:func:`param_terms`). A task pair may hold a stack of
    experts (E, r, d_in) and (E, d_out, r): the terms broadcast, element by element the same arithmetic."""
    sub_a, sub_b, add_a, add_b = terms
    out = []
    for a, b in task:
        if task_weight != 1.0:
            a, b = task_weight * a, task_weight * b
        if sub_a is not None:
            a, b = a - sub_a, b - sub_b
        if add_a is not None:
            a, b = a + add_a, b + add_b
        out.append((a, b))
    return out


def apply_param_(a: torch.Tensor, b: torch.Tensor, terms: ParamTerms, task_weight: float = 1.0) -> None:
    """:func:`apply_param` on one pair (or stack) of task factors, in place: the same arithmetic, no new tensors (a
    build applies it to each chunk of experts it has just read)."""
    sub_a, sub_b, add_a, add_b = terms
    if task_weight != 1.0:
        a.mul_(task_weight)
        b.mul_(task_weight)
    if sub_a is not None:
        a.sub_(sub_a)
        b.sub_(sub_b)
    if add_a is not None:
        a.add_(add_a)
        b.add_(add_b)


def combine_delta(
    task: Sequence[ScaledFactors],
    general: Sequence[ScaledFactors],
    general_weights: Sequence[float] | None = None,
    add: Sequence[ScaledFactors] = (),
    add_weights: Sequence[float] | None = None,
    task_weight: float = 1.0,
) -> list[ScaledFactors]:
    """Exact GenKnowSub on ΔW: ``t s_i B_i A_i − Σ_g w_g s_g B_g A_g + Σ_a u_a s_a B_a A_a`` as concatenated factors
    with scaling 1 (``general_weights=None``: ``1/G`` each; ``add_weights=None``: 1 each)."""
    gw = mean_weights(len(general)) if general_weights is None else list(general_weights)
    aw = [1.0] * len(add) if add_weights is None else list(add_weights)
    extra_a = [a for a, _, _ in general] + [a for a, _, _ in add]
    extra_b = [-(w * s) * b for w, (_, b, s) in zip(gw, general, strict=True)]
    extra_b += [(u * s) * b for u, (_, b, s) in zip(aw, add, strict=True)]
    return [
        (torch.cat([a, *extra_a], dim=0), torch.cat([(task_weight * s) * b, *extra_b], dim=1), 1.0) for a, b, s in task
    ]


__all__ = [
    "GKS_MODES",
    "GKS_AUTO",
    "resolve_gks",
    "mean_weights",
    "check_weight",
    "check_weights",
    "weighted_sum",
    "combine_param",
    "param_terms",
    "apply_param",
    "apply_param_",
    "combine_delta",
]
