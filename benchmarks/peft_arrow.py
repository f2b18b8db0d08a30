"""PEFT's Arrow layer on one linear layer's experts: the "peft" implementation of the op-level benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.phi3_shapes import TOP_K


def peft_arrow_linear(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, device: torch.device | str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x Wᵀ + PEFT's ArrowLoraLinearLayer delta`` for experts A (E, r, d_in), B (E, d_out, r), top-k TOP_K."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    e, _, d_in = a.shape
    names = [f"task_{i}" for i in range(e)]
    cfg = ArrowConfig(top_k=TOP_K, rng_seed=0)
    cfg.task_adapter_names, cfg.gks_adapter_names = names, []
    lora_a = torch.nn.ModuleDict({n: torch.nn.Linear(d_in, 1, bias=False) for n in names})
    lora_b = torch.nn.ModuleDict({n: torch.nn.Linear(1, 1, bias=False) for n in names})
    for i, n in enumerate(names):
        lora_a[n].weight = torch.nn.Parameter(a[i], requires_grad=False)
        lora_b[n].weight = torch.nn.Parameter(b[i], requires_grad=False)
    layer = ArrowLoraLinearLayer(d_in, cfg)
    if device is not None:
        layer = layer.to(device)
    layer.build_prototypes(lora_a, lora_b)
    scalings = dict.fromkeys(names, scaling)
    return lambda x: F.linear(x, weight) + layer(x, lora_a, lora_b, torch.nn.Identity(), scalings)
