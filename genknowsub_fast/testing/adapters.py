"""Synthetic PEFT LoRA adapters with known spectra, written as real PEFT adapter directories.

Task adapters are built as ``residual + mean(general)``, where each residual has a decaying spectrum
(σ_j = σ_1 · decay^j). GenKnowSub (``gks="param"``) then recovers the residuals, whose top singular value stands well
apart from the next, so PEFT's 15-step power iteration converges (error ≈ decay^30) and its prototypes can serve as
an oracle for the exact ones.

``spectrum=`` gives every residual a chosen spectrum instead; :func:`nonconvergent_spectrum` makes one whose top two
singular values are so close (σ2/σ1 = ratio ≥ 0.95) that PEFT's 15 steps do not converge. The residual of module m is
``B = U diag(√σ)``, ``A = diag(√σ) Vᵀ`` with random orthonormal U, V, so its exact prototype is ``±V[:, 0]``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import PHI3_TARGETS


def spectrum_factors(
    d_in: int, d_out: int, sigma: Sequence[float], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A (r, d_in), B (d_out, r), r = len(sigma), with ``B·A`` of singular values ``sigma`` (given in
    decreasing order): ``A = diag(√σ) Vᵀ``, ``B = U diag(√σ)`` for random orthonormal U, V (float32)."""
    sig = torch.as_tensor(list(sigma), dtype=torch.float64)
    if sig.dim() != 1 or not bool((sig > 0).all()) or not bool((sig[1:] <= sig[:-1]).all()):
        raise ValueError(f"sigma must be positive and non-increasing, got {list(sigma)}")
    rank = sig.numel()
    qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64))
    # Split σ evenly between the factors so neither is tiny.
    a = sig.sqrt()[:, None] * qa.T
    b = qb * sig.sqrt()[None, :]
    return a.float(), b.float()


def decaying_factors(
    d_in: int, d_out: int, rank: int, sigma1: float, decay: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A (r, d_in), B (d_out, r) with ``B·A`` of singular values ``sigma1 · decay^j``."""
    return spectrum_factors(d_in, d_out, (sigma1 * decay ** torch.arange(rank, dtype=torch.float64)).tolist(), gen)


def nonconvergent_spectrum(ratio: float, rank: int = 4) -> tuple[float, ...]:
    """Singular values ``(1, ratio, ratio/2, ratio/4, ...)``: σ2/σ1 = ratio (< 1, so the top vector is unique).

    PEFT's prototype is 15 steps of power iteration, whose error shrinks like ``ratio^30``: with ratio ≥ 0.95 it has
    not converged (measured min |cos| to the exact prototype 0.03-0.3 on tiny GPT-2 and Phi-3 models).
    """
    if not 0 < ratio < 1 or rank < 2:
        raise ValueError(f"ratio must be in (0, 1) and rank >= 2, got ratio={ratio}, rank={rank}")
    return (1.0, ratio) + tuple(ratio / 2**j for j in range(1, rank - 1))


@dataclass
class SyntheticAdapters:
    """Paths of the adapters written by :func:`write_adapters`."""

    task: list[str]
    general: list[str]


def write_adapters(
    base_model: nn.Module,
    out_dir: str | os.PathLike,
    num_tasks: int,
    num_general: int,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] = PHI3_TARGETS,
    seed: int = 0,
    decay: float = 0.5,
    sigma1: float = 0.5,
    general_std: float = 0.05,
    task_ranks: Sequence[int] | None = None,
    spectrum: Sequence[float] | None = None,
) -> SyntheticAdapters:
    """Write task and general LoRA adapters for ``base_model`` in PEFT's format.

    The adapters are made with ``peft.get_peft_model(..., LoraConfig(init_lora_weights=False))`` on a copy of the
    model and saved with ``save_pretrained``; their weights are set as described in the module docstring. With
    ``task_ranks`` each task adapter gets its own rank (for ``gks="delta"``; residual = the task adapter then).
    ``spectrum`` (length ``rank``) gives every task residual these singular values instead of the decaying ones.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = os.fspath(out_dir)
    gen = torch.Generator().manual_seed(seed)
    ranks_t = list(task_ranks) if task_ranks is not None else [rank] * num_tasks
    if len(ranks_t) != num_tasks:
        raise ValueError(f"{len(ranks_t)} task ranks for {num_tasks} task adapters")
    if spectrum is not None and (len(spectrum) != rank or task_ranks is not None):
        raise ValueError(f"spectrum needs one value per rank ({rank}) and no task_ranks, got {list(spectrum)}")

    def lora_layers(peft_model) -> dict[str, nn.Module]:
        return {
            n.removeprefix("base_model.model."): m
            for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
        }

    peft_models: dict[int, nn.Module] = {}

    def model_for(r: int):
        if r not in peft_models:
            cfg = LoraConfig(
                r=r,
                lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
                target_modules=list(target_modules),
                init_lora_weights=False,
                lora_dropout=0.0,
            )
            with warnings.catch_warnings():
                # PEFT reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning from transformers
                # 5.x): nothing the caller can act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_models[r] = get_peft_model(copy.deepcopy(base_model), cfg)
        return peft_models[r]

    general_factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    paths = SyntheticAdapters([], [])
    for g in range(num_general):
        pm = model_for(rank)
        facs = {}
        for path, layer in lora_layers(pm).items():
            a = torch.randn(layer.lora_A["default"].weight.shape, generator=gen) * general_std
            b = torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * general_std
            facs[path] = (a, b)
        general_factors.append(facs)
        paths.general.append(_save(pm, facs, os.path.join(out_dir, f"general_{g}")))
    for t in range(num_tasks):
        r = ranks_t[t]
        pm = model_for(r)
        facs = {}
        for path, layer in lora_layers(pm).items():
            d_out, d_in = layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1]
            if spectrum is not None:
                a, b = spectrum_factors(d_in, d_out, spectrum, gen)
            else:
                a, b = decaying_factors(d_in, d_out, r, sigma1 * (1 + 0.1 * t), decay, gen)
            if general_factors and r == rank:
                a = a + sum(f[path][0] for f in general_factors) / len(general_factors)
                b = b + sum(f[path][1] for f in general_factors) / len(general_factors)
            facs[path] = (a, b)
        paths.task.append(_save(pm, facs, os.path.join(out_dir, f"task_{t}")))
    return paths


def _save(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str) -> str:
    with torch.no_grad():
        for name, m in peft_model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in factors:
                m.lora_A["default"].weight.copy_(factors[key][0])
                m.lora_B["default"].weight.copy_(factors[key][1])
    peft_model.save_pretrained(path)
    return path


# A small closed vocabulary for synthetic text: the tokenizer below is trained on it and the multiple-choice examples
# are drawn from it, so every word tokenizes into a few known pieces.


__all__ = ["spectrum_factors", "decaying_factors", "nonconvergent_spectrum", "SyntheticAdapters", "write_adapters"]
