"""One Arrow prototype per decoder layer and expert (``prototype_scope="layer"``, the original Phi-2 code's variant).

The prototype of expert i in decoder layer L is the top right singular vector of ``Σ_m s_m B_m A_m`` over the targeted
modules m of layer L (q, k, v and dense on Phi-2). Every module of the layer routes its own input with that shared
prototype. The sum is a product of concatenated factors, ``[s_1 B_1, s_2 B_2, …] · [A_1 ; A_2 ; …]``, so the
prototype methods that work on (A, B) pairs compute it without forming ΔW.

The sum needs every module of a layer to share (d_in, d_out), and the scalings only rescale the sum when each
expert's scaling is the same over the layer's modules (the original sums unscaled products; with one scaling per
expert the direction is the same), so both are checked.

Modules are grouped by their path up to and including the last all-digit component: ``model.layers.7.self_attn.q_proj``
belongs to ``model.layers.7``.
"""

from __future__ import annotations

import torch

from ..experts import ModuleExperts

PROTOTYPE_SCOPES = ("module", "layer")


def decoder_layer(path: str) -> str:
    """The decoder layer of a module path (the path up to its last all-digit component); ValueError when none."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    raise ValueError(f'prototype_scope="layer": module {path!r} has no layer index in its path')


def group_by_layer(paths: list[str]) -> dict[str, list[str]]:
    """Module paths grouped by :func:`decoder_layer`, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(decoder_layer(p), []).append(p)
    return groups


def layer_factors(layer: str, modules: dict[str, ModuleExperts]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated factors of one layer's modules: A (E, Σr, d_in) and B (E, d_out, Σr) with each module's scaling
    folded into its B block, so ``B[e] @ A[e] = Σ_m s_m,e B_m,e A_m,e``.

    ValueError when the modules' (d_in, d_out) differ, or an expert's scaling differs between them.
    """
    paths = list(modules)
    first = modules[paths[0]]
    shapes = {p: (m.d_in, m.d_out) for p, m in modules.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{p.rsplit('.', 1)[-1]} {i}→{o}" for p, (i, o) in shapes.items())
        raise ValueError(
            f'prototype_scope="layer" sums ΔW over the modules of a layer, so they must share one shape; '
            f"layer {layer!r} has {desc}"
        )
    for p, m in modules.items():
        if not torch.allclose(m.scaling, first.scaling, rtol=1e-6, atol=0):
            raise ValueError(
                f'prototype_scope="layer": an expert\'s scaling must be the same over the modules of a layer; in '
                f"{layer!r}, {paths[0]!r} has {first.scaling.tolist()} and {p!r} has {m.scaling.tolist()}"
            )
    work = torch.promote_types(first.a.dtype, torch.float32)
    a_cat = torch.cat([m.a.to(work) for m in modules.values()], dim=1)
    b_cat = torch.cat([m.b.to(work) * m.scaling.to(work).view(-1, 1, 1) for m in modules.values()], dim=2)
    return a_cat, b_cat


__all__ = ["PROTOTYPE_SCOPES", "decoder_layer", "group_by_layer", "layer_factors"]
